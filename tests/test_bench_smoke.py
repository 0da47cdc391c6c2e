"""The bench's generated configuration is valid for the real programs that read it: nginx
(`nginx -t`) and the gateway's own loaders; and ab's report is read correctly. No load is run."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from bench import configs
from bench.ab import parse_ab
from bench.ledger import ledger_table, run_ledger_costs
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
    names = [s.name for s in select("gateway memory,direct", SCENARIOS)]
    assert names == [
        "direct upstream (nginx, mTLS)",
        "gateway memory allowed",
        "gateway memory rejected",
    ]
    assert len(select("", SCENARIOS)) == len(SCENARIOS)


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
