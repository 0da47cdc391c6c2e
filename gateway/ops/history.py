"""The last hour, minute by minute, for the ops page: calls forwarded and rejected per
application, the store's state and policy reloads.

It is sampled from the gateway's own metrics, never on the request path: every `step` seconds
(5 by default) a task reads the cumulative counters, and the increase since the last sample
goes to the current minute. The store's state is read at each sample; a minute shows the share
of its samples that found the store in fallback. Sixty minutes are kept; older ones are dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import Counter as PromCounter

from gateway.clock import Clock, wall_clock
from gateway.ops.metrics import CallCounter, GatewayMetrics

log = logging.getLogger("gateway.history")
MINUTE = 60
KEEP = 60  # minutes
FORWARDED = frozenset({"forwarded", "allowed", "shadow", "exempt"})  # reached the upstream


@dataclass
class Minute:
    """What happened in one minute (its start, epoch seconds)."""

    start: int
    forwarded: Counter[str] = field(default_factory=Counter)
    rejected: Counter[str] = field(default_factory=Counter)
    samples: int = 0
    fallback_samples: int = 0
    reloads_ok: int = 0
    reloads_failed: int = 0


class History:
    """Per-minute series of the last hour, fed by `sample()` (the task calls it every step)."""

    def __init__(
        self,
        metrics: GatewayMetrics,
        store_status: Callable[[], Mapping[str, Any] | None],
        step: float = 5.0,
        clock: Clock = wall_clock,
    ) -> None:
        self._metrics = metrics
        self._store_status = store_status
        self._step = step
        self._clock = clock
        self._minutes: dict[int, Minute] = {}
        self._calls: Counter[tuple[str, str]] = Counter()  # totals at the last sample
        self._reloads: Counter[str] = Counter()
        self._task: asyncio.Task[None] | None = None

    def sample(self, now: float | None = None) -> None:
        """Add what the counters gained since the last sample to the minute of `now`."""
        t = self._clock() if now is None else now
        start = int(t // MINUTE) * MINUTE
        minute = self._minutes.get(start)
        if minute is None:
            minute = self._minutes[start] = Minute(start)
            for old in [m for m in self._minutes if m <= start - KEEP * MINUTE]:
                del self._minutes[old]
        calls = _calls(self._metrics.requests)
        for (application, kind), total in calls.items():
            gained = total - self._calls[(application, kind)]
            if gained > 0:
                (minute.rejected if kind == "rejected" else minute.forwarded)[application] += gained
        self._calls = calls
        reloads = _by_label(self._metrics.reloads, "result")
        minute.reloads_ok += max(reloads["ok"] - self._reloads["ok"], 0)
        minute.reloads_failed += max(reloads["failed"] - self._reloads["failed"], 0)
        self._reloads = reloads
        status = self._store_status()
        minute.samples += 1
        if status is not None and status.get("state") == "fallback":
            minute.fallback_samples += 1

    def series(self, now: float | None = None) -> dict[str, Any]:
        """The last hour as aligned lists, oldest minute first (JSON for the ops page)."""
        t = self._clock() if now is None else now
        last = int(t // MINUTE) * MINUTE
        starts = [last - (KEEP - 1 - i) * MINUTE for i in range(KEEP)]
        minutes = [self._minutes.get(start) or Minute(start) for start in starts]
        applications = sorted(
            {app for m in minutes for app in (*m.forwarded, *m.rejected)}, key=str.lower
        )
        return {
            "step": MINUTE,
            "minutes": starts,
            "applications": {
                app: {
                    "forwarded": [m.forwarded[app] for m in minutes],
                    "rejected": [m.rejected[app] for m in minutes],
                }
                for app in applications
            },
            # share of the minute's samples that found the store in fallback; None: no sample
            "fallback": [
                round(m.fallback_samples / m.samples, 3) if m.samples else None for m in minutes
            ],
            "reloads": {
                "ok": [m.reloads_ok for m in minutes],
                "failed": [m.reloads_failed for m in minutes],
            },
        }

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _run(self) -> None:
        while True:
            try:
                self.sample()
            except Exception:  # the history must never take the gateway down
                log.exception("ops history: sampling the metrics failed")
            await asyncio.sleep(self._step)


def _calls(requests: CallCounter) -> Counter[tuple[str, str]]:
    """Cumulative calls by (application, forwarded | rejected); refused calls are left out."""
    totals: Counter[tuple[str, str]] = Counter()
    for family in requests.collect():
        for sample in family.samples:
            if not sample.name.endswith("_total"):
                continue
            application, decision = sample.labels["application"], sample.labels["decision"]
            if not application:
                continue
            if decision == "rejected":
                totals[(application, "rejected")] += int(sample.value)
            elif decision in FORWARDED:
                totals[(application, "forwarded")] += int(sample.value)
    return totals


def _by_label(counter: PromCounter, label: str) -> Counter[str]:
    totals: Counter[str] = Counter()
    for family in counter.collect():
        for sample in family.samples:
            if sample.name.endswith("_total"):
                totals[sample.labels[label]] += int(sample.value)
    return totals
