"""The in-process limiter: the reference model kept in a dict, with bounded memory.

Entries live in an OrderedDict ordered by last touch. Every decision drops a few expired entries
from the cold end, so memory tracks the keys active within the longest window, and the cost of a
decision stays flat however many keys are live. A key's calls are a list, oldest first, and the
index of the oldest still in the window: expired calls are stepped over once each and cut off
when they are half the list, so a decision costs the same for a limit of 1 or 1,000,000 (and a
key costs a short list, not a deque's 600-byte block).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from gateway.clock import Clock, wall_clock
from gateway.limiter.base import Decision, KeyState, Rate

_SWEEP_PER_CALL = 4


class _Entry:
    __slots__ = ("calls", "expires_at", "first", "locked_until", "rate")

    def __init__(self) -> None:
        self.calls: list[float] = []  # allowed calls, oldest first; those before `first` expired
        self.first = 0
        self.locked_until = 0.0
        self.expires_at = 0.0
        self.rate: Rate | None = None

    def expire(self, horizon: float) -> int:
        """Step over calls at or before `horizon`; how many are left in the window."""
        calls, first = self.calls, self.first
        end = len(calls)
        while first < end and calls[first] <= horizon:
            first += 1
        if first and first * 2 >= end:  # at least half expired: cut them off (amortised O(1))
            del calls[:first]
            first = 0
        self.first = first
        return len(calls) - first

    def window(self) -> list[float]:
        return self.calls[self.first :]


@dataclass(frozen=True, slots=True)
class LocalState:
    """One key's state as the local fallback left it, for reconciliation with the store."""

    key: str
    rate: Rate
    calls: tuple[float, ...]  # allowed calls still within the window, oldest first
    locked_until: float  # 0 when not locked


class MemoryLimiter:
    """Exact for one process. The clock is injectable; `now` overrides it per call."""

    name = "memory"
    shared = False

    def __init__(self, clock: Clock = wall_clock) -> None:
        self._clock = clock
        self._entries: OrderedDict[str, _Entry] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def now(self) -> float:
        return self._clock()

    async def decide(self, key: str, rate: Rate, now: float | None = None) -> Decision:
        return self.decide_now(key, rate, self._clock() if now is None else now)

    def decide_now(self, key: str, rate: Rate, t: float) -> Decision:
        """The synchronous decision, also used by the Redis store's fallback and lock cache."""
        self._sweep(t, _SWEEP_PER_CALL)
        entries = self._entries
        entry = entries.get(key)
        if entry is None:
            entry = entries[key] = _Entry()
        else:
            entries.move_to_end(key)
        entry.rate = rate
        window = rate.per
        count = entry.expire(t - window)
        calls = entry.calls

        if t < entry.locked_until:
            allowed, retry_after = False, entry.locked_until - t
        elif count < rate.limit:
            allowed, retry_after = True, 0.0
            calls.append(t)
            count += 1
        else:
            allowed, retry_after = False, calls[entry.first] + window - t
        if not allowed and rate.reset_on_early_retry:
            entry.locked_until = t + window
            retry_after = window

        free_at = max(calls[-1] + window if count else t, entry.locked_until)
        entry.expires_at = free_at
        if free_at <= t:
            del entries[key]
        remaining = 0 if t < entry.locked_until else max(rate.limit - count, 0)
        return Decision(allowed, retry_after, remaining, max(free_at - t, 0.0), t)

    def refuse_now(self, key: str, rate: Rate, now: float | None = None) -> Decision | None:
        """`decide_now`'s answer when it is a rejection (recorded as decide_now records it: a
        reset policy's lockout moves); None, with nothing recorded, when it would allow."""
        t = self._clock() if now is None else now
        entry = self._entries.get(key)
        if entry is None:
            return None
        if t < entry.locked_until or entry.expire(t - rate.per) >= rate.limit:
            return self.decide_now(key, rate, t)
        return None

    async def peek(self, key: str, rate: Rate, now: float | None = None) -> KeyState:
        t = self._clock() if now is None else now
        entry = self._entries.get(key)
        if entry is None or entry.expires_at <= t:
            return KeyState(0, 0.0, 0.0, t)
        # Oldest first: skip the expired head rather than copy the (possibly long) window.
        calls, horizon, expired = entry.calls, t - rate.per, entry.first
        while expired < len(calls) and calls[expired] <= horizon:
            expired += 1
        count = len(calls) - expired
        locked_until = entry.locked_until if entry.locked_until > t else 0.0
        if locked_until:
            retry_after = locked_until - t
        elif count >= rate.limit:
            retry_after = calls[expired] + rate.per - t
        else:
            retry_after = 0.0
        return KeyState(count, locked_until, retry_after, t)

    async def clear(self, key: str) -> bool:
        return self._entries.pop(key, None) is not None

    async def keys(self, prefix: str, limit: int) -> list[str]:
        """Live keys starting with `prefix` (a scan of every entry: for the status endpoint,
        which is guarded per identity, never for decisions)."""
        found: list[str] = []
        for key in self._entries:
            if key.startswith(prefix):
                found.append(key)
                if len(found) >= limit:
                    break
        return found

    async def close(self) -> None:
        self._entries.clear()

    async def start(self) -> None:
        """Nothing to warm up: the state is this process's memory."""

    async def ping(self) -> None:
        """Always answers: the state is this process's memory."""

    def status(self) -> dict[str, object]:
        return {"store": self.name, "state": "ok"}

    def drain(self, t: float) -> list[LocalState]:
        """Take every key that still affects a decision at `t` out of this limiter (the store's
        fallback hands them to the store when it returns)."""
        taken: list[LocalState] = []
        for key, entry in self._entries.items():
            rate = entry.rate
            if rate is None or entry.expires_at <= t:
                continue
            calls = tuple(c for c in entry.window() if c > t - rate.per)
            locked_until = entry.locked_until if entry.locked_until > t else 0.0
            if calls or locked_until:
                taken.append(LocalState(key, rate, calls, locked_until))
        self._entries.clear()
        return taken

    def restore(self, states: list[LocalState]) -> None:
        """Put drained keys back (the store failed again before it took them), merged with any
        decision made since."""
        for state in states:
            entry = self._entries.get(state.key)
            if entry is None:
                entry = self._entries[state.key] = _Entry()
            entry.rate = state.rate
            entry.calls, entry.first = sorted({*entry.window(), *state.calls}), 0
            entry.locked_until = max(entry.locked_until, state.locked_until)
            ends = entry.calls[-1] + state.rate.per if entry.calls else 0.0
            entry.expires_at = max(entry.expires_at, entry.locked_until, ends)

    def _sweep(self, t: float, budget: int) -> None:
        entries = self._entries
        while budget and entries:
            key, entry = next(iter(entries.items()))
            if entry.expires_at > t:
                return
            del entries[key]
            budget -= 1
