"""Every fault a running gateway makes, as the market's clients read it.

Real gateways (tests/support/stack.py), real TLS and HTTP; each fault's `detail/outputDataType`
is validated with lxml against the operator's StandardOutput schema (gateway/proxy), read typed
by zeep (SOAP 1.1 and 1.2) and by suds through a WSDL whose fault message imports that schema
(tests/fixtures/wsdl), and the rate-limit headers are parsed as Structured Fields by `http_sf`.
"""

from __future__ import annotations

import asyncio
import ssl
import urllib.request
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import http_sf
import pytest
import requests
import suds
import suds.client
import suds.transport.http
import zeep
import zeep.exceptions
import zeep.transports
from lxml import etree
from multidict import CIMultiDict

from gateway.errors import ErrorCode
from tests.support.ports import free_port
from tests.support.stack import DRRS, OMS, SOAP11, SOAP12, Stack, StackFactory

ROOT = Path(__file__).parent.parent
XSD = ROOT / "gateway" / "proxy" / "StandardOutput.xsd"
WSDL = Path(__file__).parent / "fixtures" / "wsdl"
SO_NS = "http://www.caiso.com/soa/2006-06-13/StandardOutput.xsd"
SO = "{" + SO_NS + "}"
TNS = "{http://www.caiso.com/soa/RetrieveDRLocations_DRRSv2_AP}"
OMS_RETRIEVE = "RetrieveCurrentOutages_OMSv1_AP"
OMS_SUBMIT = "SubmitOutage_OMSv1_AP"
DRRS_RETRIEVE = "RetrieveDRLocations_DRRSv2_AP"
DRRS_MESSAGE = (
    "CAISO DRRS Acceptable Use Policy Violation. Please retry your request again in 30 seconds "
    "from now. Note: Time resets each time you request before expiration."
)
ACCESS = """\
access:
  - name: jdoe-oms
    subjects: ["CN=jdoex1234,OU=people,O=CAISO,C=US"]
    applications: [OMS]
"""
_PARSER = etree.XMLParser(resolve_entities=False, no_network=True)
SCHEMA = etree.XMLSchema(etree.parse(str(XSD), _PARSER))


@dataclass(frozen=True)
class Answer:
    status: int
    headers: CIMultiDict[str]
    body: bytes


async def answer_of(response: aiohttp.ClientResponse) -> Answer:
    return Answer(response.status, CIMultiDict(response.headers), await response.read())


def standard_output(body: bytes) -> etree._Element:
    """The fault's one `outputDataType`, valid against the schema (else the reason is raised)."""
    root = etree.fromstring(body, _PARSER)
    outputs = root.findall(f".//{SO}outputDataType")
    assert len(outputs) == 1, body
    SCHEMA.assertValid(outputs[0])
    return outputs[0]


def text(parent: etree._Element, path: str) -> str | None:
    found = parent.find(path.replace("so:", SO))
    return None if found is None else found.text


# --- every fault kind, from a running gateway --------------------------------------------------


async def violation(stack_factory: StackFactory, content_type: str) -> Answer:
    stack = await stack_factory(OMS)
    client = stack.client()
    assert (await stack.soap(client, "oms", OMS_RETRIEVE, content_type)).status == 200
    return await answer_of(await stack.soap(client, "oms", OMS_RETRIEVE, content_type))


async def unknown_application(stack_factory: StackFactory, content_type: str) -> Answer:
    stack = await stack_factory(OMS)
    return await answer_of(await stack.soap(stack.client(), "nope", OMS_RETRIEVE, content_type))


async def unknown_service(stack_factory: StackFactory, content_type: str) -> Answer:
    stack = await stack_factory(OMS)
    return await answer_of(await stack.soap(stack.client(), "oms", "a/b", content_type))


async def not_provisioned(stack_factory: StackFactory, content_type: str) -> Answer:
    stack = await stack_factory({"access.yaml": ACCESS, "oms.yaml": OMS})
    return await answer_of(await stack.soap(stack.client(), "drrs", DRRS_RETRIEVE, content_type))


async def body_too_large(stack_factory: StackFactory, content_type: str) -> Answer:
    stack = await stack_factory(OMS, oms_extra=", max_body: 1KiB")
    body = "<x>" + "a" * 4096 + "</x>"
    return await answer_of(
        await stack.soap(stack.client(), "oms", OMS_SUBMIT, content_type, data=body)
    )


async def upstream_down(stack_factory: StackFactory, content_type: str) -> Answer:
    stack = await stack_factory(OMS, oms_port=free_port())
    return await answer_of(await stack.soap(stack.client(), "oms", OMS_SUBMIT, content_type))


async def upstream_slow(stack_factory: StackFactory, content_type: str) -> Answer:
    stack = await stack_factory(OMS, oms_extra=", timeout: 300ms")
    late = await stack.soap(
        stack.client(), "oms", OMS_SUBMIT, content_type, headers={"X-Mock-Delay": "3"}
    )
    return await answer_of(late)


async def malformed_xml(stack_factory: StackFactory, content_type: str) -> Answer:
    stack = await stack_factory(OMS)
    # No service in the path or SOAPAction: the gateway reads it from the body, which is broken.
    response = await stack.client().post(
        f"{stack.url}/sst/oms",
        data="<soapenv:Envelope><soapenv:Body><Retrieve",
        headers={"Content-Type": content_type},
    )
    return await answer_of(response)


async def too_many_connections(stack_factory: StackFactory, content_type: str) -> Answer:
    stack = await stack_factory(OMS, extra="limits: {max_connections_per_identity: 1}\n")
    _, held = await asyncio.open_connection(
        "127.0.0.1", stack.running.port, ssl=stack.ssl_for(), server_hostname="localhost"
    )
    try:
        return await answer_of(await stack.soap(stack.client(), "oms", OMS_SUBMIT, content_type))
    finally:
        held.close()


Make = Callable[[StackFactory, str], Awaitable[Answer]]
# (what, how, content type, expected status, result code, retry seconds)
KINDS: list[tuple[str, Make, str, int, ErrorCode, int | None]] = [
    ("violation-1.1", violation, SOAP11, 500, ErrorCode.VIOLATION, 5),
    ("violation-1.2", violation, SOAP12, 400, ErrorCode.VIOLATION, 5),
    ("unknown-application", unknown_application, SOAP11, 500, ErrorCode.UNKNOWN_APPLICATION, None),
    (
        "unknown-application-1.2",
        unknown_application,
        SOAP12,
        400,
        ErrorCode.UNKNOWN_APPLICATION,
        None,
    ),
    ("unknown-service", unknown_service, SOAP11, 500, ErrorCode.UNKNOWN_SERVICE, None),
    ("not-provisioned", not_provisioned, SOAP11, 500, ErrorCode.NOT_PROVISIONED, None),
    ("not-provisioned-1.2", not_provisioned, SOAP12, 400, ErrorCode.NOT_PROVISIONED, None),
    ("body-too-large", body_too_large, SOAP11, 500, ErrorCode.BODY_TOO_LARGE, None),
    ("upstream-down", upstream_down, SOAP11, 500, ErrorCode.UPSTREAM_UNAVAILABLE, None),
    ("upstream-down-1.2", upstream_down, SOAP12, 500, ErrorCode.UPSTREAM_UNAVAILABLE, None),
    ("upstream-slow", upstream_slow, SOAP11, 500, ErrorCode.UPSTREAM_TIMEOUT, None),
    ("malformed-xml", malformed_xml, SOAP11, 500, ErrorCode.BAD_XML, None),
    ("too-many-connections", too_many_connections, SOAP11, 500, ErrorCode.TOO_MANY_CONNECTIONS, 1),
]


@pytest.mark.parametrize(
    ("make", "content_type", "status", "code", "retry"),
    [kind[1:] for kind in KINDS],
    ids=[kind[0] for kind in KINDS],
)
async def test_every_fault_validates_against_the_standard_output_schema(
    stack_factory: StackFactory,
    make: Make,
    content_type: str,
    status: int,
    code: ErrorCode,
    retry: int | None,
) -> None:
    answer = await make(stack_factory, content_type)
    assert answer.status == status, answer.body
    media = content_type.partition(";")[0]
    assert answer.headers["Content-Type"].startswith(media)
    output = standard_output(answer.body)  # only the schema's elements, in its order

    assert text(output, "so:EventLog/so:Event/so:result") == code
    assert text(output, "so:EventLog/so:Event/so:severity") == "ERROR"
    description = text(output, "so:EventLog/so:Event/so:description")
    assert description  # the message, where the operator's clients read it
    # One request id everywhere a support ticket might quote it from.
    assert text(output, "so:EventLog/so:id") == answer.headers["X-Request-Id"]
    assert text(output, "so:EventLog/so:id") == text(output, "so:EventLog/so:Event/so:id")
    # The retry time: in the header, the detail and the text, the same whole seconds.
    if retry is None:
        assert "Retry-After" not in answer.headers
        assert text(output, "so:EventLog/so:collectionQuantity") is None
    else:
        assert answer.headers["Retry-After"] == str(retry)
        assert text(output, "so:EventLog/so:collectionType") == "retryAfterSeconds"
        assert text(output, "so:EventLog/so:collectionQuantity") == str(retry)
        assert str(retry) in description
    if code == ErrorCode.VIOLATION:
        assert text(output, "so:EventLog/so:Event/so:name") == "oms-retrieve"
        assert text(output, "so:EventLog/so:Service/so:id") == "OMS"
        assert text(output, "so:EventLog/so:Service/so:name") == OMS_RETRIEVE
    else:
        assert text(output, "so:EventLog/so:Event/so:name") is None
    server = answer.headers["Server"]
    assert server == "AUP-Gateway"


async def test_http_statuses_per_application(stack_factory: StackFactory) -> None:
    stack = await stack_factory(OMS, oms_extra=", fault_statuses: http, max_body: 1KiB")
    client = stack.client()
    assert (await stack.soap(client, "oms", OMS_RETRIEVE)).status == 200
    rejected = await stack.soap(client, "oms", OMS_RETRIEVE)
    assert rejected.status == 429
    assert (await stack.soap(client, "oms", "a/b")).status == 404
    big = await stack.soap(client, "oms", OMS_SUBMIT, data="<x>" + "a" * 4096 + "</x>")
    assert big.status == 413
    standard_output(await big.read())
    # DRRS keeps the binding's statuses, and an unknown application has no settings: binding.
    assert (await stack.soap(stack.client(), "drrs", "a/b")).status == 500
    assert (await stack.soap(stack.client(), "nope", OMS_RETRIEVE)).status == 500


# --- typed clients -----------------------------------------------------------------------------


def requests_session(stack: Stack) -> requests.Session:
    session = requests.Session()
    session.trust_env = False  # the machine's REQUESTS_CA_BUNDLE would override `verify`
    cert, key = stack.certs.clients["jdoex1234"]
    session.cert = (str(cert), str(key))
    session.verify = str(stack.certs.ca)
    return session


def zeep_call(stack: Stack, soap: str, app: str = "drrs") -> tuple[zeep.exceptions.Fault, Any]:
    """A DRRS call through zeep; the Fault it raises (anything else fails the test)."""
    transport = zeep.transports.Transport(session=requests_session(stack))
    client = zeep.Client(str(WSDL / f"RetrieveDRLocations_{soap}.wsdl"), transport=transport)
    binding = "Soap11Binding" if soap == "soap11" else "Soap12Binding"
    service = client.create_service(f"{TNS}{binding}", f"{stack.url}/sst/{app}/{DRRS_RETRIEVE}")
    with pytest.raises(zeep.exceptions.Fault) as caught:
        service.RetrieveDRLocations(resourceId="R1")
    fault = caught.value
    # Typed, strictly: zeep resolves the detail element to outputDataType, or raises.
    element = client.get_element(f"{SO}outputDataType")
    assert fault.detail is not None
    return fault, element.parse(fault.detail[0], client.wsdl.types)


@pytest.mark.parametrize("soap", ["soap11", "soap12"])
async def test_zeep_reads_the_violation_typed(stack_factory: StackFactory, soap: str) -> None:
    stack = await stack_factory(DRRS.format(per="30s"))
    content_type = SOAP11 if soap == "soap11" else SOAP12
    assert (await stack.soap(stack.client(), "drrs", DRRS_RETRIEVE, content_type)).status == 200

    fault, typed = await asyncio.to_thread(zeep_call, stack, soap)
    assert fault.message == DRRS_MESSAGE
    assert fault.code == ("soapenv:Client" if soap == "soap11" else "env:Sender")
    log = typed.EventLog[0]
    event = log.Event[0]
    assert event.description == DRRS_MESSAGE
    assert event.result == "AUP-VIOLATION"
    assert event.name == "drrs-per-service"
    assert event.severity == "ERROR"
    assert log.collectionType == "retryAfterSeconds"
    assert int(log.collectionQuantity) == 30
    assert log.id == event.id
    assert log.Service[0].id == "DRRS" and log.Service[0].name == DRRS_RETRIEVE


@pytest.mark.parametrize("soap", ["soap11", "soap12"])
async def test_zeep_reads_error_faults_typed(stack_factory: StackFactory, soap: str) -> None:
    # Not provisioned for DRRS (a Client/Sender fault), then OMS's upstream down (Server/Receiver).
    refused = await stack_factory({"access.yaml": ACCESS})
    fault, typed = await asyncio.to_thread(zeep_call, refused, soap)
    assert fault.code == ("soapenv:Client" if soap == "soap11" else "env:Sender")
    assert typed.EventLog[0].Event[0].result == ErrorCode.NOT_PROVISIONED
    assert typed.EventLog[0].Event[0].description == fault.message
    assert "not provisioned for DRRS" in fault.message

    down = await stack_factory(OMS, oms_port=free_port())
    fault, typed = await asyncio.to_thread(zeep_call, down, soap, "oms")
    assert fault.code == ("soapenv:Server" if soap == "soap11" else "env:Receiver")
    assert typed.EventLog[0].Event[0].result == ErrorCode.UPSTREAM_UNAVAILABLE
    assert typed.EventLog[0].Service[0].id == "OMS"


class TlsTransport(suds.transport.http.HttpTransport):  # type: ignore[misc]
    """suds over urllib with a client certificate."""

    def __init__(self, context: ssl.SSLContext) -> None:
        super().__init__()
        self._context = context

    def u2handlers(self) -> list[Any]:
        handlers: list[Any] = super().u2handlers()
        return [*handlers, urllib.request.HTTPSHandler(context=self._context)]


def suds_call(stack: Stack) -> suds.WebFault:
    client = suds.client.Client(
        (WSDL / "RetrieveDRLocations_soap11.wsdl").as_uri(),
        location=f"{stack.url}/sst/drrs/{DRRS_RETRIEVE}",
        transport=TlsTransport(stack.ssl_for()),
        cache=None,
    )
    with pytest.raises(suds.WebFault) as caught:
        client.service.RetrieveDRLocations(resourceId="R1")
    return caught.value


async def test_suds_reads_the_soap11_violation(stack_factory: StackFactory) -> None:
    stack = await stack_factory(DRRS.format(per="30s"))
    assert (await stack.soap(stack.client(), "drrs", DRRS_RETRIEVE)).status == 200

    fault = await asyncio.to_thread(suds_call, stack)
    assert fault.fault.faultstring == DRRS_MESSAGE
    log = fault.fault.detail.outputDataType.EventLog
    assert log.Event.description == DRRS_MESSAGE
    assert log.Event.result == "AUP-VIOLATION"
    assert log.collectionType == "retryAfterSeconds"
    assert int(log.collectionQuantity) == 30


# --- rate-limit headers as Structured Fields ---------------------------------------------------

THREE_PER_5S = """\
policies:
  - name: oms-retrieve
    application: OMS
    services: ["Retrieve*"]
    limit: 3
    per: 5s
"""


def sf_list(value: str) -> list[tuple[Any, dict[str, Any]]]:
    parsed = http_sf.parse(value.encode(), tltype="list")
    assert isinstance(parsed, list)
    return [(item, params) for item, params in parsed]


async def test_allowed_answers_carry_ratelimit_with_the_remaining_quota(
    stack_factory: StackFactory,
) -> None:
    stack = await stack_factory(THREE_PER_5S)
    client = stack.client()
    remaining = []
    for _ in range(3):
        ok = await stack.soap(client, "oms", OMS_RETRIEVE)
        assert ok.status == 200 and "X-Echo-Path" in ok.headers  # forwarded
        assert "Retry-After" not in ok.headers
        assert sf_list(ok.headers["RateLimit-Policy"]) == [("oms-retrieve", {"q": 3, "w": 5})]
        [(name, params)] = sf_list(ok.headers["RateLimit"])
        assert name == "oms-retrieve" and set(params) == {"r", "t"}
        assert 0 <= params["t"] <= 5
        remaining.append(params["r"])
    assert remaining == [2, 1, 0]

    refused = await stack.soap(client, "oms", OMS_RETRIEVE)
    assert refused.status == 500
    [(name, params)] = sf_list(refused.headers["RateLimit"])
    assert params["r"] == 0 and params["t"] == int(refused.headers["Retry-After"])
    # No policy decided a submit: no rate-limit headers.
    submit = await stack.soap(client, "oms", OMS_SUBMIT)
    assert submit.status == 200 and "RateLimit" not in submit.headers


async def test_reset_parameter_parses_and_shadow_hits_carry_the_enforced_view(
    stack_factory: StackFactory,
) -> None:
    stack = await stack_factory(DRRS.format(per="30s"), extra="mode: shadow\n")
    client = stack.client()
    first = await stack.soap(client, "drrs", DRRS_RETRIEVE)
    [(name, params)] = sf_list(first.headers["RateLimit-Policy"])
    assert (name, params) == ("drrs-per-service", {"q": 1, "w": 30, "x-reset-on-early-retry": True})
    shadow = await stack.soap(client, "drrs", DRRS_RETRIEVE)
    assert shadow.status == 200 and "X-Echo-Path" in shadow.headers  # let through
    assert "Retry-After" not in shadow.headers
    [(_, params)] = sf_list(shadow.headers["RateLimit"])
    assert params == {"r": 0, "t": 30}  # what enforcement would say


# --- the Server header -------------------------------------------------------------------------


async def test_server_header_names_no_software(stack_factory: StackFactory) -> None:
    stack = await stack_factory(OMS, extra="server_name: Market-Gateway\n")
    client = stack.client()
    fault = await stack.soap(client, "nope", OMS_RETRIEVE)
    assert fault.headers["Server"] == "Market-Gateway"
    # A request llhttp refuses is answered by the connection layer.
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", stack.running.port, ssl=stack.ssl_for(), server_hostname="localhost"
    )
    writer.write(b"GET / HTTP/1.1\r\nHost: a\r\nBad Header: x\r\n\r\n")
    raw = await asyncio.wait_for(reader.read(65536), 5)
    writer.close()
    assert (
        raw.split(b"\r\n", 1)[0].endswith(b" 400 Bad Request")
        and b"\r\nServer: Market-Gateway\r\n" in raw
    )
    async with aiohttp.ClientSession() as admin, admin.get(f"{stack.admin_url}/healthz") as health:
        assert health.headers["Server"] == "Market-Gateway"
    assert b"python" not in raw.lower() and b"aiohttp" not in raw.lower()


async def test_forwarded_answers_keep_the_upstreams_server_else_ours(
    stack_factory: StackFactory,
) -> None:
    async def bare(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(bare, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        stack = await stack_factory(OMS, oms_port=port)
        client = stack.client()
        no_server = await stack.soap(client, "oms", OMS_SUBMIT)
        assert no_server.status == 200 and no_server.headers["Server"] == "AUP-Gateway"
        # DRRS goes to the mock, which names itself: kept as the upstream sent it.
        mocked = await stack.soap(client, "drrs", DRRS_RETRIEVE)
        assert mocked.status == 200 and "X-Echo-Path" in mocked.headers
        assert mocked.headers["Server"].startswith("Python/")
    finally:
        server.close()
        await server.wait_closed()


def test_the_readme_example_fault_is_valid() -> None:
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## What a violator sees") :]
    start = section.index("```xml") + len("```xml")
    example = section[start : section.index("```", start)]
    output = standard_output(example.encode())
    assert text(output, "so:EventLog/so:collectionQuantity") == "30"
    assert text(output, "so:EventLog/so:Event/so:result") == ErrorCode.VIOLATION
