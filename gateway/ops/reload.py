"""Live policy reload: watch the policy folder (and the applications' OpenAPI files), validate
the whole new set, swap it atomically.

The watcher looks at the folder every `interval` seconds (1 s by default): it reads every
`*.yaml` / `*.yml` file and compares a digest of names and contents with the last one it acted
on, together with every `openapi:` file of gateway.yaml (a spec's operations are the routes
that policies match, so it reloads with them). Contents rather than mtimes, because file systems
stamp mtimes with a coarse clock (two writes in one tick look alike) and editors and ConfigMaps
replace files in different ways. A policy folder and a spec are a few kilobytes, so reading them
once a second costs nothing measurable; the reading and parsing happen in a worker thread, off
the event loop that serves calls.

A reload (from the watcher, SIGHUP or the admin API) loads the complete set with the same loader
as start-up and `check`. Only a set without a single problem replaces `gateway.policies`, in one
attribute assignment; the handler reads that attribute once per request, so a call in flight
finishes under the set it started with and no connection notices. A set with problems is
refused as a whole: the running set stays, every problem is logged with its file and line, and
the result is kept for `/policies`, `/readyz` and the metrics.

Limiter state is keyed by (identity, application, service), never by policy or set version, so
counters and lockouts carry over a reload untouched.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from gateway.config.policy import PolicySet, load_policies
from gateway.errors import ConfigError

if TYPE_CHECKING:
    from gateway.config.settings import Settings
    from gateway.proxy.app import Gateway

log = logging.getLogger("gateway.reload")
Reason = Literal["start", "watch", "sighup", "admin"]


@dataclass(frozen=True, slots=True)
class ReloadResult:
    """One reload attempt. `version` is the set running after it (the old one on failure)."""

    seq: int
    ok: bool
    reason: str
    at: float
    version: str
    previous: str
    files: tuple[str, ...]
    problems: tuple[str, ...] = ()
    duration: float = 0.0

    @property
    def changed(self) -> bool:
        return self.ok and self.version != self.previous

    def as_dict(self) -> dict[str, Any]:
        return {
            "seq": self.seq,
            "ok": self.ok,
            "reason": self.reason,
            "at": round(self.at, 3),
            "version": self.version,
            "previous": self.previous,
            "changed": self.changed,
            "files": list(self.files),
            "problems": list(self.problems),
            "duration_ms": round(self.duration * 1000, 3),
        }


def policy_digest(settings: Settings) -> str:
    """A digest of the policy folder's files and the applications' OpenAPI files (names and
    contents); '' if the folder cannot be read. A spec that cannot be read counts as a change
    (the reload then reports it), not as an unreadable folder."""
    digest = hashlib.sha256()
    directory = settings.policies
    try:
        files = sorted(directory.glob("*.yaml")) + sorted(directory.glob("*.yml"))
        for path in files:
            digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    except OSError:
        return ""
    for app in settings.applications.values():
        if app.openapi is not None:
            try:
                digest.update(str(app.openapi).encode() + b"\0" + app.openapi.read_bytes())
            except OSError as exc:
                digest.update(f"unreadable: {exc}".encode())
            digest.update(b"\0")
    return digest.hexdigest()


@dataclass
class PolicyReloader:
    """Owns `gateway.policies` after start-up: every replacement goes through `reload()`."""

    gateway: Gateway
    interval: float = 1.0
    on_result: Callable[[ReloadResult], None] | None = None
    last: ReloadResult = field(init=False)
    last_ok: ReloadResult = field(init=False)
    _seen: str = field(init=False, default="")
    _lock: asyncio.Lock = field(init=False, default_factory=asyncio.Lock)
    _wake: asyncio.Event = field(init=False, default_factory=asyncio.Event)
    _task: asyncio.Task[None] | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        current = self.gateway.policies
        self._seen = policy_digest(self.gateway.settings)
        self.last = self.last_ok = ReloadResult(
            0, True, "start", self.gateway.clock(), current.version, "", _names(current)
        )

    async def reload(self, reason: Reason = "admin") -> ReloadResult:
        """Load and validate the folder now; swap the set only if it has no problem."""
        async with self._lock:  # one reload at a time, in the order they were asked for
            started = time.perf_counter()
            digest, loaded = await asyncio.to_thread(_load, self.gateway.settings)
            self._seen = digest
            previous = self.gateway.policies
            seq = self.last.seq + 1
            if isinstance(loaded, PolicySet):
                self.gateway.policies = loaded  # the swap: one assignment, read once per call
                result = ReloadResult(
                    seq,
                    True,
                    reason,
                    self.gateway.clock(),
                    loaded.version,
                    previous.version,
                    _names(loaded),
                    duration=time.perf_counter() - started,
                )
                self.last = self.last_ok = result
                if result.changed:
                    log.info(
                        "policies reloaded (%s): version %s -> %s, %d policies from %d files",
                        reason,
                        previous.version,
                        loaded.version,
                        len(loaded.policies),
                        len(loaded.files),
                    )
                else:
                    log.info(
                        "policies reloaded (%s): unchanged, version %s", reason, loaded.version
                    )
            else:
                result = ReloadResult(
                    seq,
                    False,
                    reason,
                    self.gateway.clock(),
                    previous.version,
                    previous.version,
                    _names(previous),
                    tuple(loaded.problems),
                    duration=time.perf_counter() - started,
                )
                self.last = result
                log.error(
                    "policy reload failed (%s): %d problem(s); keeping version %s",
                    reason,
                    len(loaded.problems),
                    previous.version,
                )
                for problem in loaded.problems:
                    log.error("policy reload failed: %s", problem)
        if self.on_result is not None:
            self.on_result(result)
        return result

    def poke(self) -> None:
        """Have the watcher look at the folder now instead of at its next interval."""
        self._wake.set()

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._watch())

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    async def _watch(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.interval)
            self._wake.clear()
            try:
                digest = await asyncio.to_thread(policy_digest, self.gateway.settings)
                if digest != self._seen:
                    await self.reload("watch")
            except asyncio.CancelledError:
                raise
            except Exception:  # the watcher must outlive any one bad look at the folder
                log.exception(
                    "policy watcher: looking at %s failed", self.gateway.settings.policies
                )


def _load(settings: Settings) -> tuple[str, PolicySet | ConfigError]:
    """The digest read before loading, and the set or every problem found (worker thread)."""
    digest = policy_digest(settings)
    try:
        return digest, load_policies(settings)
    except ConfigError as exc:
        return digest, exc
    except (OSError, UnicodeDecodeError) as exc:
        return digest, ConfigError([f"{settings.policies}: {exc}"])


def _names(policies: PolicySet) -> tuple[str, ...]:
    return tuple(str(path) for path in policies.files)
