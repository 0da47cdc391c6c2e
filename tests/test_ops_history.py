"""The ops page's last hour: per-minute series sampled from the metrics (calls forwarded and
rejected per application, store fallback, reloads), and their SVG charts in headless Chromium
after real traffic over real TLS."""

from __future__ import annotations

import os
import re
import struct
from pathlib import Path

import pytest

from gateway.ops.history import History
from gateway.ops.metrics import GatewayMetrics
from gateway.outcome import Outcome
from tests.support.ops import admin
from tests.support.stack import DRRS, OMS, StackFactory
from tests.test_ops_page import PNG_SIGNATURE, Browser, chromium

OMS_RETRIEVE = "RetrieveCurrentOutages_OMSv1_AP"
DRRS_SERVICE = "RetrieveDRLocations_DRRSv2_AP"
T0 = 1_800_000_000.0  # a minute boundary (divisible by 60)


def calls(metrics: GatewayMetrics, application: str, decision: str, n: int) -> None:
    for i in range(n):
        metrics.observe(Outcome(f"r{i}", None, application, "S", decision, "p"))


def test_minutes_get_what_the_counters_gained() -> None:
    metrics = GatewayMetrics()
    store = {"store": "redis", "state": "ok"}
    history = History(metrics, lambda: store)
    calls(metrics, "OMS", "allowed", 3)
    calls(metrics, "OMS", "rejected", 2)
    calls(metrics, "OMS", "forwarded", 1)
    calls(metrics, "", "refused", 4)  # never reached an application: not charted
    history.sample(T0 + 5)
    calls(metrics, "OMS", "rejected", 1)
    calls(metrics, "DRRS", "shadow", 2)  # shadow hits reach the upstream
    history.sample(T0 + 50)  # same minute
    store["state"] = "fallback"
    metrics.reload_result(False)
    metrics.reload_result(True)
    calls(metrics, "DRRS", "rejected", 1)
    history.sample(T0 + 65)  # the next minute

    series = history.series(T0 + 70)
    assert series["minutes"][-2:] == [T0, T0 + 60] and len(series["minutes"]) == 60
    assert series["applications"]["OMS"]["forwarded"][-2:] == [4, 0]
    assert series["applications"]["OMS"]["rejected"][-2:] == [3, 0]
    assert series["applications"]["DRRS"]["forwarded"][-2:] == [2, 0]
    assert series["applications"]["DRRS"]["rejected"][-2:] == [0, 1]
    assert list(series["applications"]) == ["DRRS", "OMS"]
    assert series["fallback"][-3:] == [None, 0.0, 1.0]
    assert series["reloads"] == {"ok": [0] * 59 + [1], "failed": [0] * 59 + [1]}

    # An hour on, those minutes have left the window (and the memory).
    history.sample(T0 + 3600 + 60)
    later = history.series(T0 + 3600 + 60)
    assert later["applications"] == {}
    assert sum(1 for value in later["fallback"] if value is not None) == 1
    assert len(history._minutes) == 1


@pytest.fixture
def browser(tmp_path: Path) -> Browser:
    return Browser(chromium(), tmp_path / "chromium-profile")


def charts(dom: str) -> dict[str, dict[str, str]]:
    """The bar charts in the dumped DOM: application -> its svg element's attributes."""
    found = {}
    for tag in re.findall(r"<svg [^>]*class=\"chart\"[^>]*>", dom):
        attributes = dict(re.findall(r'([\w-]+)="([^"]*)"', tag))
        found[attributes["data-application"]] = attributes
    return found


async def test_the_page_draws_the_last_hour_from_real_traffic(
    stack_factory: StackFactory, browser: Browser, tmp_path: Path
) -> None:
    stack = await stack_factory({"a-oms.yaml": OMS, "b-drrs.yaml": DRRS.format(per="30s")})
    client = stack.client("bleex4242")
    statuses = [(await stack.soap(client, "oms", OMS_RETRIEVE)).status for _ in range(5)]
    assert statuses == [200, 500, 500, 500, 500]
    for _ in range(3):
        assert (await stack.soap(client, "oms", "SubmitOutage_OMSv1_AP")).status == 200
    statuses = [(await stack.soap(client, "drrs", DRRS_SERVICE)).status for _ in range(2)]
    assert statuses == [200, 500]
    assert (await admin(stack, "POST", "/policies/reload"))[0] == 200
    (stack.folder / "policies" / "zz-bad.yaml").write_text("policies: {}\n")
    assert (await admin(stack, "POST", "/policies/reload"))[0] == 422
    history = stack.running.ops.history
    assert history is not None
    history.sample()  # the task samples every 5 s; the test does not wait for it

    url = f"{stack.admin_url}/ops"
    dom = await browser.dom(url)
    drawn = charts(dom)
    assert set(drawn) == {"OMS", "DRRS"}
    assert (drawn["OMS"]["data-forwarded"], drawn["OMS"]["data-rejected"]) == ("4", "4")
    assert (drawn["DRRS"]["data-forwarded"], drawn["DRRS"]["data-rejected"]) == ("1", "1")
    bars = re.findall(r'<rect class="(forwarded|rejected)"[^>]*data-value="(\d+)"', dom)
    assert sum(int(v) for kind, v in bars if kind == "rejected") == 5
    assert sum(int(v) for kind, v in bars if kind == "forwarded") == 5
    assert 'class="store-ok"' in dom and 'class="store-fallback"' not in dom
    assert 'class="reload-failed"' in dom
    reloads = re.findall(r"UTC: (\d+) ok, (\d+) refused", dom)  # the reload strip's tooltips
    assert sum(int(ok) for ok, _ in reloads) == 1
    assert sum(int(refused) for _, refused in reloads) >= 1  # the watcher may see the file first

    shot = await browser.screenshot(url, tmp_path / "ops-history.png")
    if os.environ.get("OPS_SCREENSHOT"):
        Path(os.environ["OPS_SCREENSHOT"]).with_suffix(".history.png").write_bytes(shot)
    assert shot.startswith(PNG_SIGNATURE)
    assert struct.unpack(">II", shot[16:24]) == (1200, 900)
