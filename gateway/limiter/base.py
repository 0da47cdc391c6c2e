"""The limiter contract: what a decision is, how keys are named, what every backend provides.

The reference model (PRODUCT.md) for one key, with limit N, window W and the reset flag:

    if t < locked_until:                    reject, retry after locked_until - t (W on reset)
    elif count(allowed in (t - W, t]) < N:  allow, record t
    else:                                   reject, retry after oldest_in_window + W - t
    on reject, if reset_on_early_retry:     locked_until = t + W
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol, runtime_checkable


@dataclass(frozen=True, slots=True)
class Rate:
    """A policy's limit: `limit` calls per `per` seconds, optionally resetting on early retry."""

    limit: int
    per: float
    reset_on_early_retry: bool = False


@dataclass(frozen=True, slots=True)
class Decision:
    """The answer for one call. Being over the limit is a value, not an error.

    `retry_after` is 0 when allowed; `remaining` is how many calls the window still has after
    this one; `reset_after` is the seconds until the window is wholly free again; `now` is the
    store's time of the decision (epoch seconds).
    """

    allowed: bool
    retry_after: float
    remaining: int
    reset_after: float
    now: float


@dataclass(frozen=True, slots=True)
class KeyState:
    """A read-only view of one key, for `explain`: calls in the window and the lockout."""

    calls_in_window: int
    locked_until: float
    retry_after: float
    now: float


class Limiter(Protocol):
    """What every limiter backend provides, and all that its callers use. `now` is for tests
    and for the memory store."""

    name: str
    # True when every gateway process shares the counters (Redis): a policy holds across
    # replicas and workers. False: this process only (memory), so there is nothing to warm up,
    # probe or reconcile, and `--workers` would multiply every limit.
    shared: bool

    async def start(self) -> None:
        """Warm the store up (load scripts, connect); raises StoreUnavailable if it cannot."""

    async def ping(self) -> None:
        """One round trip to the store; raises StoreUnavailable when it does not answer."""

    def status(self) -> Mapping[str, object]:
        """The readiness view, JSON-ready: at least `store` (the name) and `state`."""

    async def decide(self, key: str, rate: Rate, now: float | None = None) -> Decision: ...

    async def peek(self, key: str, rate: Rate, now: float | None = None) -> KeyState: ...

    async def clear(self, key: str) -> bool: ...

    async def close(self) -> None: ...


@runtime_checkable
class KeyLister(Protocol):
    """A backend that can list the live keys of one identity (for the caller's status page).

    `prefix` comes from `identity_key_prefix`; at most `limit` keys are returned, in no order.
    """

    async def keys(self, prefix: str, limit: int) -> list[str]: ...


def limiter_key(identity: str, application: str, service: str) -> str:
    """The one place a limiter key is built.

    The braces are a Redis Cluster hash tag: the whole (identity, service) pair hashes to one
    slot, so every key one decision touches lives on one master. Braces inside the identity are
    replaced so they cannot cut the tag short.
    """
    return f"{identity_key_prefix(identity)}{application}|{service}}}"


def identity_key_prefix(identity: str) -> str:
    """The start every key of `identity` shares ("aup:{<identity>|"), for listing its keys."""
    safe = identity.replace("{", "(").replace("}", ")")
    return f"aup:{{{safe}|"
