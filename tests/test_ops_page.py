"""The ops page in a real browser: headless Chromium loads /ops from the admin listener, its
script fetches /ops/data, and the DOM it builds shows the offenders that real violations (over
real TLS) produced, the loaded policies and the last reload; a screenshot is taken and checked.

Chromium is the Debian package `chromium` (`make test` installs it). Without it these tests fail
when CI is set, and skip otherwise.
"""

from __future__ import annotations

import asyncio
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import pytest
from defusedxml import ElementTree

from gateway.config.settings import AdminSettings
from gateway.limiter.memory import MemoryLimiter
from tests.support.clock import FakeClock
from tests.support.ops import admin, restart_with
from tests.support.stack import DRRS, OMS, Stack, StackFactory
from tests.support.tools import require

OMS_RETRIEVE = "RetrieveCurrentOutages_OMSv1_AP"
DRRS_SERVICE = "RetrieveDRLocations_DRRSv2_AP"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def chromium() -> str:
    return require("chromium", "chromium-browser", package="chromium")


@dataclass
class Browser:
    executable: str
    profile: Path

    async def run(self, url: str, *mode: str, timeout: float = 60.0) -> bytes:
        """Run headless Chromium on `url` (the event loop keeps serving meanwhile); stdout."""
        process = await asyncio.create_subprocess_exec(
            self.executable,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-first-run",
            "--hide-scrollbars",
            f"--user-data-dir={self.profile}",
            "--window-size=1200,900",
            "--virtual-time-budget=3000",
            *mode,
            url,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        try:
            out, err = await asyncio.wait_for(process.communicate(), timeout)
        except TimeoutError:
            process.kill()
            await process.wait()
            raise
        assert process.returncode == 0, err.decode(errors="replace")[-2000:]
        return out

    async def dom(self, url: str) -> str:
        return (await self.run(url, "--dump-dom")).decode()

    async def screenshot(self, url: str, path: Path) -> bytes:
        await self.run(url, f"--screenshot={path}")
        return path.read_bytes()


@pytest.fixture
def browser(tmp_path: Path) -> Browser:
    return Browser(chromium(), tmp_path / "chromium-profile")


def rows(dom: str, table: str) -> list[list[str]]:
    """The text of each cell of a table's body, from the DOM Chromium dumped."""
    start = dom.index(f'<table id="{table}">')
    end = dom.index("</table>", start) + len("</table>")
    root = ElementTree.fromstring(dom[start:end].replace("&nbsp;", " "))
    body = root.find("tbody")
    assert body is not None
    return [["".join(cell.itertext()).strip() for cell in tr] for tr in body]


async def _violations(stack: Stack) -> None:
    """bleex4242 breaks the OMS policy five times, jdoex1234 once, asmithx5678 twice on DRRS."""
    for user, app, service, calls in (
        ("bleex4242", "oms", OMS_RETRIEVE, 6),
        ("jdoex1234", "oms", OMS_RETRIEVE, 2),
        ("asmithx5678", "drrs", DRRS_SERVICE, 3),
    ):
        client = stack.client(user)
        for _ in range(calls):
            await stack.soap(client, app, service)
    await stack.running.ledger.flush()


async def test_the_page_shows_live_offenders_policies_and_the_last_reload(
    stack_factory: StackFactory, browser: Browser, tmp_path: Path
) -> None:
    clock = FakeClock()
    stack = await stack_factory(
        {"a-oms.yaml": OMS, "b-drrs.yaml": DRRS.format(per="30s")}, limiter=MemoryLimiter(clock)
    )
    await _violations(stack)
    url = f"{stack.admin_url}/ops"

    dom = await browser.dom(url)
    offenders = rows(dom, "offenders")
    assert [row[:2] for row in offenders] == [
        ["bleex4242", "5"],
        ["asmithx5678", "2"],
        ["jdoex1234", "1"],
    ]
    violations = rows(dom, "violations")
    assert violations[0][:6] == ["bleex4242", "OMS", OMS_RETRIEVE, "oms-retrieve", "5", "0"]
    assert ["asmithx5678", "DRRS", DRRS_SERVICE, "drrs-per-service", "2", "0"] in [
        row[:6] for row in violations
    ]
    recent = rows(dom, "recent")
    assert len(recent) == 3  # one open episode per participant and service
    assert sorted(row[1] for row in recent) == [
        "rejected x1 (open)",
        "rejected x2 (open)",
        "rejected x5 (open)",
    ]
    assert [row[0] for row in rows(dom, "policies")] == ["oms-retrieve", "drrs-per-service"]
    assert "OK" in dom and stack.running.gateway.policies.version in dom
    assert "violations in window: 8" in dom

    shot = await browser.screenshot(url, tmp_path / "ops.png")
    if os.environ.get("OPS_SCREENSHOT"):  # keep a copy to look at
        Path(os.environ["OPS_SCREENSHOT"]).write_bytes(shot)
    assert shot.startswith(PNG_SIGNATURE)
    width, height = struct.unpack(">II", shot[16:24])  # the IHDR chunk comes first
    assert (width, height) == (1200, 900)
    assert len(shot) > 20_000  # a rendered page, not a blank canvas


async def test_the_page_shows_a_failed_reload(
    stack_factory: StackFactory, browser: Browser
) -> None:
    stack = await stack_factory(OMS)
    (stack.folder / "policies" / "zz-bad.yaml").write_text(
        "policies:\n  - name: typo\n    application: OMS\n    per: 5 seconds\n"
    )
    assert (await admin(stack, "POST", "/policies/reload"))[0] == 422
    dom = await browser.dom(f"{stack.admin_url}/ops")
    assert "FAILED — the previous set keeps running" in dom
    assert "zz-bad.yaml:4" in dom and "is not a duration" in dom
    assert [row[0] for row in rows(dom, "policies")] == ["oms-retrieve"]


async def test_with_a_token_the_page_reads_it_from_the_fragment(
    stack_factory: StackFactory, browser: Browser
) -> None:
    stack = await stack_factory(OMS)
    running = await restart_with(stack, admin=AdminSettings("127.0.0.1", 0, "pa55"))
    try:
        client = stack.client("bleex4242")
        for _ in range(2):
            async with client.post(
                f"https://localhost:{running.port}/sst/oms/{OMS_RETRIEVE}",
                data="<x/>",
                headers={"Content-Type": "text/xml"},
            ) as answer:
                await answer.read()
        await running.ledger.flush()
        base = f"http://127.0.0.1:{running.admin_port}/ops"

        refused = await browser.dom(base)
        assert "unauthorized: open this page as /ops#token=" in refused
        assert "bleex4242" not in refused

        dom = await browser.dom(f"{base}#token=pa55")
        assert [row[:2] for row in rows(dom, "offenders")] == [["bleex4242", "1"]]
    finally:
        await running.stop()
