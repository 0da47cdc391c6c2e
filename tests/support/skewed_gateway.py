"""`python -m tests.support.skewed_gateway serve --config ...`: the real gateway CLI, with this
process's wall clock moved by AUP_TEST_CLOCK_OFFSET seconds (tests only).

The gateway reads the wall clock through `time.time` (the limiter's clock, the fallback's
timestamps, `/readyz`'s "since"); moving it here, before `gateway` is imported, gives a replica
a clock that disagrees with its neighbours' by hours, without a test hook in the gateway itself.
Monotonic time (timeouts, the breaker) and OpenSSL's certificate checks keep the real clock, as
they would on a machine whose NTP is off.
"""

from __future__ import annotations

import os
import sys
import time


def _skew_wall_clock(offset: float) -> None:
    real_time, real_time_ns = time.time, time.time_ns
    offset_ns = round(offset * 1e9)

    def skewed_time() -> float:
        return real_time() + offset

    def skewed_time_ns() -> int:
        return real_time_ns() + offset_ns

    time.time = skewed_time
    time.time_ns = skewed_time_ns


def main() -> int:
    offset = float(os.environ.get("AUP_TEST_CLOCK_OFFSET") or 0.0)
    if offset:
        _skew_wall_clock(offset)
    from gateway.cli import main as cli_main

    return cli_main(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
