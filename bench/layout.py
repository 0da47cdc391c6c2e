"""The Redis sliding log's layouts compared: the string re-read and re-written whole per decision
(before issue 13) against the sorted set (decide.lua now), by log length.

    python -m bench.layout redis://127.0.0.1:6379/15

For each length: µs per allowed decision (EVALSHA round trip from one client, the log kept at that
length by a limit larger than the log and a window longer than the run) and Redis MEMORY USAGE
per key. The old script is read from git history (the commit before the change).
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import redis

from gateway.limiter.redis import _script

OLD_COMMIT = "28382e2"
LENGTHS = (1, 10, 100, 128, 129, 1_000, 10_000, 100_000)
ROUNDS = 300
BASE_US = 1_700_000_000_000_000


def old_script() -> str:
    root = Path(__file__).resolve().parent.parent
    return subprocess.run(
        ["git", "show", f"{OLD_COMMIT}:gateway/limiter/lua/decide.lua"],
        capture_output=True,
        text=True,
        check=True,
        cwd=root,
    ).stdout


def measure(client: redis.Redis, sha: str, name: str, length: int) -> tuple[float, int]:
    key = f"aup:{{layout-{name}-{length}|OMS|svc}}"
    client.delete(key)
    window = 10**12  # nothing leaves the window during the run
    limit = 10**9
    for i in range(length):  # fill: one decision per call, as the gateway would
        client.evalsha(sha, 1, key, limit, window, 0, BASE_US + i)
    memory = int(client.memory_usage(key) or 0)
    started = time.perf_counter()
    for i in range(ROUNDS):
        client.evalsha(sha, 1, key, limit, window, 0, BASE_US + length + i)
    us = (time.perf_counter() - started) / ROUNDS * 1e6
    client.delete(key)
    return us, memory


def main(url: str) -> None:
    client = redis.Redis.from_url(url)
    new_sha = client.script_load(_script("decide.lua")[0])
    old_sha = client.script_load(old_script())
    print(
        "| calls in the window | string: µs/decision | string: bytes/key "
        "| sorted set: µs/decision | sorted set: bytes/key |"
    )
    print("|--:|--:|--:|--:|--:|")
    for length in LENGTHS:
        old_us, old_mem = measure(client, old_sha, "string", length) if length <= 10_000 else (0, 0)
        new_us, new_mem = measure(client, new_sha, "zset", length)
        old = f"{old_us:,.0f} | {old_mem:,}" if old_mem else "(not run: minutes) | "
        print(f"| {length:,} | {old} | {new_us:,.0f} | {new_mem:,} |")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "redis://127.0.0.1:6379/15")
