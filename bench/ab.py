"""ApacheBench: the command line for one bounded run, and what its output says.

ab presents the client certificate bundle (`-E`, certificate and key in one PEM) and does not
verify the server's certificate, so no CA is passed. `-T` sets the one Content-Type header (ab
adds its own `Content-type: text/plain` to a POST otherwise, so `-H` would send two). `-l`
accepts bodies of varying length, because a fault's text carries the retry-after; without it ab
counts those as "Failed requests". Percentiles come from `-e` (CSV, microsecond resolution)
rather than the printed table (whole milliseconds).
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from pathlib import Path

from bench.configs import CONTENT_TYPE, SERVICE_PATH


@dataclass(frozen=True)
class AbResult:
    complete: int
    failed: int
    non_2xx: int
    keep_alive: int
    seconds: float
    rps: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    tls: str

    @property
    def non_2xx_pct(self) -> float:
        return 100.0 * self.non_2xx / self.complete if self.complete else 0.0

    def as_dict(self) -> dict[str, object]:
        return {**asdict(self), "non_2xx_pct": round(self.non_2xx_pct, 3)}


def ab_command(
    port: int,
    bundle: Path,
    body: Path,
    seconds: float,
    connections: int,
    csv: Path,
    path: str = SERVICE_PATH,
    content_type: str = CONTENT_TYPE,
) -> list[str]:
    return [
        "ab",
        "-k",
        "-q",
        "-l",
        "-r",
        "-E",
        str(bundle),
        "-c",
        str(connections),
        "-t",
        str(max(1, round(seconds))),  # ab reads whole seconds (atoi)
        "-n",
        "10000000",  # after -t, which implies -n 50000: the time bound is what ends a run
        "-T",
        content_type,
        "-p",
        str(body),
        "-e",
        str(csv),
        f"https://127.0.0.1:{port}{path}",
    ]


_FIELDS = {
    "complete": r"^Complete requests:\s+(\d+)",
    "failed": r"^Failed requests:\s+(\d+)",
    "non_2xx": r"^Non-2xx responses:\s+(\d+)",
    "keep_alive": r"^Keep-Alive requests:\s+(\d+)",
    "seconds": r"^Time taken for tests:\s+([\d.]+)",
    "rps": r"^Requests per second:\s+([\d.]+)",
    "tls": r"^SSL/TLS Protocol:\s+(\S+)",
}


def parse_ab(output: str, csv_text: str) -> AbResult:
    """ab's report and its `-e` CSV -> AbResult; ValueError when the run produced nothing."""
    found: dict[str, str] = {}
    for name, pattern in _FIELDS.items():
        match = re.search(pattern, output, re.MULTILINE)
        if match:
            found[name] = match.group(1)
    if "complete" not in found or "rps" not in found:
        raise ValueError(f"ab printed no results:\n{output[-2000:]}")
    percent: dict[int, float] = {}
    for line in csv_text.splitlines()[1:]:
        left, _, right = line.partition(",")
        if left.strip().isdigit() and right:
            percent[int(left)] = float(right)
    return AbResult(
        complete=int(found["complete"]),
        failed=int(found.get("failed", 0)),
        non_2xx=int(found.get("non_2xx", 0)),  # ab prints the line only when there are some
        keep_alive=int(found.get("keep_alive", 0)),
        seconds=float(found.get("seconds", 0.0)),
        rps=float(found["rps"]),
        p50_ms=percent.get(50, 0.0),
        p90_ms=percent.get(90, 0.0),
        p99_ms=percent.get(99, 0.0),
        max_ms=percent.get(100, 0.0),
        tls=found.get("tls", ""),
    )
