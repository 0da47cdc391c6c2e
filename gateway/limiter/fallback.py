"""What the gateway does while its shared store is unreachable: `on_store_error` and the breaker.

`ResilientLimiter` wraps the store's limiter. While the store answers, every call goes to it.
When a call fails (StoreUnavailable, a refused or reset connection, a timeout), the call is
answered by the `on_store_error` mode instead, and a circuit breaker opens: for `cooldown`
seconds no call pays the store's timeout again. After the cooldown one call at a time is let
through as a probe; the first success closes the breaker. The modes:

- `local` (default): decide with an in-process MemoryLimiter, exact per replica only;
- `allow`: let the call through;
- `deny`: reject it, with the cooldown as its retry-after.

Each transition is logged once on the "gateway.store" logger (down as a warning, back as info),
and `status()` is the readiness view: state, since when, and the counters.

Calls allowed locally during an outage are not replayed into the store when it returns, so a key
may get up to twice its limit in the window that spans the switch-over; and a hung store may
still record the calls it was sent before they timed out. Both err on the side of serving.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Literal, Protocol, TypeVar, runtime_checkable

from gateway.errors import StoreUnavailable
from gateway.limiter.base import Decision, KeyState, Limiter, Rate
from gateway.limiter.lockcache import LockCache
from gateway.limiter.memory import MemoryLimiter

if TYPE_CHECKING:
    from gateway.settings import StoreErrorMode

StoreState = Literal["ok", "fallback"]
Source = Literal["store", "cache", "local", "allow", "deny"]
DEGRADED: frozenset[Source] = frozenset({"local", "allow", "deny"})  # decided without the store
_T = TypeVar("_T")

# Every way a store call can fail that the fallback covers. TimeoutError and ConnectionError are
# OSErrors; RedisLimiter already turns its own errors into StoreUnavailable.
_STORE_ERRORS = (StoreUnavailable, OSError)
# Early retries of reset policies recorded in the background at most this many at a time.
_MAX_BACKGROUND = 256


@runtime_checkable
class _Startable(Protocol):
    async def start(self) -> None: ...


class ResilientLimiter:
    """A Limiter that keeps deciding through store outages and says when it does.

    `decide(..., on_error=...)` overrides the mode for one call (a policy's own on_store_error).
    `clock` stamps the local fallback's decisions and `status()["since"]`; `monotonic` times the
    breaker (both injectable for tests). Counters: `store_calls` (calls that reached the store,
    probes included), `store_errors`, `fallback_decisions`.
    """

    def __init__(
        self,
        primary: Limiter,
        *,
        mode: StoreErrorMode = "local",
        cooldown: float = 1.0,
        fallback: MemoryLimiter | None = None,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
        label: str | None = None,
        logger: logging.Logger | None = None,
    ) -> None:
        self.name = primary.name
        self.primary = primary
        self.mode: StoreErrorMode = mode
        self.cooldown = cooldown
        self.fallback = fallback if fallback is not None else MemoryLimiter(clock)
        # A remote store's locked keys are answered locally until their lock ends (lockcache.py).
        self.locks = LockCache(monotonic) if not isinstance(primary, MemoryLimiter) else None
        self._retries: set[asyncio.Task[Decision | None]] = set()
        self.label = label or primary.name
        self._clock = clock
        self._monotonic = monotonic
        self._log = logger or logging.getLogger("gateway.store")
        # The breaker: None while closed; else the monotonic time the next probe may go.
        self._open_until: float | None = None
        self._probing = False
        self._since = clock()
        self._last_error: str | None = None
        self._fallback_at_open = 0
        self.store_calls = 0
        self.store_errors = 0
        self.fallback_decisions = 0

    @property
    def state(self) -> StoreState:
        return "ok" if self._open_until is None else "fallback"

    def status(self) -> dict[str, object]:
        """The readiness view: JSON-ready, for /readyz and the admin listener."""
        return {
            "store": self.name,
            "target": self.label,
            "state": self.state,
            "since": self._since,
            "mode": self.mode,
            "errors": self.store_errors,
            "fallback_decisions": self.fallback_decisions,
            "last_error": self._last_error,
        }

    async def start(self) -> None:
        """Warm the store up (load scripts, open a connection) if it can; never fails."""
        if isinstance(self.primary, _Startable):
            await self._via_store(self.primary.start)

    async def decide(
        self,
        key: str,
        rate: Rate,
        now: float | None = None,
        on_error: StoreErrorMode | None = None,
    ) -> Decision:
        decision, _ = await self.decide_with_source(key, rate, now, on_error)
        return decision

    async def decide_with_source(
        self,
        key: str,
        rate: Rate,
        now: float | None = None,
        on_error: StoreErrorMode | None = None,
    ) -> tuple[Decision, Source]:
        """The decision and who made it: the store (or its cached lock), or which mode."""
        locks = self.locks
        # With a reset policy, the cache answers only while the early retry it must record can
        # go in the background; when too many are queued the caller waits for the store.
        if (
            locks is not None
            and now is None
            and not (rate.reset_on_early_retry and len(self._retries) >= _MAX_BACKGROUND)
        ):
            cached = locks.get(key, rate)
            if cached is not None:
                if rate.reset_on_early_retry:
                    self._record_retry(key, rate)
                return cached, "cache"
        decision = await self._store_decide(key, rate, now)
        if decision is None:
            return self._degraded(key, rate, now, on_error or self.mode)
        return decision, "store"

    async def _store_decide(self, key: str, rate: Rate, now: float | None) -> Decision | None:
        """The store's decision through the breaker; None when the store could not give one."""
        admitted = self._admit()
        if not admitted:
            return None
        sent = self._monotonic()
        try:
            self.store_calls += 1
            decision = await self.primary.decide(key, rate, now)
        except _STORE_ERRORS as exc:
            self._failed(exc)
            return None
        finally:
            if admitted == "probe":
                self._probing = False
        if self._open_until is not None:
            self._succeeded()
        if self.locks is not None and now is None:
            self.locks.remember(key, rate, decision, sent)
        return decision

    def _record_retry(self, key: str, rate: Rate) -> None:
        """An early retry of a reset policy still moves the lockout in the store: record it in
        the background, so the caller, already answered, does not wait for it."""
        task = asyncio.ensure_future(self._store_decide(key, rate, None))
        self._retries.add(task)
        task.add_done_callback(self._retries.discard)

    async def probe(self) -> None:
        """While in fallback, try the store once if the breaker allows (readiness checks call
        this, so an idle gateway notices that the store is back without waiting for a call)."""
        ping = getattr(self.primary, "ping", None)
        if self._open_until is not None and ping is not None:
            await self._via_store(ping)

    async def peek(self, key: str, rate: Rate, now: float | None = None) -> KeyState:
        """The store's view of the key, or the local fallback's while the store is away."""
        state = await self._via_store(lambda: self.primary.peek(key, rate, now))
        return state if state is not None else await self.fallback.peek(key, rate, now)

    async def clear(self, key: str) -> bool:
        """Clear the key everywhere; raises StoreUnavailable if the store could not be cleared."""
        if self.locks is not None:
            self.locks.forget(key)
        cleared = False
        if self.fallback is not self.primary:
            cleared = await self.fallback.clear(key)
        in_store = await self._via_store(lambda: self.primary.clear(key))
        if in_store is None:
            raise StoreUnavailable(f"{self.label} is unavailable: cleared the local state only")
        return in_store or cleared

    async def close(self) -> None:
        if self._retries:
            await asyncio.gather(*self._retries, return_exceptions=True)
        await self.primary.close()
        if self.fallback is not self.primary:
            await self.fallback.close()

    def _admit(self) -> Literal["call", "probe", False]:
        """Whether this call may go to the store: always while closed, else one probe at a time.

        The probe must reset `_probing` in a `finally`, or a cancelled probe (a client that
        went away) would keep the breaker open for good.
        """
        if self._open_until is None:
            return "call"
        if self._probing or self._monotonic() < self._open_until:
            return False
        self._probing = True
        return "probe"

    async def _via_store(self, op: Callable[[], Awaitable[_T]]) -> _T | None:
        """`op`'s result through the breaker; None if the breaker or a store failure stopped it."""
        admitted = self._admit()
        if not admitted:
            return None
        try:
            self.store_calls += 1
            result = await op()
        except _STORE_ERRORS as exc:
            self._failed(exc)
            return None
        finally:
            if admitted == "probe":
                self._probing = False
        self._succeeded()
        return result

    def _failed(self, exc: BaseException) -> None:
        self.store_errors += 1
        self._last_error = str(exc) or type(exc).__name__
        was_open = self._open_until is not None
        self._open_until = self._monotonic() + self.cooldown
        if not was_open:
            self._since = self._clock()
            self._fallback_at_open = self.fallback_decisions
            self._log.warning(
                "store %s unreachable (%s): deciding with on_store_error=%s, probing every %.3gs",
                self.label,
                self._last_error,
                self.mode,
                self.cooldown,
            )

    def _succeeded(self) -> None:
        if self._open_until is None:
            return
        now = self._clock()
        outage, self._since = now - self._since, now
        self._open_until = None
        self._log.info(
            "store %s answers again after %.1fs; %d decisions were made without it",
            self.label,
            outage,
            self.fallback_decisions - self._fallback_at_open,
        )

    def _degraded(
        self, key: str, rate: Rate, now: float | None, mode: StoreErrorMode
    ) -> tuple[Decision, Source]:
        self.fallback_decisions += 1
        t = self._clock() if now is None else now
        if mode == "local":
            return self.fallback.decide_now(key, rate, t), "local"
        if mode == "allow":
            return Decision(True, 0.0, max(rate.limit - 1, 0), 0.0, t), "allow"
        # `deny`: come back when the breaker will next try the store.
        return Decision(False, self.cooldown, 0, self.cooldown, t), "deny"
