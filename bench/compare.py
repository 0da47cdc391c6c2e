"""Measure a change: the gateway from two or more source folders, in interleaved rounds.

    python -m bench.compare BEFORE_DIR AFTER_DIR [...] [--rounds 3] [--seconds 6]
                            [--only "gateway memory allowed,gateway redis rejected"]

Each folder holds a `gateway/` package (a patched copy of the repository, say). One upstream
nginx and one redis-server serve every run; the rounds alternate the order of the folders so
that a slow minute on a shared machine does not favour one side. The medians are printed with
each folder's ratio to the first: requests/s, and the gateway's CPU time per call, which moves
much less than requests/s when other work competes for the CPUs.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from bench.procs import Processes
from bench.report import Row, Scenario
from bench.run import SCENARIOS, Bench, parse_args, select


def _arguments(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.compare",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "folders",
        nargs="+",
        type=Path,
        help="folders that each hold a gateway/ package; the first is the base",
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=int, default=6)
    parser.add_argument(
        "--only",
        default="gateway memory allowed,gateway memory rejected",
        help="gateway scenarios, as for bench.run --only",
    )
    return parser.parse_args(argv)


def _median(rows: list[Row], value: str) -> float:
    if value == "rps":
        return statistics.median(r.result.rps for r in rows if r.result)
    if value == "p99":
        return statistics.median(r.result.p99_ms for r in rows if r.result)
    return statistics.median(r.cpu_us_per_call or 0.0 for r in rows if r.result)


def main(argv: Sequence[str] | None = None) -> int:
    options = _arguments(argv)
    missing = [f for f in options.folders if not (f / "gateway" / "__init__.py").is_file()]
    if missing:
        print(f"no gateway/ package in: {', '.join(map(str, missing))}", file=sys.stderr)
        return 2
    scenarios = [s for s in select(options.only, SCENARIOS) if s.target == "gateway"]
    if not scenarios:
        print(f"--only {options.only!r} selects no gateway scenario", file=sys.stderr)
        return 2
    args = parse_args(["--seconds", str(options.seconds), "--warmup", "1"])
    results: dict[tuple[Path, Scenario], list[Row]] = {}
    with tempfile.TemporaryDirectory(prefix="aup-compare-") as tmp:
        folder = Path(tmp)
        procs = Processes(folder)
        try:
            bench = Bench.started(args, folder, procs)
            run = 0
            for round_ in range(options.rounds):
                order = options.folders if round_ % 2 == 0 else options.folders[::-1]
                for source in order:
                    for s in scenarios:
                        run += 1
                        args.gateway_src = source
                        bench.folder = folder / f"run-{run}"  # fresh config folders per run
                        bench.folder.mkdir()
                        row = bench.run(s)
                        results.setdefault((source, s), []).append(row)
                        r = row.result
                        print(
                            f"round {round_ + 1} {source.name:>12} {s.name:<28} "
                            + (
                                f"{r.rps:>8,.0f} req/s  p99 {r.p99_ms:6.2f} ms  "
                                f"{row.cpu_us_per_call or 0:6.1f} µs CPU/call  "
                                f"other {row.foreign_cores:.2f} CPUs"
                                if r
                                else f"failed: {row.error}"
                            ),
                            file=sys.stderr,
                        )
        except KeyboardInterrupt:
            print("interrupted; stopping every process it started", file=sys.stderr)
            return 130
        finally:
            procs.stop_all()

    print("| scenario | gateway from | req/s | vs first | µs CPU/call | vs first | p99 ms |")
    print("|---|---|--:|--:|--:|--:|--:|")
    for s in scenarios:
        base = [r for r in results.get((options.folders[0], s), []) if r.result]
        for source in options.folders:
            rows = [r for r in results.get((source, s), []) if r.result]
            if not rows:
                print(f"| {s.name} | {source} | failed | | | | |")
                continue
            rps, cpu, p99 = _median(rows, "rps"), _median(rows, "cpu"), _median(rows, "p99")
            vs_rps = f"{rps / _median(base, 'rps'):.2f}x" if base else ""
            vs_cpu = f"{cpu / _median(base, 'cpu'):.2f}x" if base and _median(base, "cpu") else ""
            print(
                f"| {s.name} | {source} | {rps:,.0f} | {vs_rps} | {cpu:.1f} | {vs_cpu} "
                f"| {p99:.2f} |"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
