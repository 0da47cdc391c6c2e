"""A violation answered again on the same connection without the handler.

Under abuse one connection sends the same request again and again and gets the same fault: only
the request id, the times and the retry-after change. After the handler rejects a call, its
answer comes with a `Replay`; the connection (edge/connection.py) keeps it under the request's
exact head (method, target, version and every header, byte for byte, so routing, access and
the policy would match the same way) and, when that head comes again, asks the Replay first:

- if the policies were reloaded since, or the limiter cannot refuse the key at once (it would
  allow, the store must be asked, or the store is down), it answers None, having changed
  nothing, and the request goes to the handler as usual;
- else the limiter's rejection is recorded exactly as the handler's would be (a reset policy's
  lockout moves), the observers (access log, metrics, ledger) see the same Outcome, and the
  answer is the handler's own bytes for this wait, with the request id, the SOAP creation time
  and the Date put in.

The bytes for each wait are rendered once by the handler's own functions, twice with different
request ids and times, and used only if both renderings agree everywhere else: a fault's text
that happened to contain a marker would disagree, and that call then always takes the handler.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from gateway.config.policy import Policy, PolicySet
from gateway.edge.http1 import http_date
from gateway.limiter.base import Decision, Rate
from gateway.limiter.fallback import ResilientLimiter
from gateway.outcome import Observer, Outcome
from gateway.proxy.faults import iso_time, retry_after_seconds

# Renders the whole answer (head and body) for a rejection with this request id.
Render = Callable[[Decision, str], bytes]

# Two request ids as long as real ones, made of characters no escaping changes, and two times.
_MARKS = ("@" * 35 + "a", "@" * 35 + "b")
_TIMES = (0.0, 1.0)
_WAITS_KEPT = 64  # distinct waits a replay keeps at hand (a policy's window in whole seconds)


class Templates:
    """Every replay's answers, rendered once per what they say and per wait, and shared by all
    connections (the same fault for the same head from many connections is kept once)."""

    def __init__(self, size: int = 4096) -> None:
        self._size = size
        self._kept: dict[tuple[object, ...], bytes | None] = {}

    def get(self, key: tuple[object, ...], render: Render) -> bytes | None:
        """The template for `key` (what the answer says, its wait last), rendered if new; None
        when two renderings disagree."""
        if key in self._kept:
            return self._kept[key]
        wait = key[-1]
        assert isinstance(wait, int)
        decisions = (Decision(False, float(wait), 0, float(wait), at) for at in _TIMES)
        first, second = (
            _template(render(decision, mark), mark, at)
            for decision, mark, at in zip(decisions, _MARKS, _TIMES, strict=True)
        )
        template = first if first == second else None
        if len(self._kept) >= self._size:  # heads and services come from clients: bounded
            self._kept.clear()
        self._kept[key] = template
        return template


class Replay:
    """One rejected request's answer, ready to be given again (see the module docstring)."""

    __slots__ = (
        "_answers",
        "_current",
        "_key",
        "_limiter",
        "_observers",
        "_outcome",
        "_policies",
        "_rate",
        "_render",
        "_request_id",
        "_says",
        "_templates",
    )

    def __init__(
        self,
        *,
        policies: PolicySet,
        current: Callable[[], PolicySet],
        limiter: ResilientLimiter,
        observers: list[Observer],
        request_id: Callable[[], str],
        policy: Policy,
        rate: Rate,
        outcome: Outcome,
        render: Render,
        templates: Templates,
        says: tuple[object, ...],
    ) -> None:
        """`render` makes the whole answer for a decision and a request id; `says` is what
        makes one answer differ from another but for the wait (policy, rate, service, shape,
        the head's method and version...), its key in the shared `templates`."""
        assert outcome.key and outcome.policy == policy.name
        self._policies = policies
        self._current = current
        self._limiter = limiter
        self._observers = observers
        self._request_id = request_id
        self._key = outcome.key
        self._rate = rate
        self._outcome = outcome  # the first rejection's: who, what, which policy and status
        self._render = render
        self._templates = templates
        self._says = (policies.version, *says)
        self._answers: dict[int, bytes | None] = {}  # by wait: this replay's look-ups, kept

    def __call__(self) -> bytes | None:
        """The answer for one more call of the same request, or None: ask the handler."""
        if self._current() is not self._policies:
            return None
        started = time.perf_counter()
        decision = self._limiter.refuse_now(self._key, self._rate)
        if decision is None:
            return None
        asked = time.perf_counter()
        wait = retry_after_seconds(decision.retry_after)
        template = self._answers.get(wait, b"")
        if template == b"":
            template = self._templates.get((*self._says, wait), self._render)
            if len(self._answers) < _WAITS_KEPT:
                self._answers[wait] = template
        if template is None:  # renderings disagreed: the handler answers (and counts) it
            return None
        request_id = self._request_id()
        answer = template % {
            b"i": request_id.encode(),
            b"t": iso_time(decision.now).encode(),
            b"d": http_date(),
        }
        first = self._outcome
        outcome = Outcome(
            request_id,
            first.identity,
            first.application,
            first.service,
            "rejected",
            first.policy,
            first.key,
            first.status,
            retry_after=decision.retry_after,
            store_time=decision.now,
            store_latency=asked - started,
            method=first.method,
        )
        outcome.elapsed = time.perf_counter() - started
        for observe in self._observers:
            observe(outcome)
        return answer


def _template(answer: bytes, request_id: str, at: float) -> bytes:
    """`answer` as a bytes %-template: the request id is %(i)b, the SOAP time %(t)b, the Date
    header's value %(d)b (the head's last line, as edge/http1.py writes it)."""
    head, _, body = answer.partition(b"\r\n\r\n")
    head = head[: head.rindex(b"\r\nDate: ")]

    def marked(part: bytes) -> bytes:
        part = part.replace(b"%", b"%%").replace(request_id.encode(), b"%(i)b")
        return part.replace(iso_time(at).encode(), b"%(t)b")

    return marked(head) + b"\r\nDate: %(d)b\r\n\r\n" + marked(body)
