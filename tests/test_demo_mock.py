"""The demo upstream on real sockets: its SOAP and REST answers, and the echo headers that the
gateway's tests rely on to see exactly what was forwarded."""

from __future__ import annotations

import asyncio
import base64
import gzip
import hashlib
import io
import json
import os
import time
import uuid
from collections.abc import AsyncIterator
from xml.etree.ElementTree import Element

import aiohttp
import defusedxml.ElementTree as SafeET
import pytest

from gateway.demo.mock import MockUpstream, pattern_chunks, run_mock_upstream, start_mock_upstream

SOAP11 = "{http://schemas.xmlsoap.org/soap/envelope/}"
SOAP12 = "{http://www.w3.org/2003/05/soap-envelope}"
SO = "{http://www.caiso.com/soa/2006-06-13/StandardOutput.xsd}"
ATT = "{http://www.caiso.com/soa/2006-10-26/ISOAttachment.xsd}"

ENVELOPE11 = (
    b'<?xml version="1.0"?><soapenv:Envelope xmlns:soapenv='
    b'"http://schemas.xmlsoap.org/soap/envelope/"><soapenv:Body><request/></soapenv:Body>'
    b"</soapenv:Envelope>"
)
ENVELOPE12 = ENVELOPE11.replace(
    b"http://schemas.xmlsoap.org/soap/envelope/", b"http://www.w3.org/2003/05/soap-envelope"
)


@pytest.fixture
async def upstream() -> AsyncIterator[MockUpstream]:
    mock = await start_mock_upstream("127.0.0.1", 0, 0)
    try:
        yield mock
    finally:
        await mock.close()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    # Echo headers can be long; the gateway's upstream client will need the same allowance.
    async with aiohttp.ClientSession(max_field_size=65536) as session:
        yield session


def parse(body: bytes) -> Element:
    root: Element = SafeET.fromstring(body)
    return root


def one(parent: Element, path: str) -> Element:
    found = parent.find(path)
    assert found is not None, f"{path} missing"
    return found


def soap11_headers(service: str) -> dict[str, str]:
    return {"Content-Type": "text/xml; charset=utf-8", "SOAPAction": f'"{service}"'}


# --- SOAP --------------------------------------------------------------------------------------


async def test_retrieve_dr_locations(upstream: MockUpstream, http: aiohttp.ClientSession) -> None:
    url = f"{upstream.soap_url}/sst/drrs/RetrieveDRLocations_DRRSv2_AP"
    async with http.post(
        url, data=ENVELOPE11, headers=soap11_headers("RetrieveDRLocations_DRRSv2_AP")
    ) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"] == "text/xml; charset=utf-8"
        root = parse(await resp.read())
    assert root.tag == f"{SOAP11}Envelope"
    body = one(root, f"{SOAP11}Body")
    locations = list(body.iter())
    ids = [e.text for e in locations if e.tag.endswith("}locationId")]
    assert ids == ["LOC_PGAE_0001", "LOC_SCE_0002"]
    assert [e.text for e in locations if e.tag.endswith("}Source")] == ["CAISO"]


async def raw_request(port: int, head: bytes, body: bytes) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 exchange on a bare socket, so header spelling and order are exactly ours."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(head + body)
        await writer.drain()
        status_line = await reader.readline()
        headers: dict[str, str] = {}
        while (line := await reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode("latin-1").partition(":")
            headers[name.strip().lower()] = value.strip()
        answer = await reader.readexactly(int(headers["content-length"]))
    finally:
        writer.close()
        await writer.wait_closed()
    return int(status_line.split()[1]), headers, answer


async def test_echo_headers_show_exactly_what_arrived(upstream: MockUpstream) -> None:
    path = "/sst/OMS/RetrieveTransmissionOutage_OMSv1_AP?trace=1&a=%20b"
    xfcc = 'Hash=ab;Subject="CN=jdoex1234,OU=people,O=CAISO,C=US"'
    head = (
        f"POST {path} HTTP/1.1\r\nHost: upstream\r\nContent-Type: text/xml\r\n"
        f"X-Forwarded-Client-Cert: {xfcc}\r\nX-MiXeD-Case: one\r\nx-mixed-case: two\r\n"
        f"Content-Length: {len(ENVELOPE11)}\r\nConnection: close\r\n\r\n"
    ).encode()
    status, echo, _ = await raw_request(upstream.soap_port, head, ENVELOPE11)
    assert status == 200
    assert echo["x-echo-method"] == "POST"
    assert echo["x-echo-path"] == path
    assert echo["x-echo-body-length"] == str(len(ENVELOPE11))
    assert echo["x-echo-body-sha256"] == hashlib.sha256(ENVELOPE11).hexdigest()
    assert json.loads(echo["x-echo-headers"]) == {
        "Host": "upstream",
        "Content-Type": "text/xml",
        "X-Forwarded-Client-Cert": xfcc,
        "X-MiXeD-Case": "one, two",
        "Content-Length": str(len(ENVELOPE11)),
        "Connection": "close",
    }


async def test_submit_returns_standard_output_success(
    upstream: MockUpstream, http: aiohttp.ClientSession
) -> None:
    url = f"{upstream.soap_url}/sst/drrs/SubmitDRRegistrations_DRRSv2_AP"
    async with http.post(
        url, data=ENVELOPE11, headers=soap11_headers("SubmitDRRegistrations_DRRSv2_AP")
    ) as resp:
        assert resp.status == 200
        root = parse(await resp.read())
    event = one(root, f"{SOAP11}Body/{SO}outputDataType/{SO}EventLog/{SO}Event")
    assert one(event, f"{SO}result").text == "Success"
    assert hashlib.sha256(ENVELOPE11).hexdigest() in (one(event, f"{SO}description").text or "")
    service = one(root, f".//{SO}Service/{SO}name")
    assert service.text == "SubmitDRRegistrations_DRRSv2_AP"


async def test_unknown_service_is_a_soap_fault(
    upstream: MockUpstream, http: aiohttp.ClientSession
) -> None:
    url = f"{upstream.soap_url}/sst/cmri/DeleteEverything_CMRIv1_AP"
    async with http.post(url, data=ENVELOPE11, headers=soap11_headers("x")) as resp:
        assert resp.status == 500
        root = parse(await resp.read())
    fault = one(root, f"{SOAP11}Body/{SOAP11}Fault")
    assert one(fault, "faultcode").text == "soapenv:Client"
    assert one(fault, "faultstring").text == "Unknown service DeleteEverything_CMRIv1_AP"
    description = one(fault, f"detail/{SO}outputDataType/{SO}EventLog/{SO}Event/{SO}description")
    assert description.text == "Unknown service DeleteEverything_CMRIv1_AP"
    assert one(fault, f".//{SO}Event/{SO}result").text == "Failure"


async def test_unknown_application_is_a_fault(
    upstream: MockUpstream, http: aiohttp.ClientSession
) -> None:
    url = f"{upstream.soap_url}/sst/nope/RetrieveX_NOPEv1_AP"
    async with http.post(url, data=ENVELOPE11, headers=soap11_headers("x")) as resp:
        assert resp.status == 500
        fault = one(parse(await resp.read()), f"{SOAP11}Body/{SOAP11}Fault")
    assert one(fault, "faultstring").text == "Unknown application nope"


async def test_soap12_request_gets_soap12_answers(
    upstream: MockUpstream, http: aiohttp.ClientSession
) -> None:
    headers = {"Content-Type": 'application/soap+xml; charset=utf-8; action="urn:x"'}
    url = f"{upstream.soap_url}/sst/cmri/RetrieveDefaultBidCurves_CMRIv2_AP"
    async with http.post(url, data=ENVELOPE12, headers=headers) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"] == "application/soap+xml; charset=utf-8"
        root = parse(await resp.read())
    assert root.tag == f"{SOAP12}Envelope"
    records = [e for e in one(root, f"{SOAP12}Body").iter() if e.tag.endswith("Record")]
    assert len(records) == 2

    async with http.post(
        f"{upstream.soap_url}/sst/cmri/Bogus", data=ENVELOPE12, headers=headers
    ) as resp:
        assert resp.status == 400
        fault = one(parse(await resp.read()), f"{SOAP12}Body/{SOAP12}Fault")
    assert one(fault, f"{SOAP12}Code/{SOAP12}Value").text == "env:Sender"
    assert one(fault, f"{SOAP12}Reason/{SOAP12}Text").text == "Unknown service Bogus"
    path = f"{SOAP12}Detail/{SO}outputDataType/{SO}EventLog/{SO}Event/{SO}description"
    assert one(fault, path).text == "Unknown service Bogus"


async def test_docattach_retrieve_is_base64_gzip_xml(
    upstream: MockUpstream, http: aiohttp.ClientSession
) -> None:
    url = f"{upstream.soap_url}/sst/sibr/RetrieveCleanBidSet_SIBRv5_DocAttach_AP"
    async with http.post(url, data=ENVELOPE11, headers=soap11_headers("x")) as resp:
        assert resp.status == 200
        root = parse(await resp.read())
    value = one(root, f"{SOAP11}Body/{ATT}ISOAttachment/{ATT}AttachmentValue").text or ""
    document = parse(gzip.decompress(base64.b64decode(value)))
    assert document.tag.endswith("}CleanBidSetData")


async def test_plain_service_path_and_soapaction_routing(
    upstream: MockUpstream, http: aiohttp.ClientSession
) -> None:
    async with http.post(
        f"{upstream.soap_url}/RetrieveDRLocations_DRRSv2_AP",
        data=ENVELOPE11,
        headers=soap11_headers("x"),
    ) as resp:
        assert resp.status == 200
        assert b"LOC_SCE_0002" in await resp.read()
    action = {
        "Content-Type": "text/xml",
        "SOAPAction": '"http://www.caiso.com/soa/SubmitRawBidSet_SIBRv5_AP"',
    }
    async with http.post(f"{upstream.soap_url}/", data=ENVELOPE11, headers=action) as resp:
        assert resp.status == 200
        name = one(parse(await resp.read()), f".//{SO}Service/{SO}name")
    assert name.text == "SubmitRawBidSet_SIBRv5_AP"


async def test_five_megabyte_multipart_body_hashed_exactly(
    upstream: MockUpstream, http: aiohttp.ClientSession
) -> None:
    boundary = "MIMEBoundary_aup_" + uuid.uuid4().hex
    attachment = os.urandom(5 * 2**20)
    parts = (
        f"--{boundary}\r\nContent-Type: text/xml; charset=UTF-8\r\n"
        f"Content-ID: <root.message@caiso>\r\n\r\n".encode()
        + ENVELOPE11
        + f"\r\n--{boundary}\r\nContent-Type: application/octet-stream\r\n"
        f"Content-Transfer-Encoding: binary\r\nContent-ID: <payload>\r\n\r\n".encode()
        + attachment
        + f"\r\n--{boundary}--\r\n".encode()
    )
    expected = hashlib.sha256(parts).hexdigest()
    content_type = (
        f'multipart/related; type="text/xml"; start="<root.message@caiso>"; boundary="{boundary}"'
    )
    url = f"{upstream.soap_url}/sst/sibr/SubmitRawBidSet_SIBRv5_AP"

    async def chunked() -> AsyncIterator[bytes]:
        for start in range(0, len(parts), 100_000):
            yield parts[start : start + 100_000]

    for data in (io.BytesIO(parts), chunked()):
        async with http.post(url, data=data, headers={"Content-Type": content_type}) as resp:
            assert resp.status == 200
            assert resp.headers["X-Echo-Body-Length"] == str(len(parts))
            assert resp.headers["X-Echo-Body-Sha256"] == expected
            body = parse(await resp.read())
        assert expected in (one(body, f".//{SO}Event/{SO}description").text or "")


# --- REST --------------------------------------------------------------------------------------


async def test_rest_get_portfolio_echoes_request_id(
    upstream: MockUpstream, http: aiohttp.ClientSession
) -> None:
    request_id = str(uuid.uuid4())
    async with http.get(
        f"{upstream.rest_url}/auction/v1.0/portfolio", headers={"caiso-request-id": request_id}
    ) as resp:
        assert resp.status == 200
        assert resp.headers["caiso-request-id"] == request_id
        assert resp.headers["X-Echo-Method"] == "GET"
        document = await resp.json()
    assert document["count"] == 2
    assert {p["portfolioName"] for p in document["portfolios"]} == {"NP15-HEDGE-Q3", "SP15-LOAD"}

    url = f"{upstream.rest_url}/auction/v1.0/portfolio?portfolioName=SP15-LOAD"
    async with http.get(url) as resp:
        uuid.UUID(resp.headers["caiso-request-id"])  # generated when none was sent
        assert resp.headers["X-Echo-Path"] == "/auction/v1.0/portfolio?portfolioName=SP15-LOAD"
        assert (await resp.json())["count"] == 1


async def test_rest_post_portfolio(upstream: MockUpstream, http: aiohttp.ClientSession) -> None:
    payload = json.dumps({"portfolioName": "NP15-HEDGE-Q4", "crrs": []}).encode()
    url = f"{upstream.rest_url}/auction/v1.0/portfolio"
    async with http.post(url, data=payload, headers={"Content-Type": "application/json"}) as resp:
        assert resp.status == 200
        answer = await resp.json()
    assert answer["status"] == "SUBMITTED"
    assert answer["portfolioName"] == "NP15-HEDGE-Q4"
    assert answer["sha256"] == hashlib.sha256(payload).hexdigest()


@pytest.mark.parametrize(
    ("method", "path", "data", "status", "code"),
    [
        ("POST", "/auction/v1.0/portfolio", b"{not json", 400, "GEN0001"),
        ("POST", "/auction/v1.0/portfolio", b"{}", 400, "GEN0002"),
        ("POST", "/auction/v1.0/portfolio", b"x" * (2 * 2**20), 413, "GEN0413"),
        ("GET", "/auction/v1.0/nothing", None, 404, "GEN0004"),
        ("DELETE", "/auction/v1.0/portfolio", None, 405, "GEN0005"),
    ],
    ids=["bad-json", "no-name", "too-large", "no-route", "bad-method"],
)
async def test_rest_errors_are_error_lists(
    upstream: MockUpstream,
    http: aiohttp.ClientSession,
    method: str,
    path: str,
    data: bytes | None,
    status: int,
    code: str,
) -> None:
    body = None if data is None else io.BytesIO(data)
    async with http.request(
        method, f"{upstream.rest_url}{path}", data=body, headers={"caiso-request-id": "abc"}
    ) as resp:
        assert resp.status == status
        assert resp.headers["caiso-request-id"] == "abc"
        assert resp.headers["X-Echo-Method"] == method
        document = await resp.json()
    [error] = document["errorList"]
    assert error["errorCode"] == code
    assert error["severity"] == "ERROR"
    assert error["errorDescription"]


# --- test hooks --------------------------------------------------------------------------------


async def test_slow_and_delay_header(upstream: MockUpstream, http: aiohttp.ClientSession) -> None:
    started = time.monotonic()
    async with http.get(f"{upstream.rest_url}/_mock/slow?seconds=0.2") as resp:
        assert resp.status == 200
        assert (await resp.json()) == {"slept": 0.2}
    assert time.monotonic() - started >= 0.2

    url = f"{upstream.soap_url}/sst/oms/RetrieveTransmissionOutage_OMSv1_AP"
    with pytest.raises(asyncio.TimeoutError):
        async with http.post(
            url,
            data=ENVELOPE11,
            headers={"X-Mock-Delay": "5"},
            timeout=aiohttp.ClientTimeout(total=0.2),
        ):
            pass


async def test_forced_status(upstream: MockUpstream, http: aiohttp.ClientSession) -> None:
    url = f"{upstream.soap_url}/sst/oms/RetrieveTransmissionOutage_OMSv1_AP"
    async with http.post(url, data=ENVELOPE11, headers={"X-Mock-Status": "503"}) as resp:
        assert resp.status == 503
        assert resp.headers["X-Echo-Method"] == "POST"
    async with http.get(f"{upstream.soap_url}/_mock/status?code=502") as resp:
        assert resp.status == 502


async def test_big_streams_exact_bytes(upstream: MockUpstream, http: aiohttp.ClientSession) -> None:
    size = 3 * 2**20 + 17
    expected = hashlib.sha256()
    for piece in pattern_chunks(size):
        expected.update(piece)
    async with http.get(f"{upstream.rest_url}/_mock/big?bytes={size}&sha256=1") as resp:
        assert resp.status == 200
        assert resp.headers["Content-Length"] == str(size)
        assert resp.headers["X-Mock-Body-Sha256"] == expected.hexdigest()
        digest = hashlib.sha256()
        received = 0
        async for chunk in resp.content.iter_chunked(65536):
            digest.update(chunk)
            received += len(chunk)
    assert received == size
    assert digest.hexdigest() == expected.hexdigest()


async def test_echo_endpoint_and_reset(upstream: MockUpstream, http: aiohttp.ClientSession) -> None:
    async with http.put(
        f"{upstream.soap_url}/_mock/echo?q=1", data=b"abc", headers={"X-Test": "yes"}
    ) as resp:
        echo = await resp.json()
    assert echo["method"] == "PUT"
    assert echo["path"] == "/_mock/echo?q=1"
    assert echo["body_length"] == 3
    assert echo["body_sha256"] == hashlib.sha256(b"abc").hexdigest()
    assert echo["headers"]["X-Test"] == "yes"

    with pytest.raises(aiohttp.ClientError):
        async with http.get(f"{upstream.soap_url}/_mock/reset") as resp:
            await resp.read()


async def test_run_mock_upstream_serves_until_cancelled(http: aiohttp.ClientSession) -> None:
    started: asyncio.Future[MockUpstream] = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(run_mock_upstream("127.0.0.1", 0, 0, started.set_result))
    mock = await asyncio.wait_for(started, 5)
    async with http.get(f"{mock.rest_url}/auction/v1.0/portfolio") as resp:
        assert resp.status == 200
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    with pytest.raises(aiohttp.ClientConnectionError):
        async with http.get(f"{mock.soap_url}/_mock/echo"):
            pass
