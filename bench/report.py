"""The results of one bench run as JSON and as the markdown the README shows.

Ratios compare rows of the same run only: a gateway row against the nginx row of the same kind
(allowed or rejected) and the same number of workers, and against the direct upstream.
"""

from __future__ import annotations

import contextlib
import os
import platform
import re
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from bench.ab import AbResult

Target = Literal["direct", "nginx", "gateway", "ceiling"]
# flood: one identity's rejected calls on all connections but one, another identity's allowed
# calls on the last one (the row's figures are that identity's).
Kind = Literal["allowed", "rejected", "direct", "flood"]
# The gateway's policy for a row: as the kind says, "long-log" (allowed, but a policy whose
# sliding log holds every call of the last second: 1,000,000 per 1 s) or "limit-1k" (1,000 per
# 1 s, which trips at these rates).
Policy = Literal["", "long-log", "limit-1k"]
# bench: the bench's own settings (access log off, SOAP); realistic: what a deployment runs
# (access log on, ledger on, a REST application configured).
Config = Literal["bench", "realistic"]
Protocol = Literal["soap", "rest"]
FLOOD_CONNECTIONS = 31  # the flooding identity's; the other identity has one


@dataclass(frozen=True)
class Scenario:
    target: Target
    kind: Kind
    store: str = ""  # gateway only: memory | redis
    workers: int = 1
    policy: Policy = ""
    config: Config = "bench"
    protocol: Protocol = "soap"

    @property
    def policy_kind(self) -> str:
        return self.policy or self.kind

    @property
    def name(self) -> str:
        if self.target == "direct":
            return "direct upstream (nginx, mTLS)"
        if self.target == "ceiling" and self.kind == "allowed":
            return "forwarding ceiling: bare server of this design, mTLS, upstream pool"
        if self.target == "ceiling":
            return "ceiling: bare server of this design, mTLS, fixed fault"
        what = f"gateway {self.store}" if self.target == "gateway" else "nginx"
        if self.kind == "flood":
            what += " flood (other identity's allowed calls)"
        else:
            what += f" {self.kind}"
        workers = f", {self.workers} workers" if self.workers > 1 else ""
        log = {
            "": "",
            "long-log": ", limit 1000000 per 1s",
            "limit-1k": ", limit 1000 per 1s",
        }[self.policy]
        setting = ", realistic" if self.config == "realistic" else ""
        rest = ", REST" if self.protocol == "rest" else ""
        return f"{what}{workers}{log}{setting}{rest}"

    @property
    def slug(self) -> str:
        return re.sub(r"[^a-z0-9]+", "-", self.name.lower()).strip("-")


@dataclass
class Row:
    scenario: Scenario
    result: AbResult | None = None
    error: str | None = None
    rss_kib: int = 0  # the server's RSS after the run (all its processes)
    # CPU cores busy during the measured run: the server (all its processes), ab, and anything
    # on the machine that the bench did not start (other work disturbs a row: it is flagged).
    server_cores: float = 0.0
    ab_cores: float = 0.0
    foreign_cores: float = 0.0
    store_calls: int = 0  # Redis rows: scripts Redis ran during the measured run
    warnings: list[str] = field(default_factory=list)

    @property
    def cpu_us_per_call(self) -> float | None:
        """The server's CPU time per call: what it costs, whoever else wants the CPUs."""
        if self.result is None or not self.result.rps or not self.server_cores:
            return None
        return self.server_cores * 1e6 / self.result.rps


def _find(
    rows: Sequence[Row],
    target: Target,
    kind: Kind,
    workers: int,
    like: Scenario | None = None,
    store: str = "",
    policy: Policy = "",
) -> Row | None:
    """The row of that target, kind and workers (and, given `like`, its configuration and
    protocol), with the plain policy unless one is named."""
    for row in rows:
        s = row.scenario
        if (
            s.target == target
            and s.kind == kind
            and s.workers == workers
            and s.policy == policy
            and (not store or s.store == store)
            and (like is None or (s.config, s.protocol) == (like.config, like.protocol))
            and row.result
        ):
            return row
    return None


def _ratio(row: Row, other: Row | None) -> float | None:
    if row.result is None or other is None or other.result is None or not other.result.rps:
        return None
    return row.result.rps / other.result.rps


def ratios(rows: Sequence[Row], row: Row) -> tuple[float | None, float | None]:
    s = row.scenario
    if s.target not in ("gateway", "ceiling"):
        return None, None
    # nginx rejects as the OMS policy does; its "allowed" zone never trips (as flood's timed
    # identity, and the limit rows, whose policies never trip but "limit 1000 per 1s").
    kind: Kind = "rejected" if s.kind == "rejected" else "allowed"
    nginx = _find(rows, "nginx", kind, s.workers) or _find(rows, "nginx", kind, 1)
    return _ratio(row, nginx), _ratio(row, _find(rows, "direct", "direct", 1))


def _num(value: float | None, digits: int = 2) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def load_table(rows: Sequence[Row]) -> str:
    lines = [
        "| scenario | req/s | p50 ms | p99 ms | non-2xx % | vs nginx | vs direct "
        "| server CPU µs/call | RSS MiB |",
        "|---|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for row in rows:
        r = row.result
        if r is None:
            lines.append(f"| {row.scenario.name} | failed: {row.error} | | | | | | | |")
            continue
        vs_nginx, vs_direct = ratios(rows, row)
        rss = f"{row.rss_kib / 1024:.0f}" if row.rss_kib else ""
        lines.append(
            f"| {row.scenario.name} | {r.rps:,.0f} | {r.p50_ms:.2f} | {r.p99_ms:.2f} "
            f"| {r.non_2xx_pct:.1f} | {_num(vs_nginx)} | {_num(vs_direct)} "
            f"| {_num(row.cpu_us_per_call, 0)} | {rss} |"
        )
    return "\n".join(lines)


def targets(rows: Sequence[Row]) -> list[str]:
    """The issue's targets (issue 13), each with what this run reached: met or not met. The
    targets are fixed here; a run that misses one says so."""
    out = []
    for row in rows:
        s = row.scenario
        if s.target != "gateway" or row.result is None or s.policy or s.kind == "flood":
            continue
        reached = []
        vs_nginx, _ = ratios(rows, row)
        if vs_nginx is not None and s.workers == 1:
            reached.append(f"{vs_nginx:.2f}x nginx (target ≥ 0.5x: {_met(vs_nginx >= 0.5)})")
        p99 = row.result.p99_ms
        if s.workers == 1:
            reached.append(f"p99 {p99:.2f} ms (target < 5 ms: {_met(p99 < 5)})")
        if s.store == "redis":
            memory = _find(rows, "gateway", s.kind, 1, like=s, store="memory")
            share = _ratio(row, memory)
            if share is not None:
                reached.append(
                    f"{share:.2f}x the 1-worker memory-store row "
                    f"(target ≥ 0.9x: {_met(share >= 0.9)})"
                )
        if reached:
            out.append(f"- {s.name}: " + "; ".join(reached))
    for row in rows:
        s = row.scenario
        if s.target != "gateway" or row.result is None:
            continue
        if s.policy == "long-log":
            # Against the never-tripping short-log row of the same store: the same work but the
            # log's length (1,000 per 1 ms holds a dozen calls; 1,000,000 per 1 s thousands).
            short = _find(rows, "gateway", "allowed", s.workers, like=s, store=s.store)
            share = _ratio(row, short)
            if share is not None:
                out.append(
                    f"- {s.name}: {share:.2f}x the limit 1000 per 1ms row "
                    f"(target ≥ 0.8x: {_met(share >= 0.8)})"
                )
        if s.kind == "flood":
            p99 = row.result.p99_ms
            out.append(
                f"- {s.name}: the other identity's p99 {p99:.2f} ms "
                f"(target < 10 ms: {_met(p99 < 10)})"
            )
    for kind in ("rejected", "allowed"):
        ceiling = _find(rows, "ceiling", kind, 1)
        gateway = _find(rows, "gateway", kind, 1, store="memory")
        if ceiling is None or ceiling.result is None:
            continue
        vs_nginx, _ = ratios(rows, ceiling)
        line = f"- {ceiling.scenario.name} (no target): {ceiling.result.rps:,.0f} req/s"
        if vs_nginx is not None:
            line += f", {vs_nginx:.2f}x nginx {kind}"
        share = _ratio(gateway, ceiling) if gateway is not None else None
        if share is not None:
            line += f"; the gateway's memory {kind} row is {share:.2f}x it"
        out.append(line)
    return out


def _met(ok: bool) -> str:
    return "met" if ok else "not met"


def costs_table(costs: Sequence[dict[str, object]]) -> str:
    lines = [
        "| store | live keys | decisions | µs/decision, live key rejected again (as the gateway "
        "pays it) | µs/decision, same asked of the store | µs/decision, new key allowed "
        "| store bytes/key |",
        "|---|--:|---|--:|--:|--:|--:|",
    ]
    for c in costs:
        per_key, store = c.get("bytes_per_key"), c.get("store_us")
        lines.append(
            f"| {c['store']} | {c['live_keys']:,} | {c['mode']} | {c['live_us']:.1f} "
            f"| {'' if store is None else f'{store:.1f}'} | {c['new_us']:.1f} "
            f"| {'' if per_key is None else f'{per_key:.0f}'} |"
        )
    return "\n".join(lines)


def memory_lines(memory: dict[str, object]) -> list[str]:
    n = memory["identities"]
    return [
        f"- after {n:,} distinct identities (one call each, OMS's 1 per 5 s, memory store): "
        f"RSS grew {memory['rss_growth_bytes_per_identity']:.0f} bytes per identity "
        f"({memory['rss_before_kib'] / 1024:.0f} → {memory['rss_after_kib'] / 1024:.0f} MiB);",
        f"- traced Python memory: limiter {memory['limiter_bytes_per_key']:.0f} bytes per live "
        f"key; identity cache {memory['identity_cache_entries']:,} entries (bounded) x "
        f"{memory['identity_cache_bytes_per_entry']:.0f} bytes "
        f"= {memory['identity_cache_bytes'] / 2**20:.1f} MiB;",
        f"- {memory['us_per_call']:.1f} µs per call for certificate → identity → key → "
        "decision (certificate parsing is paid once per new certificate, then cached).",
    ]


def machine() -> dict[str, str]:
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break

    def version(argv: list[str], pattern: str) -> str:
        try:
            done = subprocess.run(argv, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return ""
        match = re.search(pattern, done.stdout + done.stderr)
        return match.group(1) if match else ""

    import aiohttp

    try:
        import uvloop

        uvloop_version = uvloop.__version__
    except ImportError:
        uvloop_version = "not installed"
    try:
        import hiredis

        hiredis_version = hiredis.__version__
    except ImportError:
        hiredis_version = "not installed"

    def git(*argv: str) -> str:
        try:
            done = subprocess.run(
                ["git", *argv],
                capture_output=True,
                text=True,
                timeout=10,
                cwd=Path(__file__).resolve().parent.parent,
            )
        except (OSError, subprocess.TimeoutExpired):
            return ""
        return done.stdout.strip()

    dirty = " with uncommitted changes" if git("status", "--porcelain", "--", "gateway") else ""
    revision = git("rev-parse", "--short", "HEAD")
    return {
        "revision": revision + dirty if revision else "an unknown revision (not a git checkout)",
        "cpus": str(os.cpu_count()),
        "cpu": model,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "aiohttp": aiohttp.__version__,
        "uvloop": uvloop_version,
        "hiredis": hiredis_version,
        "nginx": version(["nginx", "-v"], r"nginx/(\S+)"),
        "ab": version(["ab", "-V"], r"Version (\S+)"),
        "redis": version(["redis-server", "--version"], r"v=(\S+)"),
    }


def machine_line(m: dict[str, str]) -> str:
    return (
        f"{m['cpus']} CPUs ({m['cpu']}), Linux {m['kernel']}, Python {m['python']}, "
        f"aiohttp {m['aiohttp']}, uvloop {m['uvloop']}, hiredis {m['hiredis']}, "
        f"nginx {m['nginx']}, ab {m['ab']}, Redis {m['redis']}; gateway at {m['revision']}"
    )
