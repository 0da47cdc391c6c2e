"""`make bench`: every scenario in one run, the table with the ratios, results in bench/out/.

    python -m bench.run [--seconds 10] [--only gateway,nginx] [--no-keys] [--profile]

One run: demo certificates in a temporary folder; one upstream nginx (`return 200` with a small
SOAP body, one worker, plain HTTP, plus the same answer over mutual TLS for the direct row); one
redis-server (no persistence); then each scenario in turn: start its server, one probe call, a
short ab warm-up, the measured ab run, its RSS, stop it. Then the limiter's cost per decision
at 1, 10,000 and 1,000,000 live keys and the memory held per identity (see keys.py, memory.py).
Every process is stopped by PID at the end, also on Ctrl-C or SIGTERM.

`--profile` runs the single-worker gateway scenarios under py-spy instead and writes the top of
each profile to bench/out/profile-<scenario>.txt (no table of record: sampling costs a little).
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import resource
import shutil
import signal
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

from bench import configs
from bench.ab import AbResult, ab_command, parse_ab
from bench.procs import (
    Proc,
    Processes,
    StartError,
    busy_seconds,
    child_pids,
    cpu_seconds,
    free_port,
    rss_kib,
    wait_listening,
)
from bench.profile import pyspy_available, pyspy_command, summarise
from bench.report import (
    FLOOD_CONNECTIONS,
    Row,
    Scenario,
    costs_table,
    load_table,
    machine,
    machine_line,
    memory_lines,
    targets,
)
from gateway.demo.certs import DemoCerts, bundle_path, write_demo_certs

ROOT = Path(__file__).resolve().parent.parent
TOOLS = ("ab", "nginx", "redis-server")

SCENARIOS: tuple[Scenario, ...] = (
    Scenario("direct", "direct"),
    Scenario("nginx", "allowed"),
    Scenario("nginx", "rejected"),
    Scenario("gateway", "allowed", "memory"),
    Scenario("gateway", "rejected", "memory"),
    Scenario("gateway", "allowed", "redis"),
    Scenario("gateway", "rejected", "redis"),
    Scenario("nginx", "allowed", workers=2),
    Scenario("nginx", "rejected", workers=2),
    Scenario("gateway", "allowed", "redis", workers=2),
    Scenario("gateway", "rejected", "redis", workers=2),
    Scenario("gateway", "allowed", "redis", policy="long-log"),
    # Issue 13: the realistic configuration (access log on, ledger on, a REST application), for
    # SOAP and REST, memory and Redis, 1 and 2 workers (2 workers only with Redis: the memory
    # store is per process, so two workers would each allow the limit).
    *(
        Scenario("gateway", kind, store, config="realistic", protocol=protocol)
        for protocol in ("soap", "rest")
        for store in ("memory", "redis")
        for kind in ("allowed", "rejected")
    ),
    *(
        Scenario("gateway", kind, "redis", workers=2, config="realistic", protocol=protocol)
        for protocol in ("soap", "rest")
        for kind in ("allowed", "rejected")
    ),
    # The limit-independence rows: 1,000 and 1,000,000 per second on both stores.
    Scenario("gateway", "allowed", "memory", policy="limit-1k"),
    Scenario("gateway", "allowed", "memory", policy="long-log"),
    Scenario("gateway", "allowed", "redis", policy="limit-1k"),
    # One identity floods, another's allowed calls are timed.
    Scenario("gateway", "flood", "memory", config="realistic"),
    Scenario("gateway", "flood", "redis", config="realistic"),
    # The same design with nothing in it: how much is the TLS and HTTP layer's.
    Scenario("ceiling", "rejected"),
    Scenario("ceiling", "allowed"),
)
_FOREIGN_LIMIT = 0.15  # CPUs used by processes the bench did not start
PROFILED = tuple(
    s
    for s in SCENARIOS
    if s.target == "gateway" and s.workers == 1 and not s.policy and s.kind != "flood"
)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.run",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--seconds",
        type=int,
        default=int(os.environ.get("BENCH_SECONDS", "10")),
        help="length of each measured run in whole seconds (default 10, or $BENCH_SECONDS)",
    )
    parser.add_argument(
        "--warmup",
        type=int,
        default=None,
        help="ab warm-up in whole seconds before each measured run "
        "(default 2; 1 for runs under 10 s; 0 for none)",
    )
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument(
        "--only",
        default="",
        help="comma-separated words; run the scenarios whose name has them all, "
        "e.g. 'gateway memory' or 'direct,nginx allowed'",
    )
    parser.add_argument(
        "--no-keys",
        action="store_true",
        help="skip the per-decision cost and memory-per-identity measurements",
    )
    parser.add_argument(
        "--identities",
        type=int,
        default=100_000,
        help="distinct identities for the memory measurement (default 100000)",
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="profile the 1-worker gateway scenarios with py-spy instead",
    )
    parser.add_argument(
        "--gateway-src",
        type=Path,
        default=ROOT,
        help="run the gateway package from this folder instead (a patched "
        "copy, to measure a change against the same nginx)",
    )
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "out")
    args = parser.parse_args(argv)
    if args.seconds < 1:
        parser.error("--seconds must be at least 1 (ab counts whole seconds)")
    if args.warmup is None:
        args.warmup = 2 if args.seconds >= 10 else 1
    return args


def select(only: str, scenarios: Sequence[Scenario]) -> list[Scenario]:
    if not only.strip():
        return list(scenarios)
    wanted = [alt.split() for alt in only.split(",") if alt.strip()]
    return [s for s in scenarios if any(all(w in s.name for w in words) for words in wanted)]


def _tool(name: str) -> str | None:
    found = shutil.which(name)
    if found is None and Path(f"/usr/sbin/{name}").exists():
        found = f"/usr/sbin/{name}"
    return found


@dataclass
class Bench:
    """One run's fixed parts: folder, certificates, upstream and Redis, and its processes."""

    args: argparse.Namespace
    folder: Path
    procs: Processes
    certs: DemoCerts
    bundle: Path
    body: Path
    nginx: str
    upstream: Proc | None = None
    upstream_http: int = 0
    upstream_mtls: int = 0
    redis: Proc | None = None
    redis_port: int = 0
    rest_body: Path = Path()
    other_bundle: Path = Path()  # the flood row's timed identity
    flood_rps: dict[str, float] = field(default_factory=dict)  # flood rows: the flood's req/s

    @classmethod
    def started(cls, args: argparse.Namespace, folder: Path, procs: Processes) -> Bench:
        """Certificates and request bodies written into `folder`, the upstream and Redis up."""
        certs = write_demo_certs(folder / "certs")
        body = folder / "request.xml"
        body.write_text(configs.REQUEST_BODY)
        nginx = _tool("nginx") or "nginx"
        bench = cls(
            args, folder, procs, certs, bundle_path(certs.clients["jdoex1234"][0]), body, nginx
        )
        bench.rest_body = folder / "request.json"
        bench.rest_body.write_text(configs.REST_BODY)
        bench.other_bundle = bundle_path(certs.clients["asmithx5678"][0])
        bench.start_upstream()
        bench.start_redis()
        return bench

    @property
    def redis_url(self) -> str:
        return f"redis://127.0.0.1:{self.redis_port}/0"

    def start_upstream(self) -> None:
        prefix = self.folder / "upstream"
        prefix.mkdir()
        self.upstream_http, self.upstream_mtls = free_port(), free_port()
        conf = prefix / "nginx.conf"
        conf.write_text(
            configs.upstream_nginx_conf(prefix, self.certs, self.upstream_http, self.upstream_mtls)
        )
        self.upstream = self._start_nginx("upstream-nginx", prefix, conf)
        wait_listening(self.upstream, self.upstream_http)
        wait_listening(self.upstream, self.upstream_mtls)

    def start_redis(self) -> None:
        folder = self.folder / "redis"
        folder.mkdir()
        self.redis_port = free_port()
        self.redis = self.procs.start(
            "redis-server",
            [
                _tool("redis-server") or "redis-server",
                "--port",
                str(self.redis_port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(folder),
            ],
        )
        wait_listening(self.redis, self.redis_port)

    def flush_redis(self) -> None:
        import redis

        client = redis.Redis(port=self.redis_port)
        try:
            client.flushall()
        finally:
            client.close()

    def evalsha_calls(self) -> int:
        """Scripts Redis has run so far: how many calls reached the store during a row."""
        import redis

        client = redis.Redis(port=self.redis_port)
        try:
            stats = client.info("commandstats")
        finally:
            client.close()
        return sum(
            int(v.get("calls", 0))
            for k, v in stats.items()
            if k in ("cmdstat_evalsha", "cmdstat_eval")
        )

    def _start_nginx(self, name: str, prefix: Path, conf: Path) -> Proc:
        return self.procs.start(
            name, [self.nginx, "-p", f"{prefix}/", "-e", str(prefix / "error.log"), "-c", str(conf)]
        )

    def start_server(self, s: Scenario) -> tuple[Proc, int, bool]:
        """The scenario's server and port; whether the bench must stop it afterwards."""
        if s.target == "direct":
            assert self.upstream is not None
            return self.upstream, self.upstream_mtls, False
        if s.target == "nginx":
            prefix = self.folder / s.slug
            prefix.mkdir()
            ports = configs.PeerPorts(free_port(), free_port())
            conf = prefix / "nginx.conf"
            conf.write_text(
                configs.peer_nginx_conf(prefix, self.certs, self.upstream_http, ports, s.workers)
            )
            proc = self._start_nginx(s.slug, prefix, conf)
            port = ports.allowed if s.kind == "allowed" else ports.rejected
            wait_listening(proc, port)
            return proc, port, True
        if s.target == "ceiling":
            port = free_port()
            certs = self.certs
            proc = self.procs.start(
                s.slug,
                [
                    *(sys.executable, "-m", "bench.ceiling", "--port", str(port)),
                    *("--cert", str(certs.server), "--key", str(certs.server_key)),
                    *("--ca", str(certs.ca), "--crl", str(certs.crl)),
                    *(
                        ("--upstream", f"http://127.0.0.1:{self.upstream_http}")
                        if s.kind == "allowed"
                        else ()
                    ),
                ],
                cwd=ROOT,
            )
            wait_listening(proc, port)
            return proc, port, True
        store = self.redis_url if s.store == "redis" else "memory://"
        if s.store == "redis":
            self.flush_redis()
        port = free_port()
        realistic = s.config == "realistic"
        config = configs.write_gateway_config(
            self.folder / s.slug,
            self.certs,
            port,
            self.upstream_http,
            store,
            s.policy_kind,
            realistic,
        )
        # Realistic rows log each call at INFO (the access log), into the server's log file.
        env = {**os.environ, "LOG_LEVEL": "INFO" if realistic else "WARNING"}
        proc = self.procs.start(
            s.slug,
            [
                sys.executable,
                "-m",
                "gateway",
                "serve",
                "--config",
                str(config),
                "--workers",
                str(s.workers),
            ],
            env=env,
            cwd=self.args.gateway_src.resolve(),
        )
        wait_listening(proc, port, count=s.workers, timeout=30)
        return proc, port, True

    def call(self, s: Scenario) -> tuple[str, str, Path]:
        """The scenario's call: path, content type and body file."""
        if s.protocol == "rest":
            return configs.REST_PATH, configs.REST_CONTENT_TYPE, self.rest_body
        return configs.SERVICE_PATH, configs.CONTENT_TYPE, self.body

    def probe(self, port: int, s: Scenario, bundle: Path | None = None) -> int:
        """One call with the bench's client certificate; its HTTP status."""
        ctx = ssl.create_default_context(cafile=str(self.certs.ca))
        ctx.load_cert_chain(bundle or self.bundle)
        conn = http.client.HTTPSConnection("127.0.0.1", port, context=ctx, timeout=10)
        path, content_type, body = self.call(s)
        if s.kind == "flood" and bundle is not None:
            path = configs.FLOOD_OTHER_PATH
        try:
            conn.request(
                "POST", path, body=body.read_bytes(), headers={"Content-Type": content_type}
            )
            response = conn.getresponse()
            response.read()
            return response.status
        finally:
            conn.close()

    def ab(
        self, name: str, port: int, seconds: float, s: Scenario, other: bool = False
    ) -> AbResult:
        """One ab run of the scenario's call. For a flood row: the flooding identity on all
        connections but one, and at the same time (`other`) the timed identity on one."""
        if s.kind == "flood":
            return self._flood(name, port, seconds, s)
        return self._wait_ab(self._start_ab(name, port, seconds, s), name)

    def _start_ab(
        self,
        name: str,
        port: int,
        seconds: float,
        s: Scenario,
        connections: int | None = None,
        bundle: Path | None = None,
        path: str | None = None,
    ) -> Proc:
        csv = self.folder / f"{name}.csv"
        csv.unlink(missing_ok=True)
        call_path, content_type, body = self.call(s)
        cmd = ab_command(
            port,
            bundle or self.bundle,
            body,
            seconds,
            connections or self.args.connections,
            csv,
            path or call_path,
            content_type,
        )
        return self.procs.start(name, cmd)

    def _wait_ab(self, proc: Proc, name: str) -> AbResult:
        seconds = self.args.seconds
        try:
            proc.popen.wait(seconds + 60)
        except subprocess.TimeoutExpired:
            pass
        finally:
            self.procs.stop(proc)
        output = proc.log.read_text(errors="replace")
        csv = self.folder / f"{name}.csv"
        csv_text = csv.read_text() if csv.exists() else ""
        return parse_ab(output, csv_text)

    def _flood(self, name: str, port: int, seconds: float, s: Scenario) -> AbResult:
        flood = self._start_ab(f"{name}-flood", port, seconds, s, FLOOD_CONNECTIONS)
        timed = self._start_ab(
            name, port, seconds, s, 1, self.other_bundle, configs.FLOOD_OTHER_PATH
        )
        result = self._wait_ab(timed, name)
        flooded = self._wait_ab(flood, f"{name}-flood")
        self.flood_rps[s.slug] = flooded.rps
        return result

    def _measured(self, s: Scenario, row: Row, server: Proc, port: int) -> AbResult:
        """The measured ab run, and who used the CPUs meanwhile."""
        server_pids = [server.pid, *child_pids(server.pid)]
        ours = [os.getpid()]
        for helper in (self.upstream, self.redis):
            if helper is not None and helper is not server:
                ours += [helper.pid, *child_pids(helper.pid)]
        cpu = [cpu_seconds(p) for p in server_pids + ours]
        busy, children, started = busy_seconds(), _children_cpu(), time.monotonic()
        result = self.ab(f"ab-{s.slug}", port, self.args.seconds, s)
        elapsed = time.monotonic() - started
        used = [cpu_seconds(p) - before for p, before in zip(server_pids + ours, cpu, strict=True)]
        server_used = sum(used[: len(server_pids)])
        ab_used = _children_cpu() - children
        row.server_cores = server_used / elapsed
        row.ab_cores = ab_used / elapsed
        row.foreign_cores = max(0.0, busy_seconds() - busy - sum(used) - ab_used) / elapsed
        if row.foreign_cores > _FOREIGN_LIMIT:
            row.warnings.append(
                f"other work on this machine used {row.foreign_cores:.2f} CPUs "
                "during this row: its numbers are disturbed"
            )
        return result

    def run(self, s: Scenario, profile_to: Path | None = None) -> Row:
        row = Row(s)
        server: Proc | None = None
        owned = False
        try:
            server, port, owned = self.start_server(s)
            status = self.probe(port, s)
            expected = 500 if s.target == "ceiling" and s.kind == "rejected" else 200
            if status != expected:
                row.warnings.append(f"probe call answered {status}, expected {expected}")
            if s.kind == "flood" and (other := self.probe(port, s, self.other_bundle)) != 200:
                row.warnings.append(f"the other identity's probe answered {other}, expected 200")
            if self.args.warmup > 0:
                self.ab(f"ab-warmup-{s.slug}", port, self.args.warmup, s)
            spy = None
            if profile_to is not None:
                spy = self.procs.start(
                    f"py-spy-{s.slug}",
                    pyspy_command(server.pid, self.args.seconds, profile_to.with_suffix(".raw")),
                )
                time.sleep(0.3)  # let py-spy attach before the load starts
            evalsha = self.evalsha_calls() if s.store == "redis" else 0
            row.result = self._measured(s, row, server, port)
            if s.store == "redis":
                row.store_calls = self.evalsha_calls() - evalsha
                if "unreachable" in server.log.read_text(errors="replace"):
                    share = row.store_calls / max(row.result.complete, 1)
                    row.warnings.append(
                        f"the gateway logged Redis as unreachable and decided some calls with "
                        f"its local fallback (store calls per call: {share:.2f}); see "
                        f"logs/{s.slug}.log"
                    )
            row.rss_kib = rss_kib(server.pid) + sum(rss_kib(p) for p in child_pids(server.pid))
            if spy is not None and profile_to is not None:
                spy.popen.wait(30)
                self.procs.stop(spy)
                raw = profile_to.with_suffix(".raw")
                text = raw.read_text() if raw.exists() else ""
                profile_to.write_text(
                    summarise(
                        text, title=f"py-spy: {s.name}, {row.result.rps:,.0f} req/s while sampled"
                    )
                )
            row.warnings += _check(s, row.result)
        except (
            StartError,
            ValueError,
            OSError,
            http.client.HTTPException,
            subprocess.SubprocessError,
        ) as exc:
            row.error = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            print(f"  {s.name}: {exc}", file=sys.stderr)
        finally:
            if server is not None and owned:
                self.procs.stop(server)
                _keep_log(server, self.args.out / "logs" / f"{s.slug}.log")
        return row


def _keep_log(proc: Proc, to: Path) -> None:
    """The server's own log next to the results (the run's folder is deleted at the end)."""
    with contextlib.suppress(OSError):
        to.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(proc.log, to)


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _check(s: Scenario, r: AbResult) -> list[str]:
    warnings = []
    if s.kind == "rejected" and r.non_2xx_pct < 99:
        warnings.append(f"only {r.non_2xx_pct:.1f}% of calls were refused")
    if s.policy == "limit-1k":
        pass  # trips at these rates: most of its calls are rejected, by design
    elif s.kind != "rejected" and r.non_2xx:
        warnings.append(f"{r.non_2xx} calls ({r.non_2xx_pct:.2f}%) were not 2xx")
    if r.failed:
        warnings.append(f"ab counted {r.failed} failed requests (connect, receive or exception)")
    if r.keep_alive < r.complete:
        warnings.append(f"{r.complete - r.keep_alive} calls were not on keep-alive connections")
    return warnings


def _progress(row: Row) -> None:
    r = row.result
    if r is not None:
        line = (
            f"{row.scenario.name:<36} {r.rps:>9,.0f} req/s  p50 {r.p50_ms:6.2f} ms  "
            f"p99 {r.p99_ms:6.2f} ms  non-2xx {r.non_2xx_pct:5.1f}%  CPUs: server "
            f"{row.server_cores:.2f} ab {row.ab_cores:.2f} other {row.foreign_cores:.2f}"
        )
    else:
        line = f"{row.scenario.name:<36} failed: {row.error}"
    if r is not None and row.scenario.store == "redis" and r.complete:
        line += f"  store calls/call {row.store_calls / r.complete:.2f}"
    print(line, file=sys.stderr)
    for warning in row.warnings:
        print(f"{'':<36} warning: {warning}", file=sys.stderr)


def _memory_per_identity(bench: Bench, count: int) -> dict[str, object]:
    proc = bench.procs.start(
        "memory-per-identity", [sys.executable, "-m", "bench.memory", str(count)], cwd=ROOT
    )
    try:
        proc.popen.wait(600)
    finally:
        bench.procs.stop(proc)
    lines = proc.log.read_text().strip().splitlines()
    if proc.popen.returncode != 0 or not lines:
        raise RuntimeError(f"bench.memory failed:\n{proc.log_tail()}")
    result: dict[str, object] = json.loads(lines[-1])
    return result


def markdown(
    info: dict[str, str],
    args: argparse.Namespace,
    rows: Sequence[Row],
    costs: Sequence[dict[str, object]],
    memory: dict[str, object] | None,
    failures: Sequence[str] = (),
    ledger_costs: Sequence[dict[str, object]] = (),
    notes: Sequence[str] = (),
) -> str:
    parts = [
        f"Machine: {machine_line(info)}. ab, nginx, Redis and the gateway share these CPUs.",
        "",
        f"Each row: {args.seconds:g} s with ab -k, {args.connections} connections, one client "
        f"certificate, after a {args.warmup:g} s warm-up; access logs off but in the rows "
        "marked realistic (access log on, at INFO into a file; the ledger on; a REST "
        "application configured). Flood rows: one identity's rejected calls on "
        f"{FLOOD_CONNECTIONS} connections while another identity's allowed calls on one "
        "connection are timed (the row shows the timed identity). The ceiling row is a bare "
        "server of the gateway's design (its own HTTP/1.1 protocol on uvloop) behind the same "
        "mutual TLS answering a fixed fault, repeated calls replayed; the forwarding ceiling "
        "the same server passing every call to the upstream through the gateway's upstream pool "
        "(bench/ceiling.py).",
        "",
        load_table(rows),
        *notes,
    ]
    goals = targets(rows)
    if goals:
        parts += ["", "Targets (ratios from this run):", "", *goals]
    if costs:
        parts += [
            "",
            "Cost per limiter decision (in-process, see bench/keys.py):",
            "",
            costs_table(costs),
        ]
    if ledger_costs:
        from bench.ledger import PER_REJECTION_COMMIT, RATE, ledger_table

        parts += [
            "",
            "The violation ledger's cost per rejection (in-process, see bench/ledger.py; "
            f"{RATE:,} rejections/s; per-rejection = the ledger as of {PER_REJECTION_COMMIT}):",
            "",
            ledger_table(ledger_costs),
        ]
    if memory:
        parts += [
            "",
            "Memory per identity (in-process, see bench/memory.py):",
            "",
            *memory_lines(memory),
        ]
    disturbed = [r.scenario.name for r in rows if r.warnings]
    if disturbed or failures:
        parts += ["", "Warnings:", ""]
        parts += [f"- {r.scenario.name}: {w}" for r in rows for w in r.warnings]
        parts += [f"- failed: {f}" for f in failures]
    return "\n".join(parts) + "\n"


def execute(args: argparse.Namespace, folder: Path, procs: Processes) -> int:
    missing = [t for t in TOOLS if _tool(t) is None]
    if missing:
        print(
            f"missing: {', '.join(missing)}. `make bench` installs them (as root), or: "
            "sudo apt-get install apache2-utils nginx redis-server",
            file=sys.stderr,
        )
        return 2
    if args.profile and not pyspy_available():
        print("--profile needs py-spy: pip install py-spy", file=sys.stderr)
        return 2
    scenarios = select(args.only, PROFILED if args.profile else SCENARIOS)
    if not scenarios and not (args.only and not args.no_keys):
        print(f"--only {args.only!r} selects no scenario", file=sys.stderr)
        return 2

    bench = Bench.started(args, folder, procs)
    info = machine()
    print(f"bench: {machine_line(info)}", file=sys.stderr)
    print(
        f"bench: {len(scenarios)} scenarios x ({args.warmup:g} s warm-up + {args.seconds:g} s)",
        file=sys.stderr,
    )

    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for s in scenarios:
        profile_to = args.out / f"profile-{s.slug}.txt" if args.profile else None
        row = bench.run(s, profile_to)
        _progress(row)
        rows.append(row)
    if args.profile:
        for s in scenarios:
            print(f"profile: {args.out / f'profile-{s.slug}.txt'}", file=sys.stderr)
        return 0 if all(r.result for r in rows) else 1

    costs: list[dict[str, object]] = []
    ledger_costs: list[dict[str, object]] = []
    memory = None
    failures: list[str] = []
    if not args.no_keys:
        from bench.keys import run_costs

        print("bench: cost per decision at 1, 10,000 and 1,000,000 live keys ...", file=sys.stderr)
        measured, failure = run_costs(bench.redis_url)
        costs = [c.as_dict() for c in measured]
        if failure:
            failures.append(f"decision costs: {failure}")
        from bench.ledger import run_ledger_costs

        print(
            "bench: the ledger's cost per rejection (episode vs per-rejection) ...", file=sys.stderr
        )
        ledger_measured, missing = run_ledger_costs(bench.redis_url)
        ledger_costs = [c.as_dict() for c in ledger_measured]
        if missing:
            failures.append(missing)
        print(f"bench: memory per identity ({args.identities:,} identities) ...", file=sys.stderr)
        try:
            memory = _memory_per_identity(bench, args.identities)
        except (RuntimeError, OSError, ValueError) as exc:
            failures.append(f"memory per identity: {exc}")
    for failure in failures:
        print(f"bench: failed: {failure}", file=sys.stderr)

    notes = [
        f"\nThe flood in {slug}: {rps:,.0f} rejected calls/s."
        for slug, rps in bench.flood_rps.items()
    ]
    text = markdown(info, args, rows, costs, memory, failures, ledger_costs, notes)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    record = {
        "time": stamp,
        "machine": info,
        "settings": {
            "seconds": args.seconds,
            "warmup": args.warmup,
            "connections": args.connections,
            "gateway_src": str(args.gateway_src),
        },
        "rows": [
            {
                "scenario": r.scenario.name,
                "target": r.scenario.target,
                "kind": r.scenario.kind,
                "policy": configs.POLICIES.get(r.scenario.policy_kind),
                "store": r.scenario.store,
                "workers": r.scenario.workers,
                "result": r.result.as_dict() if r.result else None,
                "error": r.error,
                "rss_kib": r.rss_kib,
                "server_cpus": round(r.server_cores, 2),
                "ab_cpus": round(r.ab_cores, 2),
                "other_cpus": round(r.foreign_cores, 2),
                "server_cpu_us_per_call": round(r.cpu_us_per_call or 0, 1),
                "store_calls": r.store_calls,
                "warnings": r.warnings,
            }
            for r in rows
        ],
        "decision_costs": costs,
        "ledger_costs": ledger_costs,
        "memory_per_identity": memory,
        "failures": failures,
    }
    for name in (f"bench-{stamp}", "latest"):
        (args.out / f"{name}.json").write_text(json.dumps(record, indent=2) + "\n")
        (args.out / f"{name}.md").write_text(text)
    print(text)
    print(
        f"bench: results in {args.out / 'latest.md'} and {args.out / 'latest.json'}",
        file=sys.stderr,
    )
    return 0 if all(r.result for r in rows) else 1


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _interrupt)
    with tempfile.TemporaryDirectory(prefix="aup-bench-") as tmp:
        procs = Processes(Path(tmp))
        try:
            return execute(args, Path(tmp), procs)
        except KeyboardInterrupt:
            print("bench: interrupted; stopping every process it started", file=sys.stderr)
            return 130
        finally:
            # A second Ctrl-C must not cut the clean-up short.
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            procs.stop_all()


if __name__ == "__main__":
    sys.exit(main())
