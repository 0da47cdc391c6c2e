"""The admin listener over real HTTP, in front of a real gateway serving real TLS calls:
each endpoint, its authentication, the metrics text (parsed with prometheus-client's own
parser), readiness through a store outage and a drain, and the structured access log."""

from __future__ import annotations

import asyncio
import json
import logging

import aiohttp
import pytest

from gateway.config.settings import AdminSettings
from gateway.edge.connection import GuardedServer
from gateway.limiter.memory import MemoryLimiter
from tests.support.clock import FakeClock
from tests.support.ops import admin, restart_with, samples, value, wait_for
from tests.support.ports import free_port
from tests.support.stack import DRRS, ENVELOPE, OMS, SOAP11, Stack, StackFactory

OMS_RETRIEVE = "RetrieveCurrentOutages_OMSv1_AP"
JDOE = "CN=jdoex1234,OU=people,O=CAISO,C=US"
DRRS_SERVICE = "RetrieveDRLocations_DRRSv2_AP"
TOKEN = "s3cret-admin-token"


async def test_healthz_and_readyz_when_ready(stack_factory: StackFactory) -> None:
    stack = await stack_factory(OMS)
    status, body, _ = await admin(stack, "GET", "/healthz")
    assert status == 200 and body["status"] == "ok" and body["worker"] == 0

    status, body, _ = await admin(stack, "GET", "/readyz")
    assert status == 200
    assert body["status"] == "ready"
    assert body["policies"]["version"] == stack.running.gateway.policies.version
    assert body["policies"]["count"] == 1
    assert body["policies"]["last_reload"]["ok"] is True
    assert body["store"]["state"] == "ok" and body["store"]["store"] == "memory"
    assert body["ledger"]["sink"] == "file"


async def test_admin_listens_on_loopback_by_default(stack_factory: StackFactory) -> None:
    assert AdminSettings().host == "127.0.0.1"
    stack = await stack_factory(OMS)
    runner = stack.running._runners[-1]
    assert all(address[0] == "127.0.0.1" for address in runner.addresses)


async def test_bearer_token_guards_everything_but_liveness_and_the_page_shell(
    stack_factory: StackFactory,
) -> None:
    stack = await stack_factory(OMS)
    running = await restart_with(stack, admin=AdminSettings("127.0.0.1", 0, TOKEN))
    try:
        guarded = [
            ("GET", "/metrics"),
            ("GET", "/policies"),
            ("POST", "/policies/reload"),
            ("GET", f"/explain?identity={JDOE}&application=OMS&service=x"),
            ("DELETE", f"/keys?identity={JDOE}&application=OMS&service=x"),
            ("POST", f"/keys/clear?identity={JDOE}&application=OMS&service=x"),
            ("GET", "/ledger"),
            ("GET", "/ops/data"),
        ]
        for method, path in guarded:
            status, body, headers = await admin(running, method, path)
            assert status == 401, path
            assert headers["WWW-Authenticate"].startswith("Bearer")
            status, _, _ = await admin(running, method, path, token="wrong")
            assert status == 401, path
            status, _, _ = await admin(running, method, path, token=TOKEN)
            assert status in (200, 422), path

        assert (await admin(running, "GET", "/healthz"))[0] == 200
        status, body, _ = await admin(running, "GET", "/readyz")
        assert status == 200 and body == {"status": "ready"}  # no details without the token
        status, body, _ = await admin(running, "GET", "/readyz", token=TOKEN)
        assert status == 200 and "store" in body and "policies" in body
        status, page, _ = await admin(running, "GET", "/ops")
        assert status == 200 and "<title>AUP Gateway" in page
    finally:
        await running.stop()


async def test_metrics_count_calls_violations_store_and_upstream(
    stack_factory: StackFactory,
) -> None:
    stack = await stack_factory(OMS)  # the real limiter stack: memory store behind the fallback
    client = stack.client()
    assert (await stack.soap(client, "oms", OMS_RETRIEVE)).status == 200
    for _ in range(2):
        assert (await stack.soap(client, "oms", OMS_RETRIEVE)).status == 500
    for _ in range(3):  # no policy matches submits: forwarded unlimited
        assert (await stack.soap(client, "oms", "SubmitOutage_OMSv1_AP")).status == 200
    assert (await stack.soap(client, "nope", "X")).status == 500  # SOAP 1.1: every fault is 500

    status, text, headers = await admin(stack, "GET", "/metrics")
    assert status == 200 and headers["Content-Type"].startswith("text/plain")
    m = samples(text)
    requests = "aup_requests_total"
    assert value(m, requests, application="OMS", service=OMS_RETRIEVE, decision="allowed") == 1
    assert value(m, requests, application="OMS", service=OMS_RETRIEVE, decision="rejected") == 2
    assert (
        value(m, requests, application="OMS", service="SubmitOutage_OMSv1_AP", decision="forwarded")
        == 3
    )
    assert value(m, requests, application="", service="", decision="refused") == 1
    assert (
        value(
            m, "aup_violations_total", policy="oms-retrieve", application="OMS", decision="rejected"
        )
        == 2
    )
    assert value(m, "aup_store_latency_seconds_count") == 3
    assert value(m, "aup_upstream_responses_total", application="OMS", status="200") == 4
    assert value(m, "aup_upstream_latency_seconds_count", application="OMS") == 4
    assert value(m, "aup_request_duration_seconds_count", decision="rejected") == 2
    assert value(m, "aup_policy_reloads_total", result="ok") == 0
    assert value(m, "aup_policy_reloads_total", result="failed") == 0
    assert value(m, "aup_policy_set_info", version=stack.running.gateway.policies.version) == 1
    assert value(m, "aup_policies_loaded") == 1
    assert value(m, "aup_store_fallback", store="memory", mode="local") == 0
    assert value(m, "aup_store_errors_total", store="memory") == 0
    assert value(m, "aup_draining") == 0


async def test_each_gateway_has_its_own_registry(stack_factory: StackFactory) -> None:
    one, two = await stack_factory(OMS), await stack_factory(OMS)
    assert (await one.soap(one.client(), "oms", OMS_RETRIEVE)).status == 200
    first = samples((await admin(one, "GET", "/metrics"))[1])
    second = samples((await admin(two, "GET", "/metrics"))[1])
    labels = {"application": "OMS", "service": OMS_RETRIEVE, "decision": "allowed"}
    assert value(first, "aup_requests_total", **labels) == 1
    assert value(second, "aup_requests_total", **labels) == 0


async def test_readyz_stays_ready_in_store_fallback_and_says_so(
    stack_factory: StackFactory,
) -> None:
    stack = await stack_factory(OMS, store=f"redis://127.0.0.1:{free_port()}/0")
    client = stack.client()
    assert (await stack.soap(client, "oms", OMS_RETRIEVE)).status == 200  # decided locally
    assert (await stack.soap(client, "oms", OMS_RETRIEVE)).status == 500

    status, body, _ = await admin(stack, "GET", "/readyz")
    assert status == 200
    assert body["status"] == "ready (store fallback)"
    assert body["store"]["state"] == "fallback" and body["store"]["mode"] == "local"
    m = samples((await admin(stack, "GET", "/metrics"))[1])
    assert value(m, "aup_store_fallback", store="redis", mode="local") == 1
    assert value(m, "aup_store_errors_total", store="redis") >= 1
    assert value(m, "aup_store_fallback_decisions_total", store="redis") >= 2


async def test_readyz_is_503_while_draining(stack_factory: StackFactory) -> None:
    stack = await stack_factory(OMS)
    client = stack.client()
    slow = asyncio.create_task(
        stack.soap(client, "oms", "SubmitOutage_OMSv1_AP", headers={"X-Mock-Delay": "0.6"})
    )
    await wait_for(lambda: _in_flight(stack), what="the slow call to be in flight")
    stopping = asyncio.create_task(stack.running.stop())
    await wait_for(lambda: stack.running.ops.draining, what="draining")
    status, body, _ = await admin(stack, "GET", "/readyz")
    assert status == 503 and body["status"] == "draining"
    assert (await slow).status == 200  # the call in flight still completes
    await stopping


def _in_flight(stack: Stack) -> bool:
    server = stack.running._runners[0].server
    assert isinstance(server, GuardedServer)
    return any(conn.busy for conn in server.connections)


async def test_policies_lists_the_set_and_reload_reports_an_invalid_file(
    stack_factory: StackFactory,
) -> None:
    stack = await stack_factory({"a-oms.yaml": OMS, "b-drrs.yaml": DRRS.format(per="30s")})
    status, body, _ = await admin(stack, "GET", "/policies")
    assert status == 200
    version = body["version"]
    assert version == stack.running.gateway.policies.version
    assert [p["name"] for p in body["policies"]] == ["oms-retrieve", "drrs-per-service"]
    assert [f.rsplit("/", 1)[1] for f in body["files"]] == ["a-oms.yaml", "b-drrs.yaml"]
    drrs = body["policies"][1]
    assert drrs["limit"] == 1 and drrs["per"] == 30 and drrs["reset_on_early_retry"] is True
    assert drrs["source"].endswith("b-drrs.yaml:2")
    assert body["last_reload"]["ok"] is True

    (stack.folder / "policies" / "c-bad.yaml").write_text(
        "policies:\n  - name: broken\n    application: OMS\n    limit: 0\n"
    )
    status, result, _ = await admin(stack, "POST", "/policies/reload")
    assert status == 422
    assert result["ok"] is False and result["version"] == version
    assert any("c-bad.yaml:4" in problem and "limit" in problem for problem in result["problems"])

    body = (await admin(stack, "GET", "/policies"))[1]
    assert body["version"] == version and body["last_reload"]["ok"] is False
    ready = await admin(stack, "GET", "/readyz")
    assert ready[0] == 200  # the running set still serves
    assert ready[1]["policies"]["last_reload"]["problems"] == result["problems"]
    m = samples((await admin(stack, "GET", "/metrics"))[1])
    assert value(m, "aup_policy_reloads_total", result="failed") == 1
    assert value(m, "aup_policy_last_reload_ok") == 0

    (stack.folder / "policies" / "c-bad.yaml").unlink()
    status, result, _ = await admin(stack, "POST", "/policies/reload")
    assert status == 200 and result["ok"] is True and result["version"] == version


async def test_explain_shows_the_policy_and_the_keys_state(stack_factory: StackFactory) -> None:
    clock = FakeClock()
    stack = await stack_factory(
        {"a.yaml": OMS, "b.yaml": DRRS.format(per="30s")}, limiter=MemoryLimiter(clock)
    )
    client = stack.client()
    assert (await stack.soap(client, "oms", OMS_RETRIEVE)).status == 200
    clock.advance(1.5)

    query = f"/explain?identity={JDOE}&application=oms&service={OMS_RETRIEVE}"
    status, body, _ = await admin(stack, "GET", query)
    assert status == 200
    assert body["policy"]["name"] == "oms-retrieve"
    assert body["policy"]["effective_mode"] == "enforce" and body["policy"]["override"] is None
    assert body["key"] == f"aup:{{{JDOE}|OMS|{OMS_RETRIEVE}}}"
    assert body["rate"] == {"limit": 1, "per": 5.0, "reset_on_early_retry": False}
    state = body["state"]
    assert state["calls_in_window"] == 1 and state["remaining"] == 0
    assert state["allowed_now"] is False and state["locked_until"] is None
    assert state["retry_after"] == pytest.approx(3.5)

    # DRRS: an early retry sets a lockout, which explain shows with its end
    assert (await stack.soap(client, "drrs", DRRS_SERVICE)).status == 200
    clock.advance(10)
    assert (await stack.soap(client, "drrs", DRRS_SERVICE)).status == 500
    body = (
        await admin(
            stack, "GET", f"/explain?identity={JDOE}&application=DRRS&service={DRRS_SERVICE}"
        )
    )[1]
    assert body["state"]["locked_until"] == pytest.approx(clock.now + 30)
    assert body["state"]["locked_until_iso"].startswith("20")
    assert body["state"]["retry_after"] == pytest.approx(30)
    assert "reset" in body["applies"]

    body = (
        await admin(
            stack, "GET", f"/explain?identity={JDOE}&application=OMS&service=SubmitOutage_OMSv1_AP"
        )
    )[1]
    assert body["policy"] is None and "unlimited" in body["applies"]

    for bad in (
        "/explain?application=OMS&service=x",
        f"/explain?identity={JDOE}&application=NOPE&service=x",
        "/explain?identity=jdoex1234&application=OMS&service=x",
    ):
        status, body, _ = await admin(stack, "GET", bad)
        assert status == 400 and body["error"], bad


async def test_clearing_a_key_unlocks_it_and_is_logged_and_ledgered(
    stack_factory: StackFactory, caplog: pytest.LogCaptureFixture
) -> None:
    clock = FakeClock()
    stack = await stack_factory(DRRS.format(per="30s"), limiter=MemoryLimiter(clock))
    client = stack.client()
    assert (await stack.soap(client, "drrs", DRRS_SERVICE)).status == 200
    assert (await stack.soap(client, "drrs", DRRS_SERVICE)).status == 500

    caplog.set_level(logging.INFO, logger="gateway.support")
    path = (
        "/keys?identity=cn = jdoex1234, ou=people,O=CAISO,C=US&application=drrs"
        f"&service={DRRS_SERVICE}&reason=ticket-42"
    )  # written loosely: normalised
    status, body, _ = await admin(stack, "DELETE", path)
    assert status == 200 and body["cleared"] is True
    assert body["key"] == f"aup:{{CN=jdoex1234,OU=people,O=CAISO,C=US|DRRS|{DRRS_SERVICE}}}"
    record = next(r for r in caplog.records if r.name == "gateway.support")
    assert "support action" in record.getMessage() and "ticket-42" in record.getMessage()

    assert (await stack.soap(client, "drrs", DRRS_SERVICE)).status == 200  # unlocked
    status, body, _ = await admin(stack, "POST", path.replace("/keys?", "/keys/clear?"))
    assert status == 200 and body["cleared"] is True  # the call just made a new entry
    status, body, _ = await admin(stack, "DELETE", path)
    assert body["cleared"] is False

    entries = (await admin(stack, "GET", "/ledger?identity=jdoex1234"))[1]["entries"]
    assert [e["decision"] for e in entries] == ["rejected", "cleared", "cleared", "cleared"]
    m = samples((await admin(stack, "GET", "/metrics"))[1])
    assert value(m, "aup_support_actions_total", action="clear_key") == 3


async def test_access_log_is_one_json_line_per_call_and_can_be_turned_off(
    stack_factory: StackFactory, caplog: pytest.LogCaptureFixture
) -> None:
    stack = await stack_factory(OMS)  # the stack's YAML says access_log: false
    caplog.set_level(logging.INFO, logger="gateway.access")
    client = stack.client()
    assert (await stack.soap(client, "oms", OMS_RETRIEVE)).status == 200
    assert not [r for r in caplog.records if r.name == "gateway.access"]

    running = await restart_with(stack, access_log=True)
    try:
        for _ in range(2):
            async with client.post(
                f"https://localhost:{running.port}/sst/oms/{OMS_RETRIEVE}",
                data=ENVELOPE.format(op="RetrieveCurrentOutages"),
                headers={"Content-Type": SOAP11},
            ) as answer:
                await answer.read()
    finally:
        await running.stop()
    lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == "gateway.access"]
    assert [line["decision"] for line in lines] == ["allowed", "rejected"]
    first, second = lines
    assert first["cn"] == "jdoex1234" and first["identity"] == JDOE
    assert first["key"] == f"aup:{{{JDOE}|OMS|{OMS_RETRIEVE}}}"
    assert first["application"] == "OMS" and first["service"] == OMS_RETRIEVE
    assert first["policy"] == "oms-retrieve" and first["upstream_status"] == 200
    assert second["status"] == 500 and second["upstream_status"] is None
    assert second["retry_after"] > 0 and first["latency_ms"] > 0


async def test_policies_and_explain_show_the_access_list(stack_factory: StackFactory) -> None:
    access = """\
    access:
      - name: drrs-users
        applications: [DRRS]
        subjects: ["CN=asmithx5678,OU=people,O=CAISO,C=US"]
    """
    stack = await stack_factory(
        {
            "a.yaml": OMS + "access:\n  - {name: oms-all, applications: "
            "[OMS], organisations: [CAISO]}\n",
            "b.yaml": access,
        }
    )
    body = (await admin(stack, "GET", "/policies"))[1]
    assert [(rule["name"], rule["applications"]) for rule in body["access"]] == [
        ("oms-all", ["OMS"]),
        ("drrs-users", ["DRRS"]),
    ]
    assert body["access"][1]["subjects"] == ["cn=asmithx5678,ou=people,o=caiso,c=us"]

    async def provisioned(identity: str, application: str) -> object:
        query = f"/explain?identity={identity}&application={application}&service=x"
        return (await admin(stack, "GET", query))[1]["provisioned"]

    assert await provisioned(JDOE, "OMS") is True  # by organisation
    assert await provisioned(JDOE, "DRRS") is False
    assert await provisioned("CN=asmithx5678,OU=people,O=CAISO,C=US", "DRRS") is True


async def test_refused_handshakes_are_counted_by_reason(stack_factory: StackFactory) -> None:
    stack = await stack_factory(OMS)
    with pytest.raises(aiohttp.ClientError):
        await stack.soap(stack.client("expired"), "oms", OMS_RETRIEVE)
    # no certificate: answered in HTTP, and counted with the reason OpenSSL would give
    assert (await stack.soap(stack.client(None), "oms", OMS_RETRIEVE)).status == 500  # SOAP 1.1

    async def counted() -> bool:
        m = samples((await admin(stack, "GET", "/metrics"))[1])
        name = "aup_tls_handshakes_refused_total"
        return (
            value(m, name, reason="CERTIFICATE_VERIFY_FAILED") == 1
            and value(m, name, reason="PEER_DID_NOT_RETURN_A_CERTIFICATE") == 1
        )

    await wait_for(counted, what="the refused handshake in the metrics")
