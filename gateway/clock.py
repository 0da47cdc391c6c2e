"""The gateway's wall clock: the one place it is read.

What decides or stamps on wall time (the limiter backends, faults' timestamps, the ledger, the
access log) takes a `Clock`, passed in from the server (ops/server.py), as envoy's ratelimit
passes its TimeSource; tests pass a clock they move by hand. Durations are not wall time: they
use time.monotonic or time.perf_counter. The Redis backend decides on the store's own TIME,
inside its scripts, so that every replica shares one clock.
"""

from __future__ import annotations

import time
from collections.abc import Callable

Clock = Callable[[], float]  # epoch seconds


def wall_clock() -> float:
    """The system's wall clock, in epoch seconds."""
    return time.time()
