"""An application's OpenAPI 3 file -> ApiSpec (frozen): its operations as REST routes.

Every operation becomes a route: its `operationId` is the service name (what policies match,
what limiter keys and metrics carry), its `tags` are what a policy's `tags:` matches, and an
optional `x-aup-policy: <name>` binds it to one policy. Path templates match as the spec writes
them: one path segment per parameter, no trailing slash, concrete paths before templated ones.
The public path is `<application prefix><servers' base path><path>`; the upstream receives
`<base path><path>` (the prefix is the gateway's, the base path is the API's).

The document is checked by `openapi-spec-validator` (the OpenAPI 3.0 and 3.1 JSON Schemas plus
its semantic checks) and then by the gateway's own rules. Both name file, line and key: YAML and
JSON are composed to a node tree that keeps line numbers, and each error's JSON path is looked up
in it. Only local `$ref`s (`#/...`) are accepted: the gateway reads exactly one file and never
fetches a URL while loading configuration.
"""

from __future__ import annotations

import datetime
import json
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import yaml
from jsonschema.exceptions import ValidationError
from openapi_spec_validator.shortcuts import get_validator_cls
from openapi_spec_validator.validation.exceptions import (
    DuplicateOperationIDError,
    ValidatorDetectError,
)

from gateway.config.yamlread import Problems

# OpenAPI's operation keys -> the gateway's methods. TRACE is refused by the router, so a spec
# that routes it is an error rather than a route that can never be reached.
_OPERATION_KEYS = ("get", "put", "post", "delete", "options", "head", "patch", "trace")
_VERSIONS = re.compile(r"^3\.[01]\.\d+$")
_SERVICE = re.compile(r"^[A-Za-z0-9_.-]{1,200}$")  # the router's service names (limiter keys)
_PARAM = re.compile(r"\{[^/{}]+\}")
_SAFE_TEMPLATE = re.compile(r"^(/([A-Za-z0-9._~!$&'()*+,;=:@-]|\{[^/{}]+\})+)*/?$")
# Where openapi-spec-validator's semantic checks (which carry no JSON path) name the operation.
_MESSAGE_PATH = re.compile(r"'(get|put|post|delete|options|head|patch|trace)'.* in '(/[^']*)'")
_ROOT_KEYS = frozenset(
    (
        "openapi",
        "info",
        "servers",
        "paths",
        "components",
        "security",
        "tags",
        "externalDocs",
        "webhooks",
        "jsonSchemaDialect",
    )
)

JsonPath = Sequence[str | int]


@dataclass(frozen=True, slots=True)
class Operation:
    """One operation of the spec, as the gateway routes and matches it."""

    method: str  # upper case: GET, POST, ...
    template: str  # the spec's path key, e.g. /portfolio/{portfolioId}
    path: str  # base path + template: what the upstream receives (before the query)
    service: str  # the operationId
    tags: tuple[str, ...] = ()
    policy: str | None = None  # x-aup-policy
    source: str = ""  # file:line of the operation
    policy_source: str = ""  # file:line of its x-aup-policy


@dataclass(frozen=True)
class ApiSpec:
    """One application's spec: its operations and the route table built from them."""

    application: str
    path: Path
    openapi: str  # the document's version, e.g. 3.1.0
    operations: tuple[Operation, ...]
    # (method, pattern on the path after the prefix, service), concrete paths first
    table: tuple[tuple[str, re.Pattern[str], str], ...] = field(repr=False, default=())
    by_service: Mapping[str, Operation] = field(repr=False, default_factory=dict)

    @property
    def tags(self) -> frozenset[str]:
        return frozenset(tag for op in self.operations for tag in op.tags)


def template_pattern(template: str, exact: bool = True) -> re.Pattern[str]:
    """A path template -> its regex: each `{param}` is one non-empty segment part (never a '/').

    `exact` (OpenAPI routes) matches the template and nothing else; the `routes:` table of
    gateway.yaml also accepts one trailing slash, as it always has.
    """
    pattern = ""
    last = 0
    for m in _PARAM.finditer(template):
        pattern += re.escape(template[last : m.start()]) + r"[^/]+"
        last = m.end()
    pattern += re.escape(template[last:])
    return re.compile(f"^{pattern}$" if exact else f"^{pattern}/?$")


def load_spec(path: Path, application: str, problems: Problems) -> ApiSpec | None:
    """Read and validate one spec; every problem goes to `problems` with file, line and key."""
    file = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        problems.items.append(f"{file}:1: cannot read the OpenAPI file: {_reason(exc)}")
        return None
    parsed = _parse(text, file, path.suffix.lower() == ".json", problems)
    if parsed is None:
        return None
    data, root = parsed
    spot = _Locator(file, root, problems)
    if not isinstance(data, dict):
        spot.add((), "", "an OpenAPI document is a mapping (openapi, info, paths, ...)")
        return None
    version = data.get("openapi")
    if not isinstance(version, str) or not _VERSIONS.match(version):
        where = ("openapi",) if "openapi" in data else ()
        got = "swagger 2.0" if "swagger" in data else repr(version)
        spot.add(where, "openapi", f"the gateway reads OpenAPI 3.0 and 3.1 documents, got {got}")
        return None
    if _bad_refs(data, data, (), spot):
        return None  # the validator would try to fetch them, or stop at the first dangling one
    before = len(problems.items)
    _validate(data, spot)
    operations = _operations(data, file, spot)
    if len(problems.items) > before:
        return None
    ordered = sorted(operations, key=lambda op: _specificity(op.path))
    return ApiSpec(
        application=application,
        path=path,
        openapi=version,
        operations=tuple(operations),
        table=tuple((op.method, template_pattern(op.path), op.service) for op in ordered),
        by_service={op.service: op for op in operations},
    )


def _reason(exc: Exception) -> str:
    return (exc.strerror or str(exc)) if isinstance(exc, OSError) else str(exc)


class _Locator:
    """Records problems at the line of a JSON path in the composed document."""

    def __init__(self, file: str, root: yaml.Node | None, problems: Problems) -> None:
        self.file = file
        self.root = root
        self.problems = problems

    def line(self, path: JsonPath) -> int:
        node = self.root
        found = node
        for part in path:
            if isinstance(node, yaml.MappingNode):
                entry = next((kv for kv in node.value if str(kv[0].value) == str(part)), None)
                if entry is None:
                    break
                found, node = entry[0], entry[1]  # a key's own line reads best
            elif isinstance(node, yaml.SequenceNode) and isinstance(part, int):
                if not 0 <= part < len(node.value):
                    break
                found = node = node.value[part]
            else:
                break
        return found.start_mark.line + 1 if found is not None else 1

    def add(self, path: JsonPath, key: str, message: str) -> None:
        where = f"{self.file}:{self.line(path)}"
        self.problems.items.append(f"{where}: {key}: {message}" if key else f"{where}: {message}")


def _parse(
    text: str, file: str, is_json: bool, problems: Problems
) -> tuple[Any, yaml.Node | None] | None:
    """The document's data and its node tree (for lines). JSON is read by `json` (the
    authority on JSON syntax) and composed as YAML only to find lines; where that fails,
    problems are reported at line 1."""
    if is_json:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            problems.items.append(f"{file}:{exc.lineno}: invalid JSON: {exc.msg}")
            return None
        try:
            root = yaml.compose(text, Loader=yaml.SafeLoader)
        except yaml.YAMLError:
            root = None
        return data, root
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark else 1
        problems.items.append(f"{file}:{line}: invalid YAML: {exc.problem or exc}")
        return None
    if root is None:
        problems.items.append(f"{file}:1: the OpenAPI file is empty")
        return None
    return _data(root, {}), root


_constructor = yaml.constructor.SafeConstructor()


def _data(node: yaml.Node, seen: dict[int, Any]) -> Any:
    """A node tree -> JSON-like data: keys are strings (`200:` is the status "200"), dates are
    ISO strings. Aliases share one converted value, so an alias bomb costs nothing."""
    if id(node) in seen:
        return seen[id(node)]
    value: Any
    if isinstance(node, yaml.MappingNode):
        value = seen[id(node)] = {}
        for key, item in node.value:
            value[str(key.value) if isinstance(key, yaml.ScalarNode) else str(key)] = _data(
                item, seen
            )
    elif isinstance(node, yaml.SequenceNode):
        value = seen[id(node)] = []
        value.extend(_data(item, seen) for item in node.value)
    else:
        value = _constructor.construct_object(node)
        if isinstance(value, datetime.date | datetime.datetime):
            value = value.isoformat()
        seen[id(node)] = value
    return value


def _bad_refs(document: Any, data: Any, path: tuple[str | int, ...], spot: _Locator) -> bool:
    """External `$ref`s (never fetched) and local ones that point to nothing, each reported."""
    found = False
    if isinstance(data, dict):
        ref = data.get("$ref")
        at = (*path, "$ref")
        if isinstance(ref, str) and not ref.startswith("#"):
            spot.add(
                at,
                _key(at),
                f"only local references (#/...) are read, got {ref!r}: "
                "put the referenced definitions in this file",
            )
            found = True
        elif isinstance(ref, str) and not _resolves(document, ref):
            spot.add(at, _key(at), f"{ref!r} points to nothing in this file")
            found = True
        for key, value in data.items():
            found = _bad_refs(document, value, (*path, key), spot) or found
    elif isinstance(data, list):
        for index, value in enumerate(data):
            found = _bad_refs(document, value, (*path, index), spot) or found
    return found


def _resolves(document: Any, ref: str) -> bool:
    """Whether a local JSON pointer (`#/components/schemas/X`, RFC 6901 escapes) resolves."""
    node = document
    for raw in ref.removeprefix("#").split("/")[1:]:
        part = unquote(raw).replace("~1", "/").replace("~0", "~")
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return False
    return True


def _validate(data: dict[str, Any], spot: _Locator) -> None:
    """openapi-spec-validator's findings, each at the line of the key it concerns."""
    reported: set[str] = set()
    try:
        validator = get_validator_cls(data)(data)
        errors: Iterator[ValidationError] = validator.iter_errors()
        for error in errors:
            if isinstance(error, DuplicateOperationIDError):
                continue  # reported by _operations, with the line of each duplicate
            error = _deepest(error)
            path: list[str | int] = list(error.absolute_path)
            if path and path[0] not in _ROOT_KEYS:
                path = []  # a semantic check's path relative to some schema: unplaceable
            if not path and (m := _MESSAGE_PATH.search(error.message)):
                path = ["paths", m.group(2), m.group(1)]
            message = error.message
            if message in reported:
                continue  # the semantic checks repeat some schema findings
            reported.add(message)
            spot.add(path, _key(path), message)
    except ValidatorDetectError:
        spot.add(("openapi",), "openapi", "not an OpenAPI version the validator knows")
    except Exception as exc:  # the validator's own failure must not hide the file's name
        if not reported:  # after real findings, a crash on the same broken shape adds nothing
            spot.add((), "", f"the OpenAPI validator failed: {type(exc).__name__}: {exc}")


def _deepest(error: ValidationError) -> ValidationError:
    """For `anyOf`/`oneOf` failures, the sub-error that got furthest into the document."""
    while error.context:
        error = max(error.context, key=lambda e: len(e.absolute_path))
    return error


def _key(path: JsonPath) -> str:
    return ".".join(str(part) for part in path)


def _operations(data: dict[str, Any], file: str, spot: _Locator) -> list[Operation]:
    operations: list[Operation] = []
    seen: dict[str, str] = {}
    paths = data.get("paths")
    if not isinstance(paths, dict):
        if "paths" not in data:
            spot.add((), "paths", "is required: the operations are the application's routes")
        return operations
    bases: dict[tuple[str, ...], str | None] = {}
    for template, item in paths.items():
        if not isinstance(item, dict):
            continue
        where: tuple[str, ...] = ("paths", template)
        if "$ref" in item:
            spot.add(
                (*where, "$ref"),
                _key((*where, "$ref")),
                "path item references are not followed: write the operations under the path itself",
            )
            continue
        if not _SAFE_TEMPLATE.match(template) or any(
            segment in (".", "..") for segment in template.split("/")
        ):
            spot.add(
                where,
                _key(where),
                "a path is '/segment/{param}/...' with no empty "
                "segment, dot segment or character the gateway refuses in a URL",
            )
            continue
        for key in _OPERATION_KEYS:
            op = item.get(key)
            if not isinstance(op, dict):
                continue
            at = (*where, key)
            if key == "trace":
                spot.add(at, _key(at), "TRACE requests are refused by the gateway: remove it")
                continue
            service = op.get("operationId")
            if not isinstance(service, str) or not service:
                spot.add(
                    at,
                    _key(at),
                    "operationId is required: it is the service name that "
                    "policies, limits and logs use",
                )
                continue
            if not _SERVICE.match(service):
                spot.add(
                    (*at, "operationId"),
                    _key((*at, "operationId")),
                    f"{service!r}: an "
                    "operationId the gateway routes is letters, digits, '_', '.' and '-'",
                )
                continue
            if service in seen:
                spot.add(
                    (*at, "operationId"),
                    _key((*at, "operationId")),
                    f"duplicate operationId {service!r} (first at {seen[service]})",
                )
                continue
            seen[service] = f"{file}:{spot.line(at)}"
            if op.get("servers"):
                servers_at: tuple[str, ...] = (*at, "servers")
            elif item.get("servers"):
                servers_at = (*where, "servers")
            else:
                servers_at = ("servers",)
            if servers_at not in bases:
                bases[servers_at] = _base_path(_get(data, servers_at), servers_at, spot)
            base = bases[servers_at]
            if base is None:
                continue
            tags = op.get("tags") or []
            policy = op.get("x-aup-policy")
            if policy is not None and (not isinstance(policy, str) or not policy):
                spot.add(
                    (*at, "x-aup-policy"),
                    _key((*at, "x-aup-policy")),
                    "must be the name of a policy",
                )
                policy = None
            operations.append(
                Operation(
                    method=key.upper(),
                    template=template,
                    path=base + template if template != "/" or not base else base,
                    service=service,
                    tags=tuple(str(tag) for tag in tags if isinstance(tag, str)),
                    policy=policy,
                    source=seen[service],
                    policy_source=f"{file}:{spot.line((*at, 'x-aup-policy'))}",
                )
            )
    return operations


def _get(data: Any, path: Sequence[str]) -> Any:
    for part in path:
        data = data.get(part) if isinstance(data, dict) else None
    return data


def _base_path(servers: Any, at: JsonPath, spot: _Locator) -> str | None:
    """The path part of the servers' URLs ('' for none or '/'); every server must agree,
    because the gateway forwards to the one upstream of its application."""
    if not isinstance(servers, list) or not servers:
        return ""
    bases: set[str] = set()
    for server in servers:
        if not isinstance(server, dict) or not isinstance(server.get("url"), str):
            continue
        url = str(server["url"])
        variables = server.get("variables")
        for name, variable in (variables if isinstance(variables, dict) else {}).items():
            if isinstance(variable, dict):
                url = url.replace("{" + name + "}", str(variable.get("default", "")))
        bases.add(urlsplit(url).path.rstrip("/"))
    if len(bases) > 1:
        spot.add(
            at,
            _key(at),
            f"these servers have different base paths ({', '.join(sorted(bases))})"
            ": the gateway forwards to one upstream, so they must agree",
        )
        return None
    base = bases.pop() if bases else ""
    if base and (not base.startswith("/") or not _SAFE_TEMPLATE.match(base) or "{" in base):
        spot.add(at, _key(at), f"the servers' base path {base!r} is not an absolute path")
        return None
    return base


def _specificity(path: str) -> tuple[int, ...]:
    """Sort key: per segment, literal before templated (OpenAPI: concrete paths match first)."""
    return tuple(1 if "{" in segment else 0 for segment in path.split("/"))
