"""The per-call metrics kept as plain numbers (ops/metrics.py CallCounter, CallHistogram) expose
exactly what prometheus_client's own Counter and Histogram would for the same calls."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import Metric
from prometheus_client.exposition import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

from gateway.ops import metrics
from gateway.ops.metrics import LATENCY_BUCKETS, STORE_BUCKETS, CallCounter, CallHistogram
from gateway.outcome import Outcome


def samples(registry: CollectorRegistry) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = generate_latest(registry).decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if not s.name.endswith("_created")
    }


def test_call_metrics_expose_what_prometheus_client_would() -> None:
    # Values on the bucket bounds too: `le` means less than or equal.
    values = [0.0, 0.00005, 0.00007, 0.0005, 0.0011, 0.5, 2.5, 59.0, 60.0, 61.0, 1e9]
    ours, theirs = CollectorRegistry(), CollectorRegistry()

    counter = CallCounter("aup_calls", "calls", ["decision"])
    histogram = CallHistogram("aup_times_seconds", "times", ["decision"], LATENCY_BUCKETS)
    plain = CallHistogram("aup_store_seconds", "store", [], STORE_BUCKETS)

    class Ours(Collector):
        def collect(self) -> Iterator[Metric]:
            for metric in (counter, histogram, plain):
                yield from metric.collect()

    ours.register(Ours())
    their_counter = Counter("aup_calls", "calls", ["decision"], registry=theirs)
    their_histogram = Histogram(
        "aup_times_seconds", "times", ["decision"], buckets=LATENCY_BUCKETS, registry=theirs
    )
    their_plain = Histogram("aup_store_seconds", "store", buckets=STORE_BUCKETS, registry=theirs)
    for n, value in enumerate(values):
        decision = "rejected" if n % 3 else "allowed"
        counter.child(decision).value += 1
        their_counter.labels(decision).inc()
        histogram.child(decision).observe(value)
        their_histogram.labels(decision).observe(value)
        plain.child().observe(value)
        their_plain.observe(value)

    assert samples(ours) == samples(theirs)
    assert samples(ours)[("aup_calls_total", (("decision", "rejected"),))] == 7


def test_services_past_the_series_bound_are_counted_together(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Service names come from URLs: past MAX_SERIES label sets, new ones go to `_other`."""
    monkeypatch.setattr(metrics, "MAX_SERIES", 3)
    m = metrics.GatewayMetrics()
    for service in ("a", "b", "c", "d", "e", "a"):
        m.observe(Outcome("r", None, "OMS", service, "forwarded"))
    counted = {
        dict(labels)["service"]: value
        for (name, labels), value in samples(m.registry).items()
        if name == "aup_requests_total"
    }
    assert counted == {"a": 2, "b": 1, "c": 1, metrics.OTHER: 2}
