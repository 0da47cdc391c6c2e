"""The data plane: one request handler that reads top to bottom along the flow

    identity -> route -> policy -> limiter decision -> forward upstream | fault

(or, for the caller's own status, identity -> proxy/status.py, which only reads the limiter).

`Gateway` owns the runtime state (settings, router, the current PolicySet, the limiter and the
upstream pools). It is served by the data plane's own HTTP/1.1 protocol (edge/connection.py),
which hands it an edge/http1.py `Request` and takes back a `Response` (or a `StreamResponse`
already written).
"""

from __future__ import annotations

import itertools
import logging
import os
import time
from collections.abc import Iterator

from gateway.clock import Clock, wall_clock
from gateway.config.policy import Policy, PolicySet, load_policies
from gateway.config.settings import RESERVED_APPLICATION, Application, Settings
from gateway.edge.connection import expects_continue, send_continue
from gateway.edge.http1 import EMPTY, Request, Response, StreamResponse
from gateway.edge.identity import ClientIdentity, IdentityCache
from gateway.errors import ErrorCode, UpstreamError
from gateway.limiter.base import Decision, Limiter, Rate, limiter_key
from gateway.limiter.fallback import DEGRADED, ResilientLimiter
from gateway.outcome import Observer, Outcome
from gateway.proxy import faults
from gateway.proxy.forward import BodyTooLarge, Upstreams
from gateway.proxy.replay import Replay, Templates
from gateway.proxy.routing import NoRoute, Router, Target, route_by_body
from gateway.proxy.status import SERVICE_NAMES, StatusService, status_form

log = logging.getLogger("gateway")


class Gateway:
    """Holds what a request needs; `policies` is swapped whole on reload."""

    def __init__(
        self,
        settings: Settings,
        limiter: Limiter,
        policies: PolicySet | None = None,
        clock: Clock = wall_clock,
    ) -> None:
        self.settings = settings
        self.clock = clock  # the wall clock for the data plane: the server passes it in
        self.router = Router(settings)
        self.policies = policies if policies is not None else load_policies(settings)
        # Always behind the store-failure policy, so a policy's own on_store_error applies.
        self.limiter = (
            limiter
            if isinstance(limiter, ResilientLimiter)
            else ResilientLimiter(limiter, mode=settings.on_store_error)
        )
        self.upstreams = Upstreams(settings)
        self.identities = IdentityCache()
        self.next_request_id = request_ids().__next__
        self._violations = faults.ViolationFaults()
        self._replays = Templates()  # rejections' answers, as repeated requests get them
        self.status = StatusService()  # /aup/v1/status and its SOAP form: never a call
        # Called with every finished call's Outcome: access log, metrics, ledger (ops/server.py
        # adds them). They must not block; anything slow is queued by the observer itself.
        self.observers: list[Observer] = []

    async def start(self) -> None:
        await self.upstreams.start()

    async def close(self) -> None:
        await self.upstreams.close()
        await self.limiter.close()

    async def handle(self, request: Request) -> StreamResponse:
        started = time.perf_counter()
        outcome = Outcome(self.next_request_id(), None, method=request.method)
        try:
            response = await self._handle(request, outcome)
            if expects_continue(request) and not request.continued:
                response.force_close()  # answered before `100 Continue`: the body never comes
            outcome.status = response.status
            return response
        finally:
            outcome.elapsed = time.perf_counter() - started
            for observe in self.observers:
                observe(outcome)

    async def _handle(self, request: Request, outcome: Outcome) -> StreamResponse:
        content_type = request.headers.get("Content-Type", "")
        identity = outcome.identity = self._identity(request)
        if identity is None:  # the connection layer answers these first; a last line of defence
            return self._error(
                None,
                content_type,
                outcome,
                403,
                ErrorCode.NO_CERTIFICATE,
                "A verified client certificate is required.",
            )

        path, _, query = request.raw_path.partition("?")  # the query as sent, never decoded
        policies = self.policies  # read once: a reload swaps the whole set (OpenAPI routes too)
        form = status_form(path)
        if form is not None:
            outcome.application, outcome.service = RESERVED_APPLICATION, SERVICE_NAMES[form]
            outcome.decision = "status"
            answer = await self.status.answer(
                request,
                form,
                identity,
                self.settings,
                policies,
                self.limiter,
                outcome.request_id,
            )
            return self._respond(answer, outcome.request_id)
        target = self.router.route(
            request.method,
            path,
            query,
            request.headers.get("SOAPAction"),
            content_type,
            policies.specs,
        )
        if isinstance(target, NoRoute):
            outcome.decision = "refused"
            return self._error(
                target.application,
                content_type,
                outcome,
                target.status,
                target.code,
                target.message,
            )
        app = target.application
        outcome.application, outcome.service = app.name, target.service
        if not policies.allows(identity, app.name):
            outcome.decision = "refused"
            return self._error(
                app,
                content_type,
                outcome,
                403,
                ErrorCode.NOT_PROVISIONED,
                f"{identity.cn or 'This identity'} is not provisioned for {app.name}.",
            )
        prefix = b""  # the start of the body, when the service had to be read from it
        if target.from_body:
            await send_continue(request)  # the service is in the body: it must come first
            routed, prefix = await route_by_body(target, content_type, request.content.read)
            if isinstance(routed, NoRoute):
                outcome.decision = "refused"
                return self._error(
                    app, content_type, outcome, routed.status, routed.code, routed.message
                )
            target = routed
            outcome.service = target.service

        policy = policies.match(app.name, target.service, request.method)
        rate_headers: dict[str, str] = {}
        if policy is not None:
            decided = await self._decide(policy, identity, target, content_type, outcome)
            if isinstance(decided, StreamResponse):
                if outcome.decision == "rejected" and not expects_continue(request):
                    decided.replay = self._replay(request, policies, policy, target, outcome)
                return decided
            rate_headers = decided

        max_body = app.max_body if app.max_body is not None else self.settings.limits.max_body
        forwarded = time.perf_counter()
        try:
            response = await self.upstreams.forward(
                request,
                app,
                target.upstream_path,
                identity,
                outcome.request_id,
                max_body,
                prefix,
                rate_headers,
            )
        except BodyTooLarge:
            too_large = self._error(
                app,
                content_type,
                outcome,
                413,
                ErrorCode.BODY_TOO_LARGE,
                f"The request body is larger than {max_body} bytes.",
            )
            too_large.force_close()  # "Connection: close": the rest of the body is not read
            return too_large
        except UpstreamError as exc:
            outcome.upstream_failed = exc.status >= 500
            if exc.status == 504:
                code = ErrorCode.UPSTREAM_TIMEOUT
            elif exc.status >= 500:
                code = ErrorCode.UPSTREAM_UNAVAILABLE
            else:
                code = ErrorCode.BAD_REQUEST
            return self._error(app, content_type, outcome, exc.status, code, exc.reason)
        outcome.upstream_status = response.status
        outcome.upstream_latency = time.perf_counter() - forwarded
        return response

    async def _decide(
        self,
        policy: Policy,
        identity: ClientIdentity,
        target: Target,
        content_type: str,
        outcome: Outcome,
    ) -> Response | dict[str, str]:
        """Ask the limiter; the fault to send when the call is refused, else the `RateLimit-Policy`
        and `RateLimit` headers for the forwarded answer (none when the identity is exempt)."""
        outcome.policy = policy.name
        key_identity = identity.key(self.settings.identity)
        rate = policy.rate_for(key_identity)
        if rate is None:
            outcome.decision = "exempt"
            return {}
        key = outcome.key = limiter_key(key_identity, target.application.name, target.service)
        asked = time.perf_counter()
        decision: Decision
        decision, source = await self.limiter.decide_with_source(
            key, rate, on_error=policy.on_store_error
        )
        outcome.fallback = source in DEGRADED
        outcome.store_latency = time.perf_counter() - asked
        outcome.store_time = decision.now
        if decision.allowed:
            outcome.decision = "allowed"
            return faults.rate_limit_headers(policy.name, rate, decision)
        outcome.retry_after = decision.retry_after
        if source == "deny":  # the store is down and the policy says deny: not a violation
            outcome.decision = "refused"
            return self._error(
                target.application,
                content_type,
                outcome,
                503,
                ErrorCode.STORE_UNAVAILABLE,
                "The rate-limit store is unavailable and this service is refused until it "
                f"answers again; retry in {faults.retry_after_seconds(decision.retry_after)} "
                "seconds.",
                retry_after=decision.retry_after,
            )
        if policy.mode == "shadow" or self.settings.mode == "shadow":
            outcome.decision = "shadow"
            # The headers say what enforcement would: r=0 and the wait, so a participant sees
            # during a shadow roll-out that it would be refused. No Retry-After: nothing failed.
            headers = faults.rate_limit_headers(policy.name, rate, decision)
            del headers["Retry-After"]
            return headers
        outcome.decision = "rejected"
        return self._violation(policy, rate, decision, target, content_type, outcome.request_id)

    def _violation(
        self,
        policy: Policy,
        rate: Rate,
        decision: Decision,
        target: Target,
        content_type: str,
        request_id: str,
    ) -> Response:
        app = target.application
        fault = self._violations.fault(
            faults.shape_for(app, content_type),
            policy_name=policy.name,
            message_template=policy.message,
            rate=rate,
            decision=decision,
            application=app.name,
            service=target.service,
            request_id=request_id,
            status=app.fault_status,
            statuses=app.fault_statuses,
        )
        return self._respond(fault, request_id)

    def _replay(
        self,
        request: Request,
        policies: PolicySet,
        policy: Policy,
        target: Target,
        outcome: Outcome,
    ) -> Replay | None:
        """The rejection's Replay (proxy/replay.py): the connection may give the same answer
        to the same request again without coming here, while the limiter refuses it at once."""
        rate = (
            policy.rate_for(outcome.identity.key(self.settings.identity))
            if outcome.identity
            else None
        )
        if rate is None:
            return None
        content_type = request.headers.get("Content-Type", "")
        # The answer is rendered for a head like this one: same version, method and keep-alive.
        head = Request(
            request.method, "", request.version, request.headers, EMPTY, None, False, True
        )

        def render(decision: Decision, request_id: str) -> bytes:
            response = self._violation(policy, rate, decision, target, content_type, request_id)
            return response.serialize(head)

        return Replay(
            policies=policies,
            current=lambda: self.policies,
            limiter=self.limiter,
            observers=self.observers,
            request_id=self.next_request_id,
            policy=policy,
            rate=rate,
            outcome=outcome,
            render=render,
            templates=self._replays,
            says=(
                policy.name,
                rate,
                target.application.name,
                target.service,
                content_type,
                request.method,
                request.version,
            ),
        )

    def _identity(self, request: Request) -> ClientIdentity | None:
        identity: ClientIdentity | None = getattr(request.protocol, "identity", None)
        if identity is not None:  # read once per connection by the GuardedProtocol
            return identity
        transport = request.transport
        ssl_object = transport.get_extra_info("ssl_object") if transport else None
        der = ssl_object.getpeercert(binary_form=True) if ssl_object else None
        return self.identities.get(der) if der else None

    def _error(
        self,
        app: Application | None,
        content_type: str,
        outcome: Outcome,
        status: int,
        code: ErrorCode,
        message: str,
        retry_after: float | None = None,
    ) -> Response:
        fault = faults.error_fault(
            faults.shape_for(app, content_type),
            status=status,
            code=code,
            message=message,
            application=outcome.application or (app.name if app is not None else None),
            service=outcome.service or None,
            request_id=outcome.request_id,
            retry_after=retry_after,
            statuses=app.fault_statuses if app is not None else "binding",
            now=self.clock(),
        )
        return self._respond(fault, outcome.request_id)

    def _respond(self, fault: faults.Fault, request_id: str) -> Response:
        response = Response(status=fault.status, headers=fault.headers, body=fault.body)
        response.headers["X-Request-Id"] = request_id
        response.headers["Server"] = self.settings.server_name
        return response


def request_ids() -> Iterator[str]:
    """UUID-shaped request ids: a random prefix per process, then a counter masked with a random
    48-bit value (a bijection: unique, and it does not show the request count). A tenth of the
    cost of str(uuid.uuid4()), which reads the OS's random source on every call."""
    base = os.urandom(9).hex()
    mask = int.from_bytes(os.urandom(6), "big")
    template = f"{base[:8]}-{base[8:12]}-4{base[12:15]}-a{base[15:18]}-{{:012x}}"
    for n in itertools.count():
        yield template.format((n & 0xFFFFFFFFFFFF) ^ mask)
