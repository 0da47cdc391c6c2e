"""The ops page's actions in real headless Chromium (driven over the DevTools protocol), against
a running gateway with an admin token and real traffic over real TLS: the explain form shows a
key that real calls locked; "clear this lockout" is refused without the token and with a wrong
one (the key stays locked), and with the right one the next real call passes and the ledger has
the support action; a participant's page lists its own episodes from real rejections, nobody
else's, and the live state of its keys. Participant-controlled text is shown as text."""

from __future__ import annotations

import datetime as dt
import ssl
import struct
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import quote, urlencode

import aiohttp
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

from gateway.config.settings import AdminSettings
from gateway.demo.certs import participant_subject
from gateway.ops.server import Running
from tests.support.cdp import Page, chromium_page
from tests.support.ops import admin, restart_with
from tests.support.stack import DRRS, ENVELOPE, SOAP11, Stack, StackFactory
from tests.test_ops_page import PNG_SIGNATURE, chromium

TOKEN = "pa55-w0rd"
DRRS_SERVICE = "RetrieveDRLocations_DRRSv2_AP"
OMS_RETRIEVE = "RetrieveCurrentOutages_OMSv1_AP"
OMS_MINUTE = """\
policies:
  - name: oms-retrieve
    application: OMS
    services: ["Retrieve*"]
    limit: 1
    per: 60s
"""
HOSTILE = '<img src=x onerror="window.pwned=1"><script>window.pwned=2</script>'
HOSTILE_CN = "<img src=x onerror=pwned=1><script>pwned=2</script>"  # a CN holds 64 at most


@pytest.fixture
async def gateway(stack_factory: StackFactory) -> AsyncIterator[tuple[Stack, Running]]:
    """A gateway with an admin token (its own listeners, the stack's files and upstreams)."""
    stack = await stack_factory({"a-oms.yaml": OMS_MINUTE, "b-drrs.yaml": DRRS.format(per="30s")})
    running = await restart_with(stack, admin=AdminSettings("127.0.0.1", 0, TOKEN))
    yield stack, running
    await running.stop()


@pytest.fixture
async def page(tmp_path: Path) -> AsyncIterator[Page]:
    async with chromium_page(chromium(), tmp_path / "chromium-profile") as opened:
        yield opened


async def call(
    stack: Stack, running: Running, user: str, app: str, service: str
) -> tuple[int, str]:
    """One real SOAP call over mutual TLS: (status, the X-Request-Id the gateway gave it)."""
    async with (
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=stack.ssl_for(user))) as client,
        client.post(
            f"https://localhost:{running.port}/sst/{app}/{service}",
            data=ENVELOPE.format(op=service.split("_")[0]),
            headers={"Content-Type": SOAP11},
        ) as answer,
    ):
        await answer.read()
        return answer.status, answer.headers.get("X-Request-Id", "")


async def identity_of(running: Running, cn: str) -> str:
    """The identity the gateway keyed `cn`'s calls on (its subject DN), from the ledger."""
    status, body, _ = await admin(running, "GET", f"/ledger?identity={cn}", TOKEN)
    assert status == 200 and body["entries"], body
    identity: str = body["entries"][0]["identity"]
    return identity


async def explain_state(
    running: Running, identity: str, app: str, service: str
) -> dict[str, object]:
    query = urlencode({"identity": identity, "application": app, "service": service})
    status, body, _ = await admin(running, "GET", f"/explain?{query}", TOKEN)
    assert status == 200, body
    state: dict[str, object] = body["state"]
    return state


def field(rows: list[list[str]], name: str) -> str:
    return next(value for label, value in rows if label == name)


async def test_explain_then_clear_a_lockout_with_the_admin_token(
    gateway: tuple[Stack, Running], page: Page, tmp_path: Path
) -> None:
    stack, running = gateway
    statuses = [
        (await call(stack, running, "bleex4242", "drrs", DRRS_SERVICE))[0] for _ in range(2)
    ]
    assert statuses == [200, 500]  # the second is early: DRRS locks the key for 30 s
    identity = await identity_of(running, "bleex4242")
    base = f"http://127.0.0.1:{running.admin_port}/ops"

    await page.goto(f"{base}#token={TOKEN}")
    await page.wait_for("document.querySelector('#violations a')", what="the violations table")
    await page.type("#explain-form [name=identity]", identity)
    await page.type("#explain-form [name=application]", "DRRS")
    await page.type("#explain-form [name=service]", DRRS_SERVICE)
    await page.click("#explain-form button")
    await page.wait_for("!document.getElementById('explain-result').hidden", what="the answer")
    shown = await page.rows("explain-result")
    assert field(shown, "Identity") == identity
    assert field(shown, "Policy") == "drrs-per-service (b-drrs.yaml:2)"
    assert field(shown, "Rate") == "1 per 30s, early retries reset the timer"
    assert field(shown, "Provisioned") == "yes"
    assert field(shown, "State now").startswith("LOCKED until ")
    assert field(shown, "Answer").startswith("the next call would be rejected")
    assert await page.text("#clear-button") == "Clear this lockout"

    # Without the token, then with a wrong one: refused, and the page says so.
    await page.type("#clear-form [name=reason]", "ticket 4711: client fixed its retry loop")
    await page.click("#clear-button")
    said = await page.wait_for(
        "(t => t.startsWith('refused') && t)(document.getElementById('clear-result').textContent)"
    )
    assert said == "refused: this action needs the admin token (401). Nothing was cleared."
    await page.type("#clear-form [name=token]", "not-the-token")
    await page.click("#clear-button")
    said = await page.wait_for(
        "(t => t.startsWith('refused: wrong') && t)"
        "(document.getElementById('clear-result').textContent)"
    )
    assert said == "refused: wrong admin token (401). Nothing was cleared."
    assert (await explain_state(running, identity, "DRRS", DRRS_SERVICE))["locked_until"]
    assert (await call(stack, running, "bleex4242", "drrs", DRRS_SERVICE))[0] == 500

    # With the right token: cleared, the answer shows the key free, the next real call passes.
    await page.type("#clear-form [name=token]", TOKEN)
    await page.click("#clear-button")
    said = await page.wait_for(
        "(t => t.startsWith('cleared') && t)(document.getElementById('clear-result').textContent)"
    )
    assert said.endswith("written to the ledger as a support action")
    await page.wait_for(
        "document.getElementById('explain-result').textContent.includes('free: 1 call(s) left')",
        what="the answer to show the key free",
    )
    assert await page.evaluate("document.querySelector('#clear-form [name=token]').value") == ""
    shot = await page.screenshot(tmp_path / "ops-explain-clear.png")
    print(f"screenshot: {tmp_path / 'ops-explain-clear.png'}")
    assert shot.startswith(PNG_SIGNATURE)
    assert struct.unpack(">II", shot[16:24]) == (1200, 900)

    assert (await call(stack, running, "bleex4242", "drrs", DRRS_SERVICE))[0] == 200
    status, body, _ = await admin(running, "GET", f"/ledger?identity={quote(identity)}", TOKEN)
    assert status == 200
    cleared = [e for e in body["entries"] if e["decision"] == "cleared"]
    assert [(e["identity"], e["application"], e["service"]) for e in cleared] == [
        (identity, "DRRS", DRRS_SERVICE)
    ]
    assert cleared[0]["first_request_id"].startswith("admin:127.0.0.1")
    assert cleared[0]["note"] == "ticket 4711: client fixed its retry loop"

    # The participant's page shows the support action beside the rejections, with its reason.
    await page.goto(f"{base}/participant?{urlencode({'identity': identity})}#token={TOKEN}")
    await page.wait_for("document.querySelector('#episodes td.cleared')", what="the clear")
    kinds = {row[2]: row for row in await page.rows("episodes")}
    assert set(kinds) == {"rejected", "cleared"}
    assert kinds["cleared"][11] == "ticket 4711: client fixed its retry loop"
    assert kinds["rejected"][3] == "2"  # the early call and the one the wrong token left locked


async def test_a_participants_page_lists_its_episodes_and_live_state(
    gateway: tuple[Stack, Running], page: Page, tmp_path: Path
) -> None:
    stack, running = gateway
    oms = [await call(stack, running, "bleex4242", "oms", OMS_RETRIEVE) for _ in range(3)]
    assert [status for status, _ in oms] == [200, 500, 500]
    drrs = [await call(stack, running, "bleex4242", "drrs", DRRS_SERVICE) for _ in range(2)]
    assert [status for status, _ in drrs] == [200, 500]
    other = [await call(stack, running, "jdoex1234", "oms", OMS_RETRIEVE) for _ in range(2)]
    assert [status for status, _ in other] == [200, 500]
    identity = await identity_of(running, "bleex4242")

    # From the ops page, the participant's name in the violations table leads to its page.
    await page.goto(f"http://127.0.0.1:{running.admin_port}/ops#token={TOKEN}")
    await page.wait_for(
        "[...document.querySelectorAll('#violations a')].some(a => a.textContent === 'bleex4242')",
        what="bleex4242 in the violations table",
    )
    await page.click("#violations tbody tr:has(a[title*='bleex4242']) a")
    await page.wait_for(
        "location.pathname === '/ops/participant' && "
        "document.querySelectorAll('#episodes tbody tr td.num').length > 0",
        what="the participant's episodes",
    )
    assert await page.evaluate("new URLSearchParams(location.search).get('identity')") == identity
    assert await page.text("#who") == identity

    episodes = await page.rows("episodes")
    # First, Last, Kind, Count, Longest retry, Application, Service, Policy, Ids, Fallback, Episode
    assert sorted((row[2], row[3], row[5], row[6], row[7]) for row in episodes) == [
        ("rejected", "1", "DRRS", DRRS_SERVICE, "drrs-per-service"),
        ("rejected", "2", "OMS", OMS_RETRIEVE, "oms-retrieve"),
    ]
    by_app = {row[5]: row for row in episodes}
    assert by_app["OMS"][8] == f"{oms[1][1]}… {oms[2][1]}"  # the faults' own request ids
    assert by_app["DRRS"][8] == drrs[1][1]
    assert all(row[9] == "no" and row[10] == "open" for row in episodes)
    assert by_app["DRRS"][4] == "30.0s"
    assert other[1][1] not in await page.text("#episodes")  # jdoex1234's rejection is not here
    assert "jdoex1234" not in await page.text("main")

    live = {row[0]: row for row in await page.rows("live")}
    assert set(live) == {"OMS", "DRRS"}
    assert live["DRRS"][3].startswith("LOCKED until ")
    assert live["OMS"][3] == "window full"  # 1 per 60 s, no lockout: the window is full
    assert live["DRRS"][6] == "explain / clear lockout"
    shot = await page.screenshot(tmp_path / "ops-participant.png")
    print(f"screenshot: {tmp_path / 'ops-participant.png'}")
    assert shot.startswith(PNG_SIGNATURE)

    # Its "explain / clear lockout" link opens the ops page with that key explained.
    await page.click("#live tbody tr:first-child a")
    await page.wait_for("!document.getElementById('explain-result').hidden", what="the answer")
    shown = await page.rows("explain-result")
    assert (field(shown, "Identity"), field(shown, "Service")) == (identity, DRRS_SERVICE)
    assert field(shown, "State now").startswith("LOCKED until ")


def hostile_client(stack: Stack, folder: Path) -> ssl.SSLContext:
    """A client certificate, signed by the gateway's CA, whose CN is markup."""
    ca = x509.load_pem_x509_certificate(stack.certs.ca.read_bytes())
    ca_key = serialization.load_pem_private_key(stack.certs.ca_key.read_bytes(), None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(participant_subject(HOSTILE_CN))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    (folder / "hostile.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (folder / "hostile-key.pem").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    context = ssl.create_default_context(cafile=str(stack.certs.ca))
    context.load_cert_chain(str(folder / "hostile.pem"), str(folder / "hostile-key.pem"))
    return context


NOTHING_RAN = "window.pwned === undefined && document.querySelectorAll('img').length === 0"


async def test_participant_text_is_shown_as_text(
    gateway: tuple[Stack, Running], page: Page, tmp_path: Path
) -> None:
    """Identities and service names are attacker-controlled: a certificate whose CN is markup
    and a service name with a <script> are displayed as text on both pages, never run."""
    stack, running = gateway
    context = hostile_client(stack, tmp_path)
    statuses = []
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=context)) as client:
        for _ in range(2):
            async with client.post(
                f"https://localhost:{running.port}/sst/oms/{OMS_RETRIEVE}",
                data=ENVELOPE.format(op="RetrieveCurrentOutages"),
                headers={"Content-Type": SOAP11},
            ) as answer:
                await answer.read()
                statuses.append(answer.status)
    assert statuses == [200, 500]
    status, body, _ = await admin(running, "GET", "/ledger", TOKEN)
    assert status == 200
    (entry,) = body["entries"]
    assert entry["cn"] == HOSTILE_CN
    base = f"http://127.0.0.1:{running.admin_port}"

    await page.goto(f"{base}/ops#token={TOKEN}")
    await page.wait_for("document.querySelector('#violations a')", what="the violation")
    assert (await page.rows("violations"))[0][0] == HOSTILE_CN
    assert (await page.rows("offenders"))[0][0] == HOSTILE_CN
    assert (await page.rows("recent"))[0][2] == HOSTILE_CN
    assert await page.evaluate(NOTHING_RAN)

    await page.type("#explain-form [name=identity]", entry["identity"])
    await page.type("#explain-form [name=application]", "DRRS")
    await page.type("#explain-form [name=service]", HOSTILE)  # DRRS's policy matches "*"
    await page.click("#explain-form button")
    await page.wait_for("!document.getElementById('explain-result').hidden", what="the answer")
    shown = await page.rows("explain-result")
    assert (field(shown, "Identity"), field(shown, "Service")) == (entry["identity"], HOSTILE)
    assert await page.evaluate(NOTHING_RAN)

    await page.click("#violations tbody a")
    await page.wait_for(
        "location.pathname === '/ops/participant' && "
        "document.querySelectorAll('#episodes tbody td.num').length > 0",
        what="the participant's episodes",
    )
    assert await page.text("#who") == entry["identity"]
    assert [row[6] for row in await page.rows("episodes")] == [OMS_RETRIEVE]
    assert await page.evaluate(NOTHING_RAN)

    await page.goto(f"{base}/ops/participant?{urlencode({'identity': HOSTILE})}#token={TOKEN}")
    await page.wait_for("document.getElementById('updated').textContent.startsWith('updated')")
    assert await page.text("#who") == HOSTILE
    assert await page.evaluate(NOTHING_RAN)


async def test_participant_data_wants_the_token_and_an_identity(
    gateway: tuple[Stack, Running],
) -> None:
    _, running = gateway
    assert (await admin(running, "GET", "/ops/participant/data?identity=x"))[0] == 401
    status, body, _ = await admin(running, "GET", "/ops/participant/data", TOKEN)
    assert (status, body["error"]) == (400, "missing query parameter: identity")
    status, body, _ = await admin(running, "GET", "/ops/participant/data?identity=nobody", TOKEN)
    assert (status, body["episodes"], body["live"]) == (200, [], [])
    status, page_html, _ = await admin(running, "GET", "/ops/participant")
    assert status == 200 and "Episodes from the ledger" in page_html  # the shell is open
