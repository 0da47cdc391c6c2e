"""Policy YAML -> PolicySet (frozen): which Acceptable Use Policy covers a call, and for whom.

Policies are tried in order (files by name, then their order in each file); the first whose
application, services, methods and tags match applies, unless the OpenAPI operation names its
policy (`x-aup-policy`), which wins over order. Matches are memoised per
(application, service, method), so a request costs one dict look-up, not a scan.

Applications with `openapi:` have their spec read here too (config/openapi.py), so that the spec
is validated, versioned and reloaded together with the policies that match its operations.

The same files carry the access list (`access:` entries, see gateway/config/access.py), so it is
validated, versioned and reloaded together with the policies.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from pathlib import Path

from gateway.config.access import AccessList, AccessRule, read_access_rule
from gateway.config.openapi import ApiSpec, load_spec
from gateway.config.settings import (
    METHODS,
    MODES,
    STORE_ERROR_MODES,
    Mode,
    Settings,
    StoreErrorMode,
)
from gateway.config.yamlread import Fields, Problems, compose, parse_duration
from gateway.edge.identity import ClientIdentity, normalise_dn
from gateway.errors import ConfigError
from gateway.limiter.base import Rate
from gateway.proxy.faults import unknown_message_fields

_MEMO_LIMIT = 50_000
DEFAULT_MESSAGE = (
    "Acceptable Use Policy violation: {service} may be called at most once every {per} "
    "seconds. Please retry your request again in {retry_after} seconds."
)


@dataclass(frozen=True, slots=True)
class Override:
    """A per-identity exception to one policy: exempt, or a negotiated rate."""

    identity: str
    exempt: bool = False
    rate: Rate | None = None


@dataclass(frozen=True, slots=True)
class Policy:
    name: str
    application: str
    services: tuple[str, ...]
    rate: Rate
    methods: tuple[str, ...] | None = None
    tags: tuple[str, ...] | None = None  # OpenAPI tags: any one of them matches
    mode: Mode = "enforce"
    message: str = DEFAULT_MESSAGE
    on_store_error: StoreErrorMode | None = None
    overrides: Mapping[str, Override] = field(default_factory=dict)
    source: str = ""

    def matches(
        self, application: str, service: str, method: str, tags: tuple[str, ...] = ()
    ) -> bool:
        return (
            application == self.application
            and (self.methods is None or method in self.methods)
            and (self.tags is None or any(tag in tags for tag in self.tags))
            and any(fnmatchcase(service, pattern) for pattern in self.services)
        )

    def rate_for(self, identity: str) -> Rate | None:
        """The rate that applies to this identity; None when it is exempt."""
        override = self.overrides.get(identity)
        if override is None:
            return self.rate
        return None if override.exempt else override.rate


@dataclass(frozen=True)
class PolicySet:
    policies: tuple[Policy, ...]
    files: tuple[Path, ...]
    version: str
    access: AccessList | None = None  # None: no access list, every verified identity may call
    specs: Mapping[str, ApiSpec] = field(default_factory=dict)  # application -> its OpenAPI spec
    # (application, operationId) -> the policy its x-aup-policy names
    bound: Mapping[tuple[str, str], Policy] = field(default_factory=dict)
    _memo: dict[tuple[str, str, str], Policy | None] = field(
        default_factory=dict, compare=False, repr=False
    )

    def allows(self, identity: ClientIdentity, application: str) -> bool:
        """Whether the identity is provisioned for the application (no access list: everyone)."""
        return self.access is None or self.access.allows(identity, application)

    def match(self, application: str, service: str, method: str) -> Policy | None:
        key = (application, service, method)
        try:
            return self._memo[key]
        except KeyError:
            pass
        found = self.bound.get((application, service))
        if found is None:
            spec = self.specs.get(application)
            operation = spec.by_service.get(service) if spec is not None else None
            tags = operation.tags if operation is not None else ()
            found = next(
                (p for p in self.policies if p.matches(application, service, method, tags)), None
            )
        if len(self._memo) < _MEMO_LIMIT:  # service names come from URLs: bound the memo
            self._memo[key] = found
        return found


def load_policies(settings: Settings) -> PolicySet:
    """Read every *.yaml under settings.policies; raises ConfigError listing every problem."""
    directory = settings.policies
    problems = Problems()
    if not directory.is_dir():
        raise ConfigError([f"{settings.source}:1: policies: {directory} is not a directory"])
    files = tuple(sorted(directory.glob("*.yaml")) + sorted(directory.glob("*.yml")))
    digest = hashlib.sha256()
    specs: dict[str, ApiSpec] = {}
    for app in settings.applications.values():
        if app.openapi is not None:
            with contextlib.suppress(OSError):  # load_spec reports it
                digest.update(str(app.openapi).encode() + b"\0" + app.openapi.read_bytes() + b"\0")
            spec = load_spec(app.openapi, app.name, problems)
            if spec is not None:
                specs[app.name] = spec
    policies: list[Policy] = []
    rules: list[AccessRule] = []
    seen: dict[str, str] = {}
    for path in files:
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
        root = compose(path, problems)
        if root is None:
            continue
        top = Fields(root, str(path), problems)
        if not top.ok:
            continue
        for _, node in top.items("policies"):
            policy = _read_policy(Fields(node, str(path), problems, "policies[]"), settings, specs)
            if policy is None:
                continue
            if policy.name in seen:
                problems.add(
                    str(path),
                    node,
                    "name",
                    f"duplicate policy name {policy.name!r} (first in {seen[policy.name]})",
                )
                continue
            seen[policy.name] = policy.source
            policies.append(policy)
        for _, node in top.items("access"):
            rule = read_access_rule(Fields(node, str(path), problems, "access[]"), settings)
            if rule is not None:
                rules.append(rule)
        top.done()
    bound = _bind_operations(specs, policies, problems)
    problems.raise_if_any()
    access = AccessList(tuple(rules)) if rules else None
    spec_files = tuple(spec.path for spec in specs.values())
    return PolicySet(
        tuple(policies), files + spec_files, digest.hexdigest()[:16], access, specs, bound
    )


def _bind_operations(
    specs: Mapping[str, ApiSpec], policies: list[Policy], problems: Problems
) -> dict[tuple[str, str], Policy]:
    """Each operation's `x-aup-policy` -> that policy, which must exist and be of its
    application; the error is at the extension's line in the spec."""
    by_name = {policy.name: policy for policy in policies}
    bound: dict[tuple[str, str], Policy] = {}
    for spec in specs.values():
        for op in spec.operations:
            if op.policy is None:
                continue
            policy = by_name.get(op.policy)
            if policy is None:
                known = ", ".join(p.name for p in policies if p.application == spec.application)
                problems.items.append(
                    f"{op.policy_source}: x-aup-policy: no policy is named {op.policy!r} "
                    f"(policies of {spec.application}: {known or 'none'})"
                )
            elif policy.application != spec.application:
                problems.items.append(
                    f"{op.policy_source}: x-aup-policy: {op.policy!r} is a policy of "
                    f"{policy.application}, not of {spec.application}"
                )
            else:
                bound[(spec.application, op.service)] = policy
    return bound


def _read_policy(f: Fields, settings: Settings, specs: Mapping[str, ApiSpec]) -> Policy | None:
    if not f.ok:
        return None
    name = f.value("name", str, "")
    if not f.has("name"):
        f.error("name", "is required")
    elif name:
        f.context = f"policies[{name}]"
    application = f.value("application", str, "")
    app = settings.application(application) if application else None
    if application and app is None:
        f.error(
            "application",
            f"{application!r} is not configured in {settings.source.name} "
            f"(known: {', '.join(settings.applications) or 'none'})",
        )
    services = f.strings("services", ("*",))
    if not services:
        f.error("services", "must list at least one service pattern")
    methods = f.strings("methods") or None
    for method in methods or ():
        if method not in METHODS:
            f.error("methods", f"{method!r} is not an HTTP method ({', '.join(METHODS)})")
    tags = _read_tags(f, app.name if app else None, app is not None and app.openapi is not None)
    spec = specs.get(app.name) if app else None
    if spec is not None:
        _check_against_spec(f, spec, services, tags)
    limit = f.value("limit", int, 1, lambda v: None if v >= 1 else f"must be at least 1, got {v}")
    per = f.converted("per", parse_duration, 1.0)
    reset = f.value("reset_on_early_retry", bool, False)
    rate = Rate(limit, per, reset)
    policy = Policy(
        name=name,
        application=app.name if app else application,
        services=services,
        rate=rate,
        methods=methods,
        tags=tags,
        mode=f.choice("mode", MODES, "enforce"),
        message=f.value("message", str, DEFAULT_MESSAGE, _check_template),
        on_store_error=f.choice("on_store_error", STORE_ERROR_MODES, None),
        overrides=_read_overrides(f, rate),
        source=f"{f.file}:{f.line()}",
    )
    f.done()
    return policy if name and app else None


def _read_tags(f: Fields, application: str | None, has_spec: bool) -> tuple[str, ...] | None:
    if not f.has("tags"):
        return None
    tags = f.strings("tags")
    if not tags:
        f.error("tags", "must list at least one tag")
    elif application is not None and not has_spec:
        f.error(
            "tags",
            f"{application} has no OpenAPI spec (openapi: in gateway.yaml): only its "
            "operations carry tags",
        )
    return tags or None


def _check_against_spec(
    f: Fields, spec: ApiSpec, services: tuple[str, ...], tags: tuple[str, ...] | None
) -> None:
    """Patterns and tags that match no operation are typos until proven otherwise."""
    for pattern in services:
        if not any(fnmatchcase(service, pattern) for service in spec.by_service):
            f.error(
                "services",
                f"{pattern!r} matches no operationId in {spec.path.name} "
                f"(operations: {', '.join(spec.by_service)})",
            )
    known = spec.tags
    for tag in tags or ():
        if tag not in known:
            f.error(
                "tags",
                f"no operation in {spec.path.name} is tagged {tag!r} "
                f"(tags: {', '.join(sorted(known)) or 'none'})",
            )


def _check_template(text: str) -> str | None:
    unknown = unknown_message_fields(text)
    if unknown:
        return (
            f"bad message template: unknown field(s) "
            f"{', '.join('{' + name + '}' for name in unknown)}; "
            f"use {{retry_after}}, {{service}}, {{per}}"
        )
    return None


def _read_overrides(f: Fields, rate: Rate) -> dict[str, Override]:
    overrides: dict[str, Override] = {}
    for _, node in f.items("overrides"):
        o = Fields(node, f.file, f.problems, f"{f.context}.overrides[]")
        if not o.ok:
            continue
        identity = o.value("identity", str, "")
        try:
            identity = normalise_dn(identity) if "=" in identity else identity
        except ValueError as exc:
            o.error("identity", str(exc))
        exempt = o.value("exempt", bool, False)
        has_rate = o.has("limit") or o.has("per")
        limit = o.value(
            "limit", int, rate.limit, lambda v: None if v >= 1 else f"must be at least 1, got {v}"
        )
        per = o.converted("per", parse_duration, rate.per)
        if exempt and has_rate:
            o.error("exempt", "an exempt identity has no limit or per")
        elif not exempt and not has_rate:
            o.error("identity", "an override is either exempt: true or sets limit/per")
        if identity in overrides:
            o.error("identity", f"duplicate override for {identity!r}")
        override_rate = None if exempt else Rate(limit, per, rate.reset_on_early_retry)
        overrides[identity] = Override(identity, exempt, override_rate)
        o.done()
    return overrides
