"""The caller's own AUP status, free of charge: `GET /aup/v1/status` (JSON) and its SOAP form
`POST /sst/aup/RetrieveAUPStatus_AUPv1_AP` (XML, schema in status.wsdl), on the data listener.

What it answers, for the identity of the verified client certificate and never any other: the
policies that apply to it (the access list and its overrides respected), and for each service
with live state in the store its calls left, `retry_after`, `locked_until` and whether early
retries reset the wait; `application=` / `service=` narrow it to one (then the state is reported
even when empty). docs/status.md is the reference.

It only reads the limiter (`peek`, `keys`): a status request is never a call and never moves a
lockout. Its own guard is a limiter decision on a key of the reserved application `aup`
(`GUARD`, per identity, shared by every replica through the store); over it, 429.

This module also owns what the admin `explain` shares with it: `method_for` (the method a
service's calls use) and `key_view` (a key's state as calls left, lock and the next call).
"""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import Iterable
from dataclasses import dataclass
from importlib.resources import files
from typing import Any, Literal

from gateway.config.policy import Policy, PolicySet
from gateway.config.settings import RESERVED_APPLICATION, Application, Settings
from gateway.edge.connection import send_continue
from gateway.edge.http1 import Request
from gateway.edge.identity import ClientIdentity
from gateway.errors import ErrorCode, StoreUnavailable
from gateway.limiter.base import KeyState, Rate, identity_key_prefix, limiter_key
from gateway.limiter.fallback import ResilientLimiter
from gateway.proxy import faults
from gateway.proxy.xmlsafe import MalformedXml, UnsafeXml, read_operation

StatusForm = Literal["json", "soap"]

STATUS_PATH = "/aup/v1/status"
SOAP_SERVICE = "RetrieveAUPStatus_AUPv1_AP"
SOAP_PATH = f"/sst/{RESERVED_APPLICATION}/{SOAP_SERVICE}"
SOAP_OPERATION = "RetrieveAUPStatus"
STATUS_NS = "urn:aup-gateway:status:v1"
WSDL_FILE = "status.wsdl"

# A few per second per identity, on every replica together: enough for a client that polls
# while it waits, too little to turn the endpoint into a load on the store.
GUARD = Rate(limit=5, per=1.0)
GUARD_POLICY = "aup-status"
GUARD_SERVICE = "status"  # the guard's key: limiter_key(identity, "aup", "status")
MAX_LISTED = 200  # live keys listed at most per answer
MAX_BODY = 16 * 1024  # a status request is a handful of elements
_QUERY_NAMES = frozenset({"application", "service"})
_LENGTHS = frozenset({len(STATUS_PATH), len(SOAP_PATH)})


# The service name a status request is logged and counted under (metrics, access log).
SERVICE_NAMES: dict[StatusForm, str] = {"json": GUARD_SERVICE, "soap": SOAP_SERVICE}


def status_form(path: str) -> StatusForm | None:
    """Which status form a request path asks for (case-insensitive, as application names are)."""
    if len(path) not in _LENGTHS:  # every request passes here: the cheap test first
        return None
    lower = path.lower()
    if lower == STATUS_PATH:
        return "json"
    if lower == SOAP_PATH.lower():
        return "soap"
    return None


def method_for(
    app: Application, service: str, policies: PolicySet, given: str | None = None
) -> str:
    """The method a service's calls use: SOAP is POST; a REST service its OpenAPI operation's
    (an operationId names exactly one method) or its route's method."""
    if given:
        return given.upper()
    if app.protocol == "soap":
        return "POST"
    spec = policies.specs.get(app.name)
    operation = spec.by_service.get(service) if spec is not None else None
    if operation is not None:
        return operation.method
    route = next((r for r in app.routes if r.service == service), None)
    return route.method if route else "GET"


@dataclass(frozen=True, slots=True)
class KeyView:
    """One key's state read for people: what the next call would meet."""

    calls_in_window: int
    calls_left: int  # as `r` in the RateLimit header of an allowed call
    locked_until: float  # epoch seconds, 0 when not locked
    retry_after: float  # seconds until a call would be allowed, 0 when one would be now
    now: float  # the store's time of the read
    allowed_now: bool


def key_view(rate: Rate, state: KeyState) -> KeyView:
    locked = state.locked_until > state.now
    left = 0 if locked else max(rate.limit - state.calls_in_window, 0)
    return KeyView(
        state.calls_in_window,
        left,
        state.locked_until if locked else 0.0,
        state.retry_after,
        state.now,
        not locked and left > 0,
    )


# --- the report --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PolicyFacts:
    name: str
    application: str
    services: tuple[str, ...]
    methods: tuple[str, ...] | None
    mode: str
    rate: Rate | None  # None: the identity is exempt
    override: Literal["exempt", "negotiated"] | None


@dataclass(frozen=True, slots=True)
class ServiceFacts:
    application: str
    service: str
    policy: str | None
    mode: str | None
    rate: Rate | None  # None: no policy limits this service for the caller
    view: KeyView | None


@dataclass(frozen=True, slots=True)
class Report:
    identity: str
    cn: str
    now: float
    store: str
    store_state: str
    policies: tuple[PolicyFacts, ...]
    services: tuple[ServiceFacts, ...]


class _Refused(Exception):
    def __init__(self, status: int, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


class StatusService:
    """Answers status requests for one Gateway; `guard` may be changed (tests, tuning)."""

    def __init__(self, guard: Rate = GUARD) -> None:
        self.guard = guard
        self._wsdl: bytes | None = None

    async def answer(
        self,
        request: Request,
        form: StatusForm,
        identity: ClientIdentity,
        settings: Settings,
        policies: PolicySet,
        limiter: ResilientLimiter,
        request_id: str,
    ) -> faults.Fault:
        """The whole response (status, headers, body) for one status request."""
        content_type = request.headers.get("Content-Type", "")
        shape: faults.FaultShape = "problem"
        if form == "soap":
            shape = "soap12" if "soap+xml" in content_type else "soap11"
        if form == "soap" and request.method == "GET" and request.query_string == "wsdl":
            return faults.Fault(200, {"Content-Type": "text/xml; charset=utf-8"}, self.wsdl())
        try:
            if form == "json" and request.method != "GET":
                raise _Refused(405, ErrorCode.BAD_METHOD, f"{STATUS_PATH} answers GET only.")
            if form == "soap" and request.method != "POST":
                raise _Refused(405, ErrorCode.BAD_METHOD, f"{SOAP_PATH} answers POST only.")
            key_identity = identity.key(settings.identity)
            guard_key = limiter_key(key_identity, RESERVED_APPLICATION, GUARD_SERVICE)
            # "local" whatever the store mode: the guard is never a reason to refuse everyone.
            guard = await limiter.decide(guard_key, self.guard, on_error="local")
            if not guard.allowed:
                refused = faults.error_fault(
                    shape,
                    status=429,
                    code=ErrorCode.VIOLATION,
                    message=f"The status service answers at most {self.guard.limit} requests "
                    f"per identity in {faults.seconds_text(self.guard.per)} seconds. Please "
                    f"retry in {faults.retry_after_seconds(guard.retry_after)} seconds.",
                    application=RESERVED_APPLICATION,
                    service=SOAP_SERVICE if form == "soap" else GUARD_SERVICE,
                    request_id=request_id,
                    retry_after=guard.retry_after,
                    now=guard.now,
                )
                refused.headers.update(faults.rate_limit_headers(GUARD_POLICY, self.guard, guard))
                return refused
            envelope = ""
            if form == "json":
                asked = _asked_in_query(request)
            else:
                envelope, asked = await _asked_in_body(request)
            report = await _report(
                identity, key_identity, asked, settings, policies, limiter, guard.now
            )
        except _Refused as exc:
            return faults.error_fault(
                shape,
                status=exc.status,
                code=exc.code,
                message=exc.message,
                application=RESERVED_APPLICATION,
                service=SOAP_SERVICE if form == "soap" else None,
                request_id=request_id,
            )
        headers = {"Cache-Control": "no-store"}
        if form == "json":
            headers["Content-Type"] = "application/json"
            body = json.dumps(report_json(report), separators=(",", ":")).encode()
        else:
            soap12 = envelope == faults.SOAP12_NS
            headers["Content-Type"] = (
                faults.SOAP12_CONTENT_TYPE if soap12 else faults.SOAP11_CONTENT_TYPE
            )
            body = report_xml(report, soap12).encode()
        return faults.Fault(200, headers, body)

    def wsdl(self) -> bytes:
        if self._wsdl is None:
            self._wsdl = files("gateway.proxy").joinpath(WSDL_FILE).read_bytes()
        return self._wsdl


def _asked_in_query(request: Request) -> dict[str, str]:
    query = request.query
    unknown = sorted(set(query) - _QUERY_NAMES)
    if unknown:
        raise _Refused(
            400,
            ErrorCode.BAD_REQUEST,
            f"Unknown query parameter(s) {', '.join(unknown)[:200]}: the status answers for the "
            "certificate's own identity, narrowed by application= and service= only.",
        )
    return {name: query.get(name, "") for name in _QUERY_NAMES}


async def _asked_in_body(request: Request) -> tuple[str, dict[str, str]]:
    await send_continue(request)
    data = b""
    while len(data) <= MAX_BODY:
        chunk = await request.content.read(MAX_BODY + 1 - len(data))
        if not chunk:
            break
        data += chunk
    if len(data) > MAX_BODY:
        raise _Refused(
            413, ErrorCode.BODY_TOO_LARGE, f"A status request is at most {MAX_BODY} bytes."
        )
    try:
        operation = read_operation(data)
    except UnsafeXml:
        raise _Refused(
            400,
            ErrorCode.UNSAFE_XML,
            "The SOAP message declares a document type or entities; they are not allowed "
            "and were not processed.",
        ) from None
    except MalformedXml as exc:
        raise _Refused(
            400, ErrorCode.BAD_XML, f"The SOAP message is not well-formed: {exc}"
        ) from None
    if operation.name != SOAP_OPERATION:
        raise _Refused(
            400,
            ErrorCode.BAD_REQUEST,
            f"{SOAP_SERVICE} takes a {SOAP_OPERATION} element in namespace {STATUS_NS}.",
        )
    unknown = sorted(set(operation.fields) - _QUERY_NAMES)
    if unknown:
        raise _Refused(
            400,
            ErrorCode.BAD_REQUEST,
            f"Unknown element(s) {', '.join(unknown)[:200]} in {SOAP_OPERATION}: the status "
            "answers for the certificate's own identity, narrowed by application and service.",
        )
    return operation.envelope, {name: operation.fields.get(name, "") for name in _QUERY_NAMES}


async def _report(
    identity: ClientIdentity,
    key_identity: str,
    asked: dict[str, str],
    settings: Settings,
    policies: PolicySet,
    limiter: ResilientLimiter,
    now: float,
) -> Report:
    app_name, service = asked["application"], asked["service"]
    if service and not app_name:
        raise _Refused(400, ErrorCode.BAD_REQUEST, "service= needs application= as well.")
    if len(service) > 200 or "|" in service:
        raise _Refused(400, ErrorCode.BAD_REQUEST, "That is not a service name.")
    if app_name:
        app = settings.application(app_name)
        if app is None:
            raise _Refused(
                404,
                ErrorCode.UNKNOWN_APPLICATION,
                f"Application {app_name[:100]!r} is not served here.",
            )
        if not policies.allows(identity, app.name):
            raise _Refused(
                403,
                ErrorCode.NOT_PROVISIONED,
                f"{identity.cn or 'This identity'} is not provisioned for {app.name}.",
            )
        apps = [app]
    else:
        apps = [a for a in settings.applications.values() if policies.allows(identity, a.name)]
    names = {app.name for app in apps}
    try:
        if service:
            one = await _service_facts(apps[0], service, key_identity, settings, policies, limiter)
            services = [one]
        else:
            services = await _live_services(apps, key_identity, settings, policies, limiter)
    except StoreUnavailable as exc:
        raise _Refused(
            503, ErrorCode.STORE_UNAVAILABLE, f"The limiter store is unavailable: {exc}"
        ) from None
    found = [s for s in services if s is not None]
    return Report(
        identity=key_identity,
        cn=identity.cn,
        now=now,
        store=limiter.name,
        store_state=limiter.state,
        policies=tuple(
            _policy_facts(p, key_identity, settings)
            for p in policies.policies
            if p.application in names
        ),
        services=tuple(sorted(found, key=lambda s: (s.application, s.service))),
    )


def _mode(policy: Policy, settings: Settings) -> str:
    return "shadow" if settings.mode == "shadow" else policy.mode


def _policy_facts(policy: Policy, key_identity: str, settings: Settings) -> PolicyFacts:
    override = policy.overrides.get(key_identity)
    return PolicyFacts(
        policy.name,
        policy.application,
        policy.services,
        policy.methods,
        _mode(policy, settings),
        policy.rate_for(key_identity),
        None if override is None else ("exempt" if override.exempt else "negotiated"),
    )


async def _service_facts(
    app: Application,
    service: str,
    key_identity: str,
    settings: Settings,
    policies: PolicySet,
    limiter: ResilientLimiter,
    live_only: bool = False,
) -> ServiceFacts | None:
    """One service's facts; with `live_only`, None when nothing in the store affects it."""
    policy = policies.match(app.name, service, method_for(app, service, policies))
    rate = policy.rate_for(key_identity) if policy is not None else None
    if policy is None or rate is None:
        if live_only:
            return None  # state left from a removed policy or before an exemption: no effect
        if policy is None:
            return ServiceFacts(app.name, service, None, None, None, None)
        return ServiceFacts(app.name, service, policy.name, _mode(policy, settings), None, None)
    state = await limiter.peek(limiter_key(key_identity, app.name, service), rate)
    view = key_view(rate, state)
    if live_only and not view.calls_in_window and not view.locked_until:
        return None
    return ServiceFacts(app.name, service, policy.name, _mode(policy, settings), rate, view)


async def _live_services(
    apps: Iterable[Application],
    key_identity: str,
    settings: Settings,
    policies: PolicySet,
    limiter: ResilientLimiter,
) -> list[ServiceFacts | None]:
    by_name = {app.name: app for app in apps}
    prefix = identity_key_prefix(key_identity)
    wanted: list[tuple[Application, str]] = []
    for key in await limiter.keys(prefix, MAX_LISTED):
        app_name, bar, service = key[len(prefix) : -1].partition("|")
        app = by_name.get(app_name)
        # Only keys that are exactly this identity's. An identity whose name is this one, "|"
        # and more has keys with this prefix too; service names never hold "|", so its keys
        # are the ones whose service part does.
        if app is None or not bar or "|" in service:
            continue
        wanted.append((app, service))
    return list(
        await asyncio.gather(
            *(
                _service_facts(
                    app, service, key_identity, settings, policies, limiter, live_only=True
                )
                for app, service in wanted
            )
        )
    )


# --- rendering ---------------------------------------------------------------------------------


def _iso(epoch: float) -> str:
    return faults.iso_time(epoch)


def _wait(view: KeyView) -> int:
    """Whole seconds to wait, rounded up as Retry-After is; 0 when a call is allowed now."""
    return 0 if view.allowed_now else faults.retry_after_seconds(view.retry_after)


def report_json(report: Report) -> dict[str, Any]:
    return {
        "identity": report.identity,
        "cn": report.cn,
        "now": _iso(report.now),
        "store": report.store,
        "store_state": report.store_state,
        "policies": [
            {
                "name": p.name,
                "application": p.application,
                "services": list(p.services),
                "methods": list(p.methods) if p.methods else None,
                "mode": p.mode,
                "limit": p.rate.limit if p.rate else None,
                "per": p.rate.per if p.rate else None,
                "reset_on_early_retry": p.rate.reset_on_early_retry if p.rate else False,
                "override": p.override,
            }
            for p in report.policies
        ],
        "services": [_service_json(s) for s in report.services],
    }


def _service_json(s: ServiceFacts) -> dict[str, Any]:
    body: dict[str, Any] = {
        "application": s.application,
        "service": s.service,
        "policy": s.policy,
        "mode": s.mode,
        "limited": s.rate is not None,
    }
    if s.rate is None or s.view is None:
        return body
    view = s.view
    body.update(
        limit=s.rate.limit,
        per=s.rate.per,
        reset_on_early_retry=s.rate.reset_on_early_retry,
        calls_in_window=view.calls_in_window,
        calls_left=view.calls_left,
        retry_after=_wait(view),
        locked_until=_iso(view.locked_until) if view.locked_until else None,
        allowed_now=view.allowed_now,
    )
    return body


def _el(name: str, value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, float):
        text = repr(value) if math.isfinite(value) else "0"
    else:
        text = faults.xml_text(str(value))
    return f"<{name}>{text}</{name}>"


def report_xml(report: Report, soap12: bool) -> str:
    """The SOAP envelope answering RetrieveAUPStatus (element order: status.wsdl's schema)."""
    parts = [
        f'<RetrieveAUPStatusResponse xmlns="{STATUS_NS}">',
        _el("identity", report.identity),
        _el("cn", report.cn),
        _el("now", _iso(report.now)),
        _el("store", report.store),
        _el("storeState", report.store_state),
    ]
    for p in report.policies:
        parts.append("<policy>")
        parts += [_el("name", p.name), _el("application", p.application)]
        parts += [_el("service", pattern) for pattern in p.services]
        parts += [_el("method", method) for method in p.methods or ()]
        parts += [
            _el("mode", p.mode),
            _el("limit", p.rate.limit if p.rate else None),
            _el("per", p.rate.per if p.rate else None),
            _el("resetOnEarlyRetry", p.rate.reset_on_early_retry if p.rate else False),
            _el("override", p.override),
            "</policy>",
        ]
    for s in report.services:
        view = s.view if s.rate is not None else None
        parts += [
            "<serviceState>",
            _el("application", s.application),
            _el("service", s.service),
            _el("policy", s.policy),
            _el("mode", s.mode),
            _el("limited", s.rate is not None),
        ]
        if s.rate is not None and view is not None:
            parts += [
                _el("limit", s.rate.limit),
                _el("per", s.rate.per),
                _el("resetOnEarlyRetry", s.rate.reset_on_early_retry),
                _el("callsInWindow", view.calls_in_window),
                _el("callsLeft", view.calls_left),
                _el("retryAfter", _wait(view)),
                _el("lockedUntil", _iso(view.locked_until) if view.locked_until else None),
                _el("allowedNow", view.allowed_now),
            ]
        parts.append("</serviceState>")
    parts.append("</RetrieveAUPStatusResponse>")
    if soap12:
        start = f'<env:Envelope xmlns:env="{faults.SOAP12_NS}"><env:Body>'
        end = "</env:Body></env:Envelope>"
    else:
        start = f'<soapenv:Envelope xmlns:soapenv="{faults.SOAP11_NS}"><soapenv:Body>'
        end = "</soapenv:Body></soapenv:Envelope>"
    return '<?xml version="1.0" encoding="UTF-8"?>' + start + "".join(parts) + end
