"""Prometheus metrics for one gateway: a registry of its own, fed by an observer per call.

Each Gateway gets its own `CollectorRegistry` (never the library's global one), so several
gateways in one process (the tests) or a reload of the module never collide. The per-call cost is
what matters: `observe()` runs for every finished call. The per-call series (requests,
violations, durations, store and upstream) are `CallCounter` and `CallHistogram`: plain numbers
that only the event loop writes, so an increment takes no lock (prometheus_client's own take one
per increment: four to six per call), turned into the same metric families when Prometheus
scrapes. Their labelled children are looked up once per label tuple and kept in plain dicts.
Service names come from request URLs, so the number of label sets per metric is bounded; past
the bound, new services are counted under `service="_other"`.

What does not change per call (store state, loaded policies, ledger queue, the last reload) is
read when Prometheus scrapes, by `StateCollector`, from callables the server hands it.
"""

from __future__ import annotations

import time
from bisect import bisect_left
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from gateway.outcome import VIOLATIONS

if TYPE_CHECKING:
    from gateway.outcome import Outcome

MAX_SERIES = 5_000  # per metric; new label sets past this go to service="_other"
OTHER = "_other"
# A limiter decision is tens of microseconds in memory and a few hundred over loopback Redis.
STORE_BUCKETS = (
    0.00005,
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
)
LATENCY_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
)


class _Count:
    __slots__ = ("created", "value")

    def __init__(self) -> None:
        self.value = 0.0
        self.created = time.time()

    def inc(self) -> None:
        self.value += 1


class _Observations:
    __slots__ = ("bounds", "counts", "created", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last is +Inf
        self.sum = 0.0
        self.created = time.time()

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1  # the first bucket with le >= value
        self.sum += value


class CallCounter:
    """A labelled counter of calls, exposed as prometheus_client's Counter is (`_total`,
    `_created`). Only the event loop writes it."""

    def __init__(self, name: str, documentation: str, labels: Sequence[str]) -> None:
        self.name, self.documentation, self.labels = name, documentation, list(labels)
        self._children: dict[tuple[str, ...], _Count] = {}

    def __len__(self) -> int:
        return len(self._children)

    def known(self, values: tuple[str, ...]) -> _Count | None:
        """The child of these label values if it exists already."""
        return self._children.get(values)

    def child(self, *values: str) -> _Count:
        child = self._children.get(values)
        if child is None:
            child = self._children[values] = _Count()
        return child

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(self.name, self.documentation, labels=self.labels)
        for values, child in list(self._children.items()):
            family.add_metric(list(values), child.value, created=child.created)
        yield family


class CallHistogram:
    """A labelled histogram of call times, exposed as prometheus_client's Histogram is
    (`_bucket`, `_count`, `_sum`). Only the event loop writes it."""

    def __init__(
        self, name: str, documentation: str, labels: Sequence[str], buckets: tuple[float, ...]
    ) -> None:
        self.name, self.documentation, self.labels = name, documentation, list(labels)
        self._bounds = buckets
        # Each bound's `le` label as prometheus_client writes it (0.0005, 1.0, +Inf, ...).
        self._les = [floatToGoString(b) for b in (*buckets, float("inf"))]  # type: ignore[no-untyped-call]
        self._children: dict[tuple[str, ...], _Observations] = {}

    def child(self, *values: str) -> _Observations:
        child = self._children.get(values)
        if child is None:
            child = self._children[values] = _Observations(self._bounds)
        return child

    def collect(self) -> Iterator[Metric]:
        family = HistogramMetricFamily(self.name, self.documentation, labels=self.labels)
        for values, child in list(self._children.items()):
            cumulative, buckets = 0, []
            for le, count in zip(self._les, child.counts, strict=True):
                cumulative += count
                buckets.append((le, float(cumulative)))
            family.add_metric(list(values), buckets, child.sum)
        yield family


class _CallMetrics(Collector):
    def __init__(self, metrics: Sequence[CallCounter | CallHistogram]) -> None:
        self._metrics = metrics

    def describe(self) -> list[Metric]:
        return []  # the names are fixed in GatewayMetrics; nothing to check in advance

    def collect(self) -> Iterator[Metric]:
        for metric in self._metrics:
            yield from metric.collect()


@dataclass(frozen=True)
class StateSources:
    """Where the scrape-time state comes from; each returns a JSON-like mapping or None."""

    store: Callable[[], Mapping[str, Any] | None]
    policies: Callable[[], Mapping[str, Any]]
    ledger: Callable[[], Mapping[str, Any] | None]
    draining: Callable[[], bool]


class GatewayMetrics:
    """The gateway's metrics; `observe` is the per-call observer (no I/O, no allocation
    beyond the first call of each label set)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = CallCounter(
            "aup_requests",
            "Finished calls by application, service and decision "
            "(forwarded, allowed, rejected, shadow, exempt, refused).",
            ["application", "service", "decision"],
        )
        self.violations = CallCounter(
            "aup_violations",
            "Calls over a policy's limit: rejected (enforced) or shadow (recorded, let through).",
            ["policy", "application", "decision"],
        )
        self.duration = CallHistogram(
            "aup_request_duration_seconds",
            "Time from request to response, by decision.",
            ["decision"],
            LATENCY_BUCKETS,
        )
        self.store_latency = CallHistogram(
            "aup_store_latency_seconds",
            "Time one limiter decision took (store round trip, or the local fallback).",
            [],
            STORE_BUCKETS,
        )
        self.upstream_responses = CallCounter(
            "aup_upstream_responses",
            "Upstream answers by application and HTTP status "
            "('error' when the upstream could not be reached or timed out).",
            ["application", "status"],
        )
        self.upstream_latency = CallHistogram(
            "aup_upstream_latency_seconds",
            "Time spent forwarding a call and relaying its answer, by application.",
            ["application"],
            LATENCY_BUCKETS,
        )
        r.register(
            _CallMetrics(
                [
                    self.requests,
                    self.violations,
                    self.duration,
                    self.store_latency,
                    self.upstream_responses,
                    self.upstream_latency,
                ]
            )
        )
        self._store_latency = self.store_latency.child()
        self.reloads = Counter(
            "aup_policy_reloads",
            "Policy reload attempts by result (ok, failed).",
            ["result"],
            registry=r,
        )
        self.tls_refused = Counter(
            "aup_tls_handshakes_refused",
            "TLS handshakes the listener refused, by reason.",
            ["reason"],
            registry=r,
        )
        self.support_actions = Counter(
            "aup_support_actions",
            "Admin support actions (e.g. clearing a key).",
            ["action"],
            registry=r,
        )
        # By (application, status as a number): no str(status) per call.
        self._upstream: dict[tuple[str, int], _Count] = {}
        for result in ("ok", "failed"):
            self.reloads.labels(result)  # both series exist from the start, at 0

    def observe(self, outcome: Outcome) -> None:
        """The observer: count one finished call."""
        decision = outcome.decision
        key = (outcome.application, outcome.service, decision)
        child = self.requests.known(key)
        if child is None:
            child = self._request_child(key)
        child.value += 1
        self.duration.child(decision).observe(outcome.elapsed)
        if outcome.store_latency:
            self._store_latency.observe(outcome.store_latency)
        if decision in VIOLATIONS:  # policies and applications come from config: bounded
            self.violations.child(outcome.policy, outcome.application, decision).value += 1
        status = outcome.upstream_status
        if status or outcome.upstream_failed:
            ukey = (outcome.application, status)
            upstream = self._upstream.get(ukey)
            if upstream is None:
                upstream = self._upstream[ukey] = self.upstream_responses.child(
                    outcome.application, str(status) if status else "error"
                )
            upstream.value += 1
            if outcome.upstream_latency:
                latency = self.upstream_latency.child(outcome.application)
                latency.observe(outcome.upstream_latency)

    def reload_result(self, ok: bool) -> None:
        self.reloads.labels("ok" if ok else "failed").inc()

    def handshake_refused(self, reason: str) -> None:
        self.tls_refused.labels(reason).inc()

    def support_action(self, action: str) -> None:
        self.support_actions.labels(action).inc()

    def add_state(self, sources: StateSources) -> None:
        """Expose the scrape-time state (store, policies, ledger, draining)."""
        self.registry.register(StateCollector(sources))

    def _request_child(self, key: tuple[str, str, str]) -> _Count:
        # Service names come from URLs: past MAX_SERIES label sets, new ones are folded together.
        if len(self.requests) >= MAX_SERIES:
            key = (key[0], OTHER, key[2])
        return self.requests.child(*key)


class StateCollector(Collector):
    """Gauges and counters read at scrape time from the running gateway's parts."""

    def __init__(self, sources: StateSources) -> None:
        self._sources = sources

    def describe(self) -> list[Metric]:
        return []  # values only exist at scrape time; nothing to check in advance

    def collect(self) -> Iterator[Metric]:
        yield from self._store()
        yield from self._policies()
        yield from self._ledger()
        draining = GaugeMetricFamily(
            "aup_draining", "1 while the gateway finishes in-flight calls before it exits."
        )
        draining.add_metric([], 1.0 if self._sources.draining() else 0.0)
        yield draining

    def _store(self) -> Iterator[Metric]:
        status = self._sources.store()
        if status is None:
            return
        fallback = GaugeMetricFamily(
            "aup_store_fallback",
            "1 while the shared store is unreachable and decisions follow on_store_error.",
            labels=["store", "mode"],
        )
        fallback.add_metric(
            [str(status.get("store", "")), str(status.get("mode", ""))],
            1.0 if status.get("state") == "fallback" else 0.0,
        )
        yield fallback
        errors = CounterMetricFamily(
            "aup_store_errors",
            "Store calls that failed (refused, timed out, reset).",
            labels=["store"],
        )
        errors.add_metric([str(status.get("store", ""))], float(status.get("errors", 0) or 0))
        yield errors
        degraded = CounterMetricFamily(
            "aup_store_fallback_decisions",
            "Decisions made without the store (local, allow or deny).",
            labels=["store"],
        )
        degraded.add_metric(
            [str(status.get("store", ""))], float(status.get("fallback_decisions", 0) or 0)
        )
        yield degraded
        reconciled = CounterMetricFamily(
            "aup_store_reconciled_calls",
            "Calls the local fallback allowed during an outage, merged into the store after it.",
            labels=["store"],
        )
        reconciled.add_metric(
            [str(status.get("store", ""))], float(status.get("reconciled_calls", 0) or 0)
        )
        yield reconciled
        excess = CounterMetricFamily(
            "aup_store_excess_calls",
            "Calls allowed beyond a policy across a store outage (found at reconciliation; "
            "each key is also a ledger entry with decision excess).",
            labels=["store"],
        )
        excess.add_metric([str(status.get("store", ""))], float(status.get("excess_calls", 0) or 0))
        yield excess

    def _policies(self) -> Iterator[Metric]:
        view = self._sources.policies()
        info = GaugeMetricFamily(
            "aup_policy_set_info", "The loaded policy set (value 1).", labels=["version"]
        )
        info.add_metric([str(view.get("version", ""))], 1.0)
        yield info
        loaded = GaugeMetricFamily("aup_policies_loaded", "Policies in the loaded set.")
        loaded.add_metric([], float(view.get("count", 0)))
        yield loaded
        last_ok = GaugeMetricFamily(
            "aup_policy_last_reload_ok",
            "1 if the last reload attempt succeeded, 0 if it failed (the previous set still runs).",
        )
        last_ok.add_metric([], 1.0 if view.get("last_ok", True) else 0.0)
        yield last_ok
        last_at = GaugeMetricFamily(
            "aup_policy_last_reload_timestamp_seconds",
            "When the last reload was attempted (epoch seconds).",
        )
        last_at.add_metric([], float(view.get("last_at", 0.0)))
        yield last_at

    def _ledger(self) -> Iterator[Metric]:
        status = self._sources.ledger()
        if status is None:
            return
        entries = CounterMetricFamily(
            "aup_ledger_entries",
            "Ledger entry versions written, and final episodes dropped when the queue overflowed.",
            labels=["result"],
        )
        entries.add_metric(["written"], float(status.get("written", 0)))
        entries.add_metric(["dropped"], float(status.get("dropped", 0)))
        yield entries
        episodes = CounterMetricFamily(
            "aup_ledger_episodes", "Lockout episodes written final to the ledger."
        )
        episodes.add_metric([], float(status.get("episodes", 0)))
        yield episodes
        evicted = CounterMetricFamily(
            "aup_ledger_evicted_episodes",
            "Final episodes dropped because their identity reached ledger.max_per_identity.",
        )
        evicted.add_metric([], float(status.get("evicted", 0)))
        yield evicted
        bounded = GaugeMetricFamily(
            "aup_ledger_identities_at_bound",
            "Identities whose ledger bound has dropped episodes since this process started.",
        )
        bounded.add_metric([], float(status.get("evicted_identities", 0)))
        yield bounded
        open_episodes = GaugeMetricFamily(
            "aup_ledger_open_episodes", "Episodes whose key is still locked (written each flush)."
        )
        open_episodes.add_metric([], float(status.get("open_episodes", 0)))
        yield open_episodes
        errors = CounterMetricFamily(
            "aup_ledger_write_errors", "Ledger flushes that failed (kept queued and retried)."
        )
        errors.add_metric([], float(status.get("errors", 0)))
        yield errors
        pending = GaugeMetricFamily("aup_ledger_pending", "Entries queued, not yet written.")
        pending.add_metric([], float(status.get("pending", 0)))
        yield pending
