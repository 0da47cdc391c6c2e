"""The violation ledger's cost per rejection: the episode ledger beside the per-rejection one.

Measured in-process, through `LedgerWriter` as the gateway drives it: `observe(outcome)` for
every rejection (precomputed Outcomes, as the call path already has one), and a flush as often
as the writer's timer would run at a given rejection rate (RATE rejections/s: one flush per
`flush_interval` of rejections). Reported per rejection: the gateway's time in `observe`, its
time in all (observe and flushes, sink I/O waited for), and with the Redis sink the Redis
server's own CPU (INFO cpu, before and after).

Two traffic shapes: `flood`, every rejection for one key (one runaway client), and `spread`,
round-robin over 1,000 keys (many clients each in a lockout).

The per-rejection ledger is the one this project had before episodes (PER_REJECTION_COMMIT,
read from git into a temporary module): one JSON entry per rejection, a capped stream (XADD
MAXLEN ~) or a rotated file, flushed every 0.25 s. When git or that commit is not at hand its
rows are left out and the report says so.
"""

from __future__ import annotations

import asyncio
import importlib.util
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from redis.asyncio import Redis

from gateway.edge.identity import ClientIdentity
from gateway.limiter.base import limiter_key
from gateway.ops.ledger import FileSink, LedgerWriter, Query, StreamSink
from gateway.outcome import Outcome

# The last commit whose ledger wrote one entry per rejection (main before the episode ledger).
PER_REJECTION_COMMIT = "a9aea56"
_MOVED = {
    "identity": "edge.identity",
    "settings": "config.settings",
    "yamlread": "config.yamlread",
    "app": "outcome",
}
REJECTIONS = 50_000
RATE = 11_000  # rejections/s, one runaway client on one gateway process (the figure)
SPREAD_KEYS = 1_000
SERVICE = "RetrieveCurrentOutages_OMSv1_AP"
ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class LedgerCost:
    ledger: str  # episode | per-rejection
    sink: str  # file | redis-stream
    shape: str  # flood | spread
    rejections: int
    observe_us: float  # per rejection, in observe()
    total_us: float  # per rejection, observe and flushes
    redis_cpu_us: float | None  # per rejection, the Redis server's CPU (stream sink)
    entries: int  # what the sink holds after

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def outcomes(shape: str, n: int = REJECTIONS) -> list[Outcome]:
    """Rejections as the call path records them: OMS, retry-after under 5 s, store time rising."""
    keys = 1 if shape == "flood" else SPREAD_KEYS
    identities = [
        ClientIdentity(dn, dn.split(",")[0][3:], "CAISO", f"{i:064x}", "")
        for i, dn in enumerate(f"CN=user{i:05d},OU=people,O=CAISO,C=US" for i in range(keys))
    ]
    t0 = time.time()
    found = []
    for i in range(n):
        identity = identities[i % keys]
        t = t0 + i / RATE
        found.append(
            Outcome(
                f"req-{i:08d}",
                identity,
                "OMS",
                SERVICE,
                "rejected",
                "oms-retrieve",
                key=limiter_key(identity.subject, "OMS", SERVICE),
                status=500,
                retry_after=4.0,
                store_time=t,
            )
        )
    return found


def old_ledger() -> ModuleType | None:
    """The per-rejection ledger module from PER_REJECTION_COMMIT, or None without git or it."""
    try:
        source = subprocess.run(
            ["git", "-C", str(ROOT), "show", f"{PER_REJECTION_COMMIT}:gateway/ledger.py"],
            capture_output=True,
            text=True,
            check=True,
            timeout=30,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    # The modules it imports have moved since (issue 12's layout): point it at their new homes.
    for old, new in _MOVED.items():
        source = source.replace(f"from gateway.{old} import", f"from gateway.{new} import")
    folder = Path(tempfile.mkdtemp(prefix="ledger-old-"))
    path = folder / "per_rejection_ledger.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("per_rejection_ledger", path)
    if spec is None or spec.loader is None:
        return None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


async def _redis_cpu(client: Redis) -> float:
    info = await client.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


async def _measure(
    writer: Any, shape: str, n: int, every: int, client: Redis | None
) -> tuple[float, float, float | None]:
    batch = outcomes(shape, n)
    cpu_before = await _redis_cpu(client) if client is not None else 0.0
    in_observe = 0.0
    started = time.perf_counter()
    for start in range(0, len(batch), every):
        chunk = batch[start : start + every]
        t = time.perf_counter()
        for outcome in chunk:
            writer.observe(outcome)
        in_observe += time.perf_counter() - t
        await writer.flush()
    total = time.perf_counter() - started
    redis_cpu = None
    if client is not None:
        redis_cpu = (await _redis_cpu(client) - cpu_before) / len(batch) * 1e6
    n = len(batch)
    return in_observe / n * 1e6, total / n * 1e6, redis_cpu


async def _costs(redis_url: str, folder: Path, n: int) -> tuple[list[LedgerCost], str | None]:
    costs: list[LedgerCost] = []
    old = old_ledger()
    client = Redis.from_url(redis_url)
    try:
        for shape in ("flood", "spread"):
            for sink_name in ("file", "redis-stream"):
                await client.flushall()
                prefix = f"bench{len(costs)}"
                sink: Any
                if sink_name == "file":
                    sink = FileSink(folder / f"{prefix}.jsonl")
                else:
                    sink = StreamSink(Redis.from_url(redis_url), prefix, "bench")
                writer = LedgerWriter(sink, "subject")
                # The episode writer flushes every second: RATE rejections between flushes.
                stream = client if sink_name == "redis-stream" else None
                observe, total, cpu = await _measure(writer, shape, n, RATE, stream)
                held = len(await sink.read(Query()))
                await sink.close()
                costs.append(
                    LedgerCost(
                        "episode",
                        sink_name,
                        shape,
                        n,
                        observe,
                        total,
                        cpu,
                        held,
                    )
                )
                if old is None:
                    continue
                await client.flushall()
                if sink_name == "file":
                    old_sink = old.FileSink(folder / f"old{len(costs)}.jsonl", 1_000_000)
                else:
                    old_sink = old.StreamSink(
                        Redis.from_url(redis_url), f"{prefix}:ledger", 1_000_000, "bench"
                    )
                old_writer = old.LedgerWriter(old_sink, "subject")
                # The per-rejection writer flushed every 0.25 s.
                observe, total, cpu = await _measure(old_writer, shape, n, RATE // 4, stream)
                held = len(await old_sink.read(old.Query()))
                await old_sink.close()
                costs.append(
                    LedgerCost(
                        "per-rejection",
                        sink_name,
                        shape,
                        n,
                        observe,
                        total,
                        cpu,
                        held,
                    )
                )
    finally:
        await client.flushall()
        await client.aclose()
    missing = None if old is not None else f"no per-rejection rows: git show {PER_REJECTION_COMMIT}"
    return costs, missing


def run_ledger_costs(redis_url: str, n: int = REJECTIONS) -> tuple[list[LedgerCost], str | None]:
    """Every combination; (costs, why some rows are missing or None)."""
    with tempfile.TemporaryDirectory(prefix="bench-ledger-") as folder:
        try:
            return asyncio.run(_costs(redis_url, Path(folder), n))
        except (OSError, RuntimeError, ValueError) as exc:
            return [], f"ledger costs: {exc}"


def ledger_table(costs: Sequence[dict[str, object]]) -> str:
    lines = [
        "| ledger | sink | shape | µs/rejection in observe() | µs/rejection with flushes "
        "| Redis CPU µs/rejection | entries held after |",
        "|---|---|---|--:|--:|--:|--:|",
    ]
    for c in costs:
        cpu = c["redis_cpu_us"]
        lines.append(
            f"| {c['ledger']} | {c['sink']} | {c['shape']} | {c['observe_us']:.2f} "
            f"| {c['total_us']:.2f} | {'' if cpu is None else f'{cpu:.2f}'} | {c['entries']:,} |"
        )
    return "\n".join(lines)


def main() -> int:
    """`python -m bench.ledger redis://127.0.0.1:6379/0`: the table alone."""
    costs, missing = run_ledger_costs(sys.argv[1] if len(sys.argv) > 1 else "redis://127.0.0.1")
    print(ledger_table([c.as_dict() for c in costs]))
    if missing:
        print(missing, file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
