"""Keys the shared store has locked, answered locally until their lock ends.

Under abuse nearly every call is a rejection of a key that is already locked, and asking Redis
again only to hear "still locked" is the hot path's most expensive step. After the store rejects
a key, the rejection's retry-after says when the key can next be allowed; until then the same
answer is given here without a round trip. This never allows a call the store would refuse:
the lock is timed from when the request was *sent* (the store decided after that, so the store's
lock ends no earlier than ours), and when ours ends the next call goes to the store again.

Policies with `reset_on_early_retry` must still see every early retry, since each one moves the
lockout: the caller is answered at once (retry after the full window) and the retry is recorded
in the store in the background (see ResilientLimiter).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from gateway.limiter.base import Decision, Rate

_DEFAULT_SIZE = 100_000


@dataclass(slots=True)
class _Lock:
    until: float  # monotonic time the lock ends (no later than the store's)
    rate: Rate
    store_now: float  # the store's clock at `taken`
    taken: float  # monotonic time the store's answer was asked for


class LockCache:
    def __init__(
        self, monotonic: Callable[[], float] = time.monotonic, size: int = _DEFAULT_SIZE
    ) -> None:
        self._monotonic = monotonic
        self._size = size
        self._locks: dict[str, _Lock] = {}

    def __len__(self) -> int:
        return len(self._locks)

    def get(self, key: str, rate: Rate) -> Decision | None:
        """The locked key's rejection, or None when the store must decide."""
        lock = self._locks.get(key)
        if lock is None:
            return None
        t = self._monotonic()
        if t >= lock.until or lock.rate != rate:  # a reload changed the policy: ask the store
            del self._locks[key]
            return None
        if rate.reset_on_early_retry:
            lock.until = t + rate.per
            retry_after = rate.per
        else:
            retry_after = lock.until - t
        return Decision(False, retry_after, 0, retry_after, lock.store_now + (t - lock.taken))

    def remember(self, key: str, rate: Rate, decision: Decision, sent: float) -> None:
        """Record a store rejection whose request was sent at monotonic time `sent`."""
        if decision.allowed or decision.retry_after <= 0:
            return
        if len(self._locks) >= self._size and key not in self._locks:
            self._prune(self._monotonic())
            if len(self._locks) >= self._size:
                return  # full of live locks: those keys simply ask the store
        self._locks[key] = _Lock(sent + decision.retry_after, rate, decision.now, sent)

    def forget(self, key: str) -> None:
        self._locks.pop(key, None)

    def _prune(self, t: float) -> None:
        for key in [k for k, lock in self._locks.items() if lock.until <= t]:
            del self._locks[key]
