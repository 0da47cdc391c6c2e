"""The bench's generated configuration is valid for the real programs that read it: nginx
(`nginx -t`) and the gateway's own loaders; and ab's report is read correctly. No load is run."""

from __future__ import annotations

import asyncio
import dataclasses
import re
import ssl
import subprocess
import sys
from pathlib import Path

import pytest

from bench import configs
from bench.ab import parse_ab
from bench.ledger import ledger_table, run_ledger_costs
from bench.procs import free_port
from bench.report import Row, Scenario, targets
from bench.run import SCENARIOS, select
from gateway.config.policy import load_policies
from gateway.config.settings import load_settings
from gateway.demo.certs import DemoCerts, write_demo_certs
from tests.support.tools import require


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> DemoCerts:
    return write_demo_certs(tmp_path_factory.mktemp("certs"))


def _nginx() -> str:
    return require("nginx", package="nginx")


def _nginx_t(prefix: Path, text: str) -> None:
    conf = prefix / "nginx.conf"
    conf.write_text(text)
    done = subprocess.run(
        [_nginx(), "-t", "-p", f"{prefix}/", "-e", str(prefix / "error.log"), "-c", str(conf)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 0, done.stderr


def test_upstream_nginx_config_is_valid(tmp_path: Path, certs: DemoCerts) -> None:
    _nginx_t(tmp_path, configs.upstream_nginx_conf(tmp_path, certs, 18080, 18443))


@pytest.mark.parametrize("workers", [1, 2])
def test_peer_nginx_config_is_valid(tmp_path: Path, certs: DemoCerts, workers: int) -> None:
    text = configs.peer_nginx_conf(tmp_path, certs, 18080, configs.PeerPorts(18444, 18445), workers)
    assert "limit_req_zone $ssl_client_s_dn$uri" in text
    assert f"rate={configs.NGINX_REJECTED_RATE}" in text
    _nginx_t(tmp_path, text)


@pytest.mark.parametrize(
    "kind, limit, per",
    [
        ("allowed", 1000, 0.001),
        ("long-log", 1_000_000, 1.0),
        ("rejected", 1, 5.0),
    ],
)
@pytest.mark.parametrize("store", ["memory://", "redis://127.0.0.1:6390/0"])
def test_gateway_config_loads(
    tmp_path: Path, certs: DemoCerts, kind: str, limit: int, per: float, store: str
) -> None:
    path = configs.write_gateway_config(tmp_path, certs, 18500, 18080, store, kind)
    settings = load_settings(path)
    assert settings.access_log is False
    assert settings.admin is None
    assert settings.store.url == store
    policy = load_policies(settings).match("OMS", "RetrieveCurrentOutages_OMSv1_AP", "POST")
    assert policy is not None
    assert (policy.rate.limit, policy.rate.per) == (limit, per)


AB_OUTPUT = """\
Server Software:        nginx
Server Hostname:        127.0.0.1
Server Port:            40001
SSL/TLS Protocol:       TLSv1.3,TLS_AES_256_GCM_SHA384,256,256

Document Path:          /sst/oms/RetrieveCurrentOutages_OMSv1_AP
Document Length:        Variable

Concurrency Level:      32
Time taken for tests:   10.001 seconds
Complete requests:      60909
Failed requests:        2
   (Connect: 0, Receive: 0, Length: 0, Exceptions: 2)
Non-2xx responses:      60908
Keep-Alive requests:    60909
Requests per second:    6090.30 [#/sec] (mean)
"""
AB_CSV = "Percentage served,Time in ms\n" + "\n".join(f"{i},{i / 10:.3f}" for i in range(101))


def test_ab_report_is_read() -> None:
    r = parse_ab(AB_OUTPUT, AB_CSV)
    assert (r.complete, r.failed, r.non_2xx, r.keep_alive) == (60909, 2, 60908, 60909)
    assert r.rps == 6090.30 and r.seconds == 10.001
    assert (r.p50_ms, r.p99_ms, r.max_ms) == (5.0, 9.9, 10.0)
    assert r.tls.startswith("TLSv1.3")
    assert r.non_2xx_pct == pytest.approx(99.998, abs=0.001)


def test_ab_report_without_results_is_an_error() -> None:
    with pytest.raises(ValueError, match="no results"):
        parse_ab("Benchmarking 127.0.0.1 (be patient)...\n", "")


def test_only_selects_scenarios_by_words() -> None:
    names = [s.name for s in select("gateway memory rejected,direct", SCENARIOS)]
    assert names == [
        "direct upstream (nginx, mTLS)",
        "gateway memory rejected",
        "gateway memory rejected, realistic",
        "gateway memory rejected, realistic, REST",
    ]
    assert len(select("", SCENARIOS)) == len(SCENARIOS)


def test_issue_13_rows_are_in_the_bench() -> None:
    """Realistic rows for SOAP and REST, memory and Redis, 1 and 2 workers; the limit rows;
    the flood rows and the ceiling row."""
    names = {s.name for s in SCENARIOS}
    for protocol in ("", ", REST"):
        for kind in ("allowed", "rejected"):
            for store in ("memory", "redis"):
                assert f"gateway {store} {kind}, realistic{protocol}" in names
            assert f"gateway redis {kind}, 2 workers, realistic{protocol}" in names
    for store in ("memory", "redis"):
        assert f"gateway {store} allowed, limit 1000 per 1s" in names
        assert f"gateway {store} allowed, limit 1000000 per 1s" in names
        assert f"gateway {store} flood (other identity's allowed calls), realistic" in names
    assert "ceiling: bare server of this design, mTLS, fixed fault" in names
    assert "forwarding ceiling: bare server of this design, mTLS, upstream pool" in names
    assert len({s.slug for s in SCENARIOS}) == len(SCENARIOS)  # one log file per row


def test_realistic_config_has_the_access_log_and_a_rest_route(
    tmp_path: Path, certs: DemoCerts
) -> None:
    path = configs.write_gateway_config(
        tmp_path, certs, 18500, 18080, "memory://", "flood", realistic=True
    )
    settings = load_settings(path)
    assert settings.access_log is True
    policies = load_policies(settings)
    flooded = policies.match("OMS", "RetrieveCurrentOutages_OMSv1_AP", "POST")
    other = policies.match("OMS", "SubmitOutage_OMSv1_AP", "POST")
    rest = policies.match("CRR", "portfolioSubmission", "POST")
    assert flooded is not None and (flooded.rate.limit, flooded.rate.per) == (1, 5.0)
    assert other is not None and other.rate.limit == configs.ALLOWED_LIMIT
    assert rest is not None and rest.name == "bench-flood-rest"
    assert "CRR" in settings.applications


def _row(scenario: Scenario, rps: float, p99: float) -> Row:
    result = parse_ab(AB_OUTPUT.replace("6090.30", f"{rps:.2f}"), AB_CSV)
    return Row(scenario, result=dataclasses.replace(result, p99_ms=p99))


def test_targets_say_met_or_not_met_and_keep_the_issue_targets() -> None:
    rows = [
        _row(Scenario("nginx", "allowed"), 40_000, 1.0),
        _row(Scenario("nginx", "rejected"), 70_000, 1.0),
        _row(Scenario("gateway", "allowed", "memory", config="realistic"), 21_000, 4.0),
        _row(Scenario("gateway", "rejected", "memory", config="realistic"), 14_000, 6.0),
        _row(Scenario("gateway", "rejected", "redis", config="realistic"), 13_000, 6.0),
        _row(Scenario("gateway", "allowed", "memory"), 10_000, 3.0),
        _row(Scenario("gateway", "allowed", "memory", policy="long-log"), 7_000, 3.0),
        _row(Scenario("gateway", "flood", "memory", config="realistic"), 500, 9.0),
        _row(Scenario("ceiling", "rejected"), 20_000, 2.0),
        _row(Scenario("ceiling", "allowed"), 21_000, 2.0),
    ]
    lines = targets(rows)
    text = "\n".join(lines)
    assert (
        "- gateway memory allowed, realistic: 0.53x nginx (target ≥ 0.5x: met); "
        "p99 4.00 ms (target < 5 ms: met)" in lines
    )
    assert "0.20x nginx (target ≥ 0.5x: not met); p99 6.00 ms (target < 5 ms: not met)" in text
    assert "0.93x the 1-worker memory-store row (target ≥ 0.9x: met)" in text
    assert "0.70x the limit 1000 per 1ms row (target ≥ 0.8x: not met)" in text
    assert "the other identity's p99 9.00 ms (target < 10 ms: met)" in text
    assert "the gateway's memory rejected row is 0.70x it" in text
    assert "the gateway's memory allowed row is 1.00x it" in text


async def test_the_ceiling_server_answers_a_fault_over_mutual_tls(
    tmp_path: Path, certs: DemoCerts
) -> None:
    port = free_port()
    proc = subprocess.Popen(
        [
            *(sys.executable, "-m", "bench.ceiling", "--port", str(port)),
            *("--cert", str(certs.server), "--key", str(certs.server_key)),
            *("--ca", str(certs.ca), "--crl", str(certs.crl)),
        ],
        cwd=Path(__file__).resolve().parent.parent,
    )
    try:
        ctx = ssl.create_default_context(cafile=str(certs.ca))
        ctx.load_cert_chain(*certs.clients["jdoex1234"])
        for _ in range(100):
            try:
                reader, writer = await asyncio.open_connection(
                    "127.0.0.1", port, ssl=ctx, server_hostname="localhost"
                )
                break
            except OSError:
                await asyncio.sleep(0.1)
        call = b"POST /sst/oms/X HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n"
        for _ in range(3):  # the first answered by its handler, the rest replayed
            writer.write(call)
            head = await reader.readuntil(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 500")
            length = re.search(rb"Content-Length: (\d+)", head)
            assert length is not None
            assert b"Acceptable Use Policy" in await reader.readexactly(int(length[1]))
        writer.close()
        # Without a client certificate the handshake is refused.
        bare = ssl.create_default_context(cafile=str(certs.ca))
        with pytest.raises((ssl.SSLError, ConnectionError)):
            reader, writer = await asyncio.open_connection(
                "127.0.0.1", port, ssl=bare, server_hostname="localhost"
            )
            writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            await writer.drain()
            if not await reader.read():
                raise ConnectionError("closed")
    finally:
        proc.terminate()
        proc.wait(10)


def test_the_ledger_bench_measures_both_ledgers(redis_url: str) -> None:
    """A small run of bench/ledger.py: the episode ledger holds one entry per lockout (1 for a
    flood, 1,000 when spread over 1,000 keys), the per-rejection one an entry per rejection.
    The per-rejection rows need the old ledger from git history, which a shallow clone (CI may
    make one) lacks: then the bench says so and only the episode rows are checked."""
    costs, missing = run_ledger_costs(redis_url, n=3_000)
    held = {(c.ledger, c.sink, c.shape): c.entries for c in costs}
    for sink in ("file", "redis-stream"):
        assert held[("episode", sink, "flood")] == 1
        assert held[("episode", sink, "spread")] == 1_000
        if missing is None:
            assert held[("per-rejection", sink, "flood")] == 3_000
        else:
            assert "git show" in missing
    assert all(c.total_us > 0 for c in costs)
    assert "| episode | redis-stream | flood |" in ledger_table([c.as_dict() for c in costs])
