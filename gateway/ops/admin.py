"""The admin listener: health, readiness, metrics, policies, key look-up and clearing, the ledger
and the ops page. It listens on its own port (loopback by default), never on the TLS port.

Authentication: when `admin.token` is set, every endpoint wants `Authorization: Bearer <token>`
and answers 401 without it, except three that reveal nothing: `/healthz` (liveness), `/readyz`
(its status code and a one-word status; the details need the token) and the ops pages' HTML
shells, `/ops` and `/ops/participant` (the data they fetch needs the token, which the pages read
from the URL fragment, `/ops#token=...`, so the token is never sent in a URL or written to an
access log). The page's "clear this lockout" action asks for the token again and sends it.

Endpoints:

    GET  /healthz                 200 while the process runs
    GET  /readyz                  200 ready (store reachable or in fallback: says which) |
                                  503 not ready (draining, or no policies loaded)
    GET  /metrics                 Prometheus text format
    GET  /policies                the loaded set: version, files, policies, last reload result
    POST /policies/reload         reload now (as SIGHUP does); 200 ok | 422 invalid (kept old)
    GET  /explain?identity=&application=&service=[&method=]
                                  which policy applies and the key's state now
    DELETE /keys?identity=&application=&service=[&reason=]   (also POST /keys/clear)
                                  clear one key's state: a support action, logged and ledgered
    GET  /ledger?identity=&application=&service=&since=&until=&limit=
                                  ledger episodes (docs/ledger.md), oldest first
    GET  /ops, /ops/data          the ops page and the JSON it refreshes from
    GET  /ops/participant?identity=, /ops/participant/data?identity=
                                  one participant's page: its ledger episodes and the live
                                  state of every key they name (the explain answer per key)
"""

from __future__ import annotations

import hmac
import logging
import os
from collections import Counter as Tally
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib.resources import files
from typing import TYPE_CHECKING, Any

from aiohttp import hdrs, web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from gateway.clock import wall_clock
from gateway.config.policy import Policy, PolicySet
from gateway.config.settings import Application
from gateway.edge.identity import ClientIdentity, normalise_dn
from gateway.errors import StoreUnavailable
from gateway.limiter.base import limiter_key
from gateway.ops.history import History
from gateway.ops.ledger import LedgerEntry, LedgerWriter, Query, parse_since, support_entry
from gateway.ops.metrics import GatewayMetrics
from gateway.ops.reload import PolicyReloader
from gateway.outcome import VIOLATIONS
from gateway.proxy.status import key_view, method_for

if TYPE_CHECKING:  # the admin side reads the gateway; only the server builds it
    from gateway.proxy.app import Gateway

support_log = logging.getLogger("gateway.support")
OPEN_PATHS = frozenset({"/healthz", "/readyz", "/ops", "/ops/participant", "/ops/common.js"})
OPS_WINDOW = 900.0  # the ops page's default look-back, seconds
OPS_ENTRIES = 5_000  # at most this many recent entries are aggregated per refresh
PARTICIPANT_EPISODES = 500  # the participant page shows this many most recent episodes
PARTICIPANT_KEYS = 20  # and the live state of at most this many of their keys


@dataclass
class AdminState:
    """What the admin endpoints look at: the gateway and its operational parts."""

    gateway: Gateway
    metrics: GatewayMetrics
    reloader: PolicyReloader
    ledger: LedgerWriter
    worker: int = 0
    draining: bool = False
    started: float = field(default_factory=wall_clock)
    history: History | None = None  # per-minute series of the last hour, for the ops page

    def store_status(self) -> dict[str, Any] | None:
        return dict(self.gateway.limiter.status())


STATE = web.AppKey("state", AdminState)


def create_admin_app(state: AdminState) -> web.Application:
    app = web.Application(middlewares=[_authenticate])
    app[STATE] = state
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/policies", policies)
    app.router.add_post("/policies/reload", reload_policies)
    app.router.add_get("/explain", explain)
    app.router.add_delete("/keys", clear_key)
    app.router.add_post("/keys/clear", clear_key)
    app.router.add_get("/ledger", ledger)
    app.router.add_get("/ops", ops_page)
    app.router.add_get("/ops/data", ops_data)
    app.router.add_get("/ops/participant", participant_page)
    app.router.add_get("/ops/participant/data", participant_data)
    app.router.add_get("/ops/common.js", common_script)
    app.on_response_prepare.append(_server_header)
    return app


async def _server_header(request: web.Request, response: web.StreamResponse) -> None:
    # The configured name, not aiohttp's default, which names the software and its version.
    response.headers[hdrs.SERVER] = request.app[STATE].gateway.settings.server_name


def _token_ok(request: web.Request) -> bool:
    token = request.app[STATE].gateway.settings.admin
    expected = token.token if token is not None else None
    if not expected:
        return True
    scheme, _, given = request.headers.get("Authorization", "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(
        given.strip().encode(), expected.encode()
    )


@web.middleware
async def _authenticate(request: web.Request, handler: Any) -> web.StreamResponse:
    if request.path not in OPEN_PATHS and not _token_ok(request):
        return web.json_response(
            {"error": "unauthorized", "detail": "send Authorization: Bearer <admin.token>"},
            status=401,
            headers={"WWW-Authenticate": 'Bearer realm="aup-gateway-admin"'},
        )
    response: web.StreamResponse = await handler(request)
    return response


async def healthz(request: web.Request) -> web.Response:
    state = request.app[STATE]
    return web.json_response({"status": "ok", "pid": os.getpid(), "worker": state.worker})


async def readyz(request: web.Request) -> web.Response:
    state = request.app[STATE]
    gateway = state.gateway
    await gateway.limiter.probe()  # an idle gateway in fallback notices the store is back
    store = state.store_status()
    policy_set: PolicySet | None = gateway.policies
    if state.draining:
        status, code = "draining", 503
    elif policy_set is None:
        status, code = "no policies loaded", 503
    elif store is not None and store.get("state") == "fallback":
        status, code = "ready (store fallback)", 200
    else:
        status, code = "ready", 200
    if not _token_ok(request):
        return web.json_response({"status": status}, status=code)
    last = state.reloader.last
    body = {
        "status": status,
        "worker": state.worker,
        "policies": {
            "version": policy_set.version if policy_set else None,
            "count": len(policy_set.policies) if policy_set else 0,
            "last_reload": last.as_dict(),
        },
        "store": store if store is not None else {"store": gateway.limiter.name, "state": "ok"},
        "ledger": state.ledger.status(),
    }
    return web.json_response(body, status=code)


async def metrics(request: web.Request) -> web.Response:
    registry = request.app[STATE].metrics.registry
    return web.Response(
        body=generate_latest(registry), headers={"Content-Type": CONTENT_TYPE_LATEST}
    )


def policy_view(policy: Policy) -> dict[str, Any]:
    rate = policy.rate
    return {
        "name": policy.name,
        "application": policy.application,
        "services": list(policy.services),
        "methods": list(policy.methods) if policy.methods else None,
        "tags": list(policy.tags) if policy.tags else None,
        "limit": rate.limit,
        "per": rate.per,
        "reset_on_early_retry": rate.reset_on_early_retry,
        "mode": policy.mode,
        "message": policy.message,
        "on_store_error": policy.on_store_error,
        "source": policy.source,
        "overrides": [
            {
                "identity": o.identity,
                "exempt": o.exempt,
                "limit": o.rate.limit if o.rate else None,
                "per": o.rate.per if o.rate else None,
            }
            for o in policy.overrides.values()
        ],
    }


def policies_view(state: AdminState) -> dict[str, Any]:
    current = state.gateway.policies
    return {
        "version": current.version,
        "mode": state.gateway.settings.mode,
        "directory": str(state.gateway.settings.policies),
        "files": [str(path) for path in current.files],
        "loaded_at": round(state.reloader.last_ok.at, 3),
        "policies": [policy_view(p) for p in current.policies],
        "access": None
        if current.access is None
        else [
            {
                "name": rule.name,
                "source": rule.source,
                "applications": sorted(rule.applications) if rule.applications else None,
                "subjects": sorted(rule.subjects),
                "organisations": sorted(rule.organisations),
                "patterns": [pattern.pattern for pattern in rule.patterns],
            }
            for rule in current.access.rules
        ],
        "last_reload": state.reloader.last.as_dict(),
    }


async def policies(request: web.Request) -> web.Response:
    return web.json_response(policies_view(request.app[STATE]))


async def reload_policies(request: web.Request) -> web.Response:
    result = await request.app[STATE].reloader.reload("admin")
    return web.json_response(result.as_dict(), status=200 if result.ok else 422)


class _BadQuery(Exception):
    pass


@dataclass(frozen=True)
class _Key:
    identity: str
    application: Application
    service: str
    key: str


def _key_from_query(state: AdminState, request: web.Request) -> _Key:
    """The limiter key named by ?identity=&application=&service=, as the handler builds it."""
    query = request.query
    missing = [name for name in ("identity", "application", "service") if not query.get(name)]
    if missing:
        raise _BadQuery(f"missing query parameter(s): {', '.join(missing)}")
    return _key_from(state, query["identity"], query["application"], query["service"])


def _key_from(state: AdminState, identity: str, application: str, service: str) -> _Key:
    settings = state.gateway.settings
    app = settings.application(application)
    if app is None:
        raise _BadQuery(
            f"application {application!r} is not configured "
            f"(known: {', '.join(settings.applications)})"
        )
    identity = identity.strip()
    if settings.identity == "subject":
        if "=" not in identity:
            raise _BadQuery(
                "identity: keys are by subject DN here (identity: subject); give "
                "the DN, e.g. CN=jdoex1234,OU=people,O=CAISO,C=US"
            )
        try:
            identity = normalise_dn(identity)
        except ValueError as exc:
            raise _BadQuery(f"identity: {exc}") from None
    elif settings.identity == "fingerprint":
        identity = identity.replace(":", "").lower()
    return _Key(identity, app, service, limiter_key(identity, app.name, service))


def _iso(epoch: float) -> str | None:
    return datetime.fromtimestamp(epoch, UTC).isoformat() if epoch else None


async def explain(request: web.Request) -> web.Response:
    state = request.app[STATE]
    try:
        named = _key_from_query(state, request)
    except _BadQuery as exc:
        return web.json_response({"error": str(exc)}, status=400)
    status, body = await explain_view(state, named, request.query.get("method"))
    return web.json_response(body, status=status)


async def explain_view(
    state: AdminState, named: _Key, method_given: str | None
) -> tuple[int, dict[str, Any]]:
    """Which policy applies to the key and its state now: (HTTP status, the answer)."""
    gateway = state.gateway
    current = gateway.policies
    method = method_for(named.application, named.service, current, method_given)
    policy = current.match(named.application.name, named.service, method)
    body: dict[str, Any] = {
        "identity": named.identity,
        "application": named.application.name,
        "service": named.service,
        "method": method,
        "key": named.key,
        "policies_version": current.version,
        "provisioned": _provisioned(current, named),
    }
    if policy is None:
        body.update(policy=None, applies="no policy matches: calls are forwarded unlimited")
        return 200, body
    rate = policy.rate_for(named.identity)
    override = policy.overrides.get(named.identity)
    shadow = policy.mode == "shadow" or gateway.settings.mode == "shadow"
    body["policy"] = {
        **policy_view(policy),
        "effective_mode": "shadow" if shadow else "enforce",
        "override": None if override is None else ("exempt" if override.exempt else "negotiated"),
    }
    if rate is None:
        body.update(applies="exempt: calls are forwarded and never counted", state=None)
        return 200, body
    body["rate"] = {
        "limit": rate.limit,
        "per": rate.per,
        "reset_on_early_retry": rate.reset_on_early_retry,
    }
    try:
        key_state = await gateway.limiter.peek(named.key, rate)
    except StoreUnavailable as exc:
        body["error"] = f"store unavailable: {exc}"
        return 503, body
    view = key_view(rate, key_state)  # the same reading the caller's own status gives
    allowed_now = view.allowed_now
    body["state"] = {
        "calls_in_window": view.calls_in_window,
        "remaining": view.calls_left,
        "locked_until": view.locked_until or None,
        "locked_until_iso": _iso(view.locked_until) if view.locked_until else None,
        "retry_after": round(view.retry_after, 6),
        "now": view.now,
        "allowed_now": allowed_now,
    }
    body["applies"] = (
        "the next call would be allowed"
        if allowed_now
        else f"the next call would be {'shadow-recorded' if shadow else 'rejected'}; "
        f"retry after {key_state.retry_after:.3f}s"
        + (" (early retries reset the timer)" if rate.reset_on_early_retry else "")
    )
    return 200, body


async def clear_key(request: web.Request) -> web.Response:
    state = request.app[STATE]
    try:
        named = _key_from_query(state, request)
    except _BadQuery as exc:
        return web.json_response({"error": str(exc)}, status=400)
    reason = request.query.get("reason", "")
    peer = request.remote or "unknown"
    try:
        cleared = await state.gateway.limiter.clear(named.key)
    except StoreUnavailable as exc:
        support_log.error(
            "support action failed: clear key %s for %s (%s): %s",
            named.key,
            peer,
            reason or "no reason given",
            exc,
        )
        return web.json_response(
            {"key": named.key, "cleared": False, "error": str(exc)}, status=503
        )
    support_log.warning(
        "support action: cleared key %s (identity=%s application=%s "
        "service=%s existed=%s) requested from %s: %s",
        named.key,
        named.identity,
        named.application.name,
        named.service,
        cleared,
        peer,
        reason or "no reason given",
    )
    state.metrics.support_action("clear_key")
    state.ledger.record(
        support_entry(
            named.identity,
            named.application.name,
            named.service,
            f"admin:{peer}",
            state.gateway.clock(),
            reason,
        )
    )
    return web.json_response({"key": named.key, "cleared": cleared})


def _attribute(dn: str, wanted: str) -> str:
    for part in dn.split(","):
        name, _, value = part.partition("=")
        if name == wanted:
            return value
    return ""


def _provisioned(current: PolicySet, named: _Key) -> bool | None:
    """Whether the access list lets this identity call the application; None when the key is
    not a subject DN (a fingerprint or CN does not carry the organisation the rules may use)."""
    if current.access is None:
        return True
    if "=" not in named.identity:
        return None
    identity = ClientIdentity(
        named.identity, _attribute(named.identity, "CN"), _attribute(named.identity, "O"), "", ""
    )
    return current.allows(identity, named.application.name)


async def ledger(request: web.Request) -> web.Response:
    state = request.app[STATE]
    query = request.query
    try:
        since = parse_since(query["since"]) if query.get("since") else None
        until = parse_since(query["until"]) if query.get("until") else None
        limit = min(int(query.get("limit", "100")), 10_000)
    except ValueError as exc:
        return web.json_response({"error": str(exc)}, status=400)
    await state.ledger.flush()  # include what is still queued
    try:
        entries = await state.ledger.sink.read(
            Query(
                query.get("identity"),
                since,
                until,
                limit,
                query.get("application"),
                query.get("service"),
            )
        )
    except Exception as exc:  # the store behind the ledger is away
        return web.json_response({"error": f"ledger unavailable: {exc}"}, status=503)
    return web.json_response(
        {"where": state.ledger.sink.where, "entries": [e.as_dict() for e in entries]}
    )


async def ops_page(request: web.Request) -> web.Response:
    return _static_page("ops.html")


async def participant_page(request: web.Request) -> web.Response:
    return _static_page("participant.html")


async def common_script(request: web.Request) -> web.Response:
    page = files("gateway.ops").joinpath("static", "common.js").read_bytes()
    return web.Response(
        body=page,
        content_type="text/javascript",
        charset="utf-8",
        headers={"Cache-Control": "no-store"},
    )


def _static_page(name: str) -> web.Response:
    page = files("gateway.ops").joinpath("static", name).read_bytes()
    return web.Response(
        body=page,
        content_type="text/html",
        charset="utf-8",
        headers={
            "Cache-Control": "no-store",
            "Content-Security-Policy": "default-src 'self'; "
            "style-src 'unsafe-inline'; script-src 'self' 'unsafe-inline'",
        },
    )


def ops_view(state: AdminState, entries: list[LedgerEntry], window: float) -> dict[str, Any]:
    """Recent ledger entries aggregated per participant and service, plus the gateway's state."""
    cells: dict[tuple[str, str, str], dict[str, Any]] = {}
    offenders: Tally[str] = Tally()
    names: dict[str, str] = {}
    violations = [e for e in entries if e.decision in VIOLATIONS]
    for entry in violations:  # newest first
        who = entry.identity or entry.cn
        names.setdefault(who, entry.cn or who)
        cell = cells.get((who, entry.application, entry.service))
        if cell is None:
            cell = cells[(who, entry.application, entry.service)] = {
                "identity": who,
                "cn": entry.cn,
                "application": entry.application,
                "service": entry.service,
                "policy": entry.policy,
                "rejected": 0,
                "shadow": 0,
                "last": entry.time,
                "retry_after": entry.retry_after,
                "episodes": 0,
            }
        cell[entry.decision] += entry.count
        cell["episodes"] += 1
        offenders[who] += entry.count
    current = state.gateway.policies
    return {
        "now": state.gateway.clock(),
        "window": window,
        "worker": state.worker,
        "mode": state.gateway.settings.mode,
        "applications": list(state.gateway.settings.applications),
        "store": state.store_status() or {"store": state.gateway.limiter.name, "state": "ok"},
        "ledger": state.ledger.status(),
        "total": sum(e.count for e in violations),
        "violations": sorted(
            cells.values(), key=lambda c: (-(c["rejected"] + c["shadow"]), -c["last"])
        ),
        "offenders": [
            {"identity": who, "cn": names[who], "count": count}
            for who, count in offenders.most_common(10)
        ],
        "recent": [e.as_dict() for e in violations[:20]],
        "policies": {
            "version": current.version,
            "policies": [policy_view(p) for p in current.policies],
        },
        "last_reload": state.reloader.last.as_dict(),
        "history": state.history.series() if state.history is not None else None,
    }


async def ops_data(request: web.Request) -> web.Response:
    state = request.app[STATE]
    try:
        window = float(request.query.get("window", OPS_WINDOW))
    except ValueError:
        return web.json_response({"error": "window must be a number of seconds"}, status=400)
    await state.ledger.flush()
    try:
        entries = await state.ledger.sink.recent(window, OPS_ENTRIES)
    except Exception as exc:  # the store behind the ledger is away: show the rest
        state_view = ops_view(state, [], window)
        state_view["error"] = f"ledger unavailable: {exc}"
        return web.json_response(state_view, headers={"Cache-Control": "no-store"})
    return web.json_response(
        ops_view(state, entries, window), headers={"Cache-Control": "no-store"}
    )


async def participant_data(request: web.Request) -> web.Response:
    """One participant's episodes from the ledger (newest first) and, for each key those
    episodes name, the explain answer now (its policy, whether it is locked and until when)."""
    state = request.app[STATE]
    identity = request.query.get("identity", "").strip()
    if not identity:
        return web.json_response({"error": "missing query parameter: identity"}, status=400)
    await state.ledger.flush()
    try:
        entries = await state.ledger.sink.read(Query(identity, limit=PARTICIPANT_EPISODES))
    except Exception as exc:  # the store behind the ledger is away
        return web.json_response({"error": f"ledger unavailable: {exc}"}, status=503)
    entries.reverse()
    keys = list(dict.fromkeys((e.identity, e.application, e.service) for e in entries))
    live: list[dict[str, Any]] = []
    for who, application, service in keys[:PARTICIPANT_KEYS]:
        try:
            named = _key_from(state, who, application, service)
        except _BadQuery as exc:  # e.g. the application left the configuration
            live.append(
                {"identity": who, "application": application, "service": service, "error": str(exc)}
            )
            continue
        live.append((await explain_view(state, named, None))[1])
    return web.json_response(
        {
            "identity": identity,
            "now": state.gateway.clock(),
            "where": state.ledger.sink.where,
            "episodes": [e.as_dict() for e in entries],
            "live": live,
        },
        headers={"Cache-Control": "no-store"},
    )
