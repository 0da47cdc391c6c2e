"""What the gateway does while its shared store is unreachable: `on_store_error` and the breaker.

`ResilientLimiter` wraps the store's limiter. While the store answers, every call goes to it.
When a call fails (StoreUnavailable, a refused or reset connection, a timeout), the call is
answered by the `on_store_error` mode instead, and a circuit breaker opens: for `cooldown`
seconds no call pays the store's timeout again. After the cooldown one call at a time is let
through as a probe; the first success closes the breaker.

The switch back is exact (docs/outage.md): calls that arrive while a probe is in flight wait for
it (at most `probe_wait`, the store's own deadline) and go to the store if it answered, instead
of being decided locally; and a background task started by `start()` probes the store as soon
as each cooldown ends, so a replica notices that the store is back within `cooldown` plus one
store round trip (bounded by the deadline) even when no call arrives. The modes:

- `local` (default): decide with an in-process MemoryLimiter, exact per replica only;
- `allow`: let the call through;
- `deny`: reject it, with the cooldown as its retry-after.

Each transition is logged once on the "gateway.store" logger (down as a warning, back as info),
and `status()` is the readiness view: state, since when, and the counters.

A hung store may still record the calls it was sent before they timed out: that errs on the
side of serving. Calls allowed locally during an outage are written into the store when it
returns (reconcile.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Literal, TypeVar, get_args

from gateway.clock import Clock, wall_clock
from gateway.config.settings import StoreErrorMode
from gateway.errors import StoreUnavailable
from gateway.limiter.base import Decision, KeyLister, KeyState, Limiter, Rate
from gateway.limiter.lockcache import LockCache
from gateway.limiter.memory import MemoryLimiter

StoreState = Literal["ok", "fallback"]
Source = Literal["store", "cache", StoreErrorMode]
DEGRADED: frozenset[Source] = frozenset(get_args(StoreErrorMode))  # decided without the store
_T = TypeVar("_T")

# Every way a store call can fail that the fallback covers. TimeoutError and ConnectionError are
# OSErrors; RedisLimiter already turns its own errors into StoreUnavailable.
_STORE_ERRORS = (StoreUnavailable, OSError)
# Early retries of reset policies recorded in the background at most this many at a time.
_MAX_BACKGROUND = 256
_RECONCILE_BATCH = 64  # keys merged into the store concurrently
_reconcile_log = logging.getLogger("gateway.reconcile")


@dataclass(frozen=True, slots=True)
class Excess:
    """A key the fallback let past its policy: found when its calls were merged into the store."""

    key: str
    rate: Rate
    calls: int  # allowed beyond the policy, all replicas' merged calls and the store's counted
    store_time: float


class ResilientLimiter:
    """A Limiter that keeps deciding through store outages and says when it does.

    `decide(..., on_error=...)` overrides the mode for one call (a policy's own on_store_error).
    `clock` stamps the local fallback's decisions and `status()["since"]`; `monotonic` times the
    breaker (both injectable for tests). Counters: `store_calls` (calls that reached the store,
    probes included), `store_errors`, `fallback_decisions`, and after an outage
    `reconciled_keys`, `reconciled_calls`, `excess_calls`; `on_excess` listeners hear of each
    key that was allowed beyond its policy.
    """

    def __init__(
        self,
        primary: Limiter,
        *,
        mode: StoreErrorMode = "local",
        cooldown: float = 1.0,
        fallback: MemoryLimiter | None = None,
        clock: Clock = wall_clock,
        monotonic: Callable[[], float] = time.monotonic,
        label: str | None = None,
        logger: logging.Logger | None = None,
        probe_wait: float = 0.3,
    ) -> None:
        self.name = primary.name
        self.shared = primary.shared
        self.primary = primary
        self.mode: StoreErrorMode = mode
        self.cooldown = cooldown
        self.fallback = fallback if fallback is not None else MemoryLimiter(clock)
        # A remote store's locked keys are answered locally until their lock ends (lockcache.py).
        self.locks = LockCache(monotonic) if primary.shared else None
        # This process's own store (memory) can also refuse without a coroutine (refuse_now).
        self._local = primary if isinstance(primary, MemoryLimiter) else None
        self._retries: set[asyncio.Task[Decision | None]] = set()
        self.label = label or primary.name
        self._clock = clock
        self._monotonic = monotonic
        self._log = logger or logging.getLogger("gateway.store")
        # The breaker: None while closed; else the monotonic time the next probe may go.
        self._open_until: float | None = None
        self._probing = False
        # While a probe is in flight: resolved True if it found the store answering.
        self._probe_result: asyncio.Future[bool] | None = None
        self.probe_wait = probe_wait
        self._opened = asyncio.Event()  # wakes the background prober when the breaker opens
        self._prober: asyncio.Task[None] | None = None
        self._since = clock()
        self._last_error: str | None = None
        self._fallback_at_open = 0
        self.store_calls = 0
        self.store_errors = 0
        self.fallback_decisions = 0
        self.reconciled_keys = 0  # keys the fallback decided, merged into the store after
        self.reconciled_calls = 0  # calls the fallback allowed, merged into the store after
        self.excess_calls = 0  # of those, calls beyond the policy (counting every replica's)
        self.on_excess: list[Callable[[Excess], None]] = []  # e.g. the ledger

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
            "reconciled_keys": self.reconciled_keys,
            "reconciled_calls": self.reconciled_calls,
            "excess_calls": self.excess_calls,
            "switch_back_within": self.cooldown + self.probe_wait,
            "last_error": self._last_error,
        }

    async def start(self) -> None:
        """Warm the store up (load scripts, open a connection) if it can, and start the
        background prober; never fails."""
        if not self.primary.shared:
            return  # a process's own memory: nothing to warm up, nothing to probe
        await self._via_store(self.primary.start)
        if self._prober is None:
            self._prober = asyncio.get_running_loop().create_task(self._probe_forever())

    async def _probe_forever(self) -> None:
        """Probe the store at the end of every cooldown while the breaker is open, so the switch
        back never waits for a call to arrive."""
        while True:
            if self._open_until is None:
                self._opened.clear()
                await self._opened.wait()
                continue
            await asyncio.sleep(max(self._open_until - self._monotonic(), 0.0))
            try:
                await self.probe()
            except Exception:  # the prober must outlive any one failure
                self._log.exception("store %s: background probe failed", self.label)
                await asyncio.sleep(self.cooldown)

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
        if now is None and self.locks is not None:
            cached = self._cached_lock(key, rate)
            if cached is not None:
                return cached, "cache"
        local = self._local
        if local is not None and self._open_until is None:
            # This process's memory: decided here and now, without the coroutines of a store
            # call (it never fails, so the breaker never opens).
            self.store_calls += 1
            return local.decide_now(key, rate, local.now() if now is None else now), "store"
        decision = await self._store_decide(key, rate, now)
        if decision is None:
            return self._degraded(key, rate, now, on_error or self.mode)
        return decision, "store"

    def refuse_now(self, key: str, rate: Rate) -> Decision | None:
        """The key's rejection when it can be given without waiting: a memory store's, or the
        shared store's lock held in the lock cache, while the store answers. None when
        `decide_with_source` must run (the call may be allowed, the store must be asked, or the
        store is down); None records nothing, and a rejection counts as decide's would."""
        if self._open_until is not None:
            return None
        if self._local is not None:
            return self._local.refuse_now(key, rate)
        return self._cached_lock(key, rate) if self.locks is not None else None

    def _cached_lock(self, key: str, rate: Rate) -> Decision | None:
        # With a reset policy, the cache answers only while the early retry it must record can
        # go in the background; when too many are queued the caller waits for the store.
        assert self.locks is not None
        if rate.reset_on_early_retry and len(self._retries) >= _MAX_BACKGROUND:
            return None
        cached = self.locks.get(key, rate)
        if cached is not None and rate.reset_on_early_retry:
            self._record_retry(key, rate)
        return cached

    async def _store_decide(self, key: str, rate: Rate, now: float | None) -> Decision | None:
        """The store's decision through the breaker; None when the store could not give one."""
        if not await self._through_breaker():
            return None
        sent = self._monotonic()
        try:
            self.store_calls += 1
            decision = await self.primary.decide(key, rate, now)
        except _STORE_ERRORS as exc:
            self._failed(exc)
            return None
        if self.locks is not None and now is None:
            self.locks.remember(key, rate, decision, sent)
        return decision

    async def _through_breaker(self) -> bool:
        """Whether this call may go to the store now. While closed, yes. Past the cooldown, this
        call runs the probe first; while a probe is in flight, it waits for its answer."""
        admitted = self._admit()
        if admitted == "probe":
            await self._probe()
            return self._open_until is None
        if not admitted:
            return await self._probe_answered()
        return True

    async def _probe(self) -> None:
        """The probe (its caller holds the probe slot): ping the store, write into it what the
        local fallback allowed meanwhile, and only then close the breaker, so that no decision
        reaches the store before the outage's calls are in it."""
        try:
            self.store_calls += 1
            await self.primary.ping()
            await self._reconcile()
        except _STORE_ERRORS as exc:
            self._failed(exc)
        else:
            self._succeeded()  # before the probe's waiters hear of it
        finally:
            self._probe_done()

    async def _reconcile(self) -> None:
        """Hand the keys the local fallback decided to the store, merged on the store's clock
        (reconcile.lua); record per key the calls it allowed beyond the policy. On failure the
        keys not yet written go back to the fallback, for the next probe."""
        merge = getattr(self.primary, "reconcile", None)
        if merge is None or self.fallback is self.primary:
            return
        states = self.fallback.drain(self._clock())
        while states:  # decisions made locally meanwhile are drained on the next pass
            t = self._clock()
            for start in range(0, len(states), _RECONCILE_BATCH):
                part = states[start : start + _RECONCILE_BATCH]
                try:
                    results = await asyncio.gather(
                        *(
                            merge(s.key, s.rate, [t - c for c in s.calls], s.locked_until - t)
                            for s in part
                        )
                    )
                except BaseException:
                    # Merging a key twice only ever makes it stricter: put the batch back too.
                    self.fallback.restore(states[start:])
                    raise
                for state, (excess, merged, store_now) in zip(part, results, strict=True):
                    self.reconciled_keys += 1
                    self.reconciled_calls += merged
                    if excess:
                        self.excess_calls += excess
                        _reconcile_log.warning(
                            "store %s: key %s was allowed %d calls beyond its policy (%d per "
                            "%gs) across the outage",
                            self.label,
                            state.key,
                            excess,
                            state.rate.limit,
                            state.rate.per,
                        )
                        for listener in self.on_excess:
                            listener(Excess(state.key, state.rate, excess, store_now))
            states = self.fallback.drain(self._clock())

    def _record_retry(self, key: str, rate: Rate) -> None:
        """An early retry of a reset policy still moves the lockout in the store: record it in
        the background, so the caller, already answered, does not wait for it."""
        task = asyncio.ensure_future(self._store_decide(key, rate, None))
        self._retries.add(task)
        task.add_done_callback(self._retries.discard)

    async def probe(self) -> None:
        """While in fallback, probe the store if the breaker allows (the background prober and
        readiness checks call this, so an idle gateway notices that the store is back)."""
        if self._admit() == "probe":
            await self._probe()

    async def ping(self) -> None:
        """One round trip to the store itself (not through the breaker)."""
        await self.primary.ping()

    async def peek(self, key: str, rate: Rate, now: float | None = None) -> KeyState:
        """The store's view of the key, or the local fallback's while the store is away."""
        state = await self._via_store(lambda: self.primary.peek(key, rate, now))
        return state if state is not None else await self.fallback.peek(key, rate, now)

    async def keys(self, prefix: str, limit: int) -> list[str]:
        """The store's live keys under `prefix`, or the local fallback's while the store is away
        (as `peek`); none from a primary that cannot list keys."""
        primary = self.primary
        if isinstance(primary, KeyLister):
            found = await self._via_store(lambda: primary.keys(prefix, limit))
            if found is not None:
                return found
        return await self.fallback.keys(prefix, limit)

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
        if self._prober is not None:
            self._prober.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._prober
            self._prober = None
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
        self._probe_result = asyncio.get_running_loop().create_future()
        return "probe"

    async def _via_store(self, op: Callable[[], Awaitable[_T]]) -> _T | None:
        """`op`'s result through the breaker; None if the breaker or a store failure stopped it."""
        if not await self._through_breaker():
            return None
        try:
            self.store_calls += 1
            return await op()
        except _STORE_ERRORS as exc:
            self._failed(exc)
            return None

    async def _probe_answered(self) -> bool:
        """While a probe is in flight, wait for it (at most `probe_wait`): True when it found the
        store answering, so this call goes to the store too instead of deciding locally."""
        result = self._probe_result
        if result is None:
            return False
        try:
            async with asyncio.timeout(self.probe_wait):
                answered = await asyncio.shield(result)
        except TimeoutError:
            return False
        return answered and self._open_until is None

    def _probe_done(self) -> None:
        self._probing = False
        result, self._probe_result = self._probe_result, None
        if result is not None and not result.done():
            result.set_result(self._open_until is None)

    def _failed(self, exc: BaseException) -> None:
        self.store_errors += 1
        self._last_error = str(exc) or type(exc).__name__
        was_open = self._open_until is not None
        self._open_until = self._monotonic() + self.cooldown
        if not was_open:
            self._since = self._clock()
            self._fallback_at_open = self.fallback_decisions
            self._opened.set()
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
