"""Nobody gets in where they don't belong: the access list, identity headers, path and header
tricks, and hostile XML, each over real TLS with a real client.

Requests are hand-written bytes on a TLS socket wherever aiohttp's client would normalise them
(dot segments, absolute-form targets, bad header lines); the upstream records everything it
receives, so "never forwarded" is checked where it matters, at the upstream.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import ssl
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from defusedxml import ElementTree

from gateway.config.access import subject_pattern
from gateway.config.policy import load_policies
from gateway.demo.certs import DemoCerts
from gateway.edge.identity import identity_from_der
from gateway.limiter.memory import MemoryLimiter
from gateway.proxy.forward import OWNED
from tests.support import recording
from tests.support.clock import FakeClock
from tests.support.recording import Answer, Seen, exchange
from tests.support.stack import OMS, SOAP11, SOAP12, Stack, StackFactory

SOAP_ENV = "{http://schemas.xmlsoap.org/soap/envelope/}"
SOAP12_ENV = "{http://www.w3.org/2003/05/soap-envelope}"
OMS_RETRIEVE = "RetrieveCurrentOutages_OMSv1_AP"
DRRS_RETRIEVE = "RetrieveDRLocations_DRRSv2_AP"
JDOE = "CN=jdoex1234,OU=people,O=CAISO,C=US"

ACCESS = """\
access:
  - name: jdoe-oms
    subjects: ["cn=jdoex1234, ou=people, o=CAISO, c=US"]
    applications: [oms, CRR]
  - name: people-sibr
    subject_patterns: ["CN=*x5678,OU=people,O=CAISO,C=US"]
    applications: [SIBR]
  - name: caiso-crr
    organisations: [caiso]
    applications: [CRR]
"""

# This module's upstream records every request it receives (see tests/support/recording.py).
upstream, seen = recording.upstream, recording.seen


def vmrss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def other_org_client(certs: DemoCerts, folder: Path) -> tuple[Path, Path]:
    """A valid certificate from the same CA for a participant of another organisation."""
    ca = x509.load_pem_x509_certificate(certs.ca.read_bytes())
    ca_key = serialization.load_pem_private_key(certs.ca_key.read_bytes(), None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.COUNTRY_NAME, "US"),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "OtherCo"),
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "people"),
            x509.NameAttribute(NameOID.COMMON_NAME, "extx0001"),
        ]
    )
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    cert_path, key_path = folder / "otherco.pem", folder / "otherco-key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


def context_for(stack: Stack, pair: tuple[Path, Path]) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(stack.certs.ca))
    context.load_cert_chain(str(pair[0]), str(pair[1]))
    return context


def soap_body(op: str, ns: str = "http://schemas.xmlsoap.org/soap/envelope/") -> str:
    return (
        f'<soapenv:Envelope xmlns:soapenv="{ns}"><soapenv:Header/><soapenv:Body>'
        f'<{op} xmlns="http://www.caiso.com/soa/{op}"/></soapenv:Body></soapenv:Envelope>'
    )


def request_bytes(method: str, target: str, *headers: str, body: bytes = b"") -> bytes:
    lines = [f"{method} {target} HTTP/1.1", "Host: localhost", *headers]
    if body:
        lines.append(f"Content-Length: {len(body)}")
    lines += ["Connection: close", "", ""]
    return "\r\n".join(lines).encode("latin-1") + body


async def send(
    stack: Stack, data: bytes | list[bytes], user: str = "jdoex1234", **kwargs: float
) -> Answer:
    return await exchange(stack.running.port, stack.ssl_for(user), data, **kwargs)


# --- authorization: the access list ------------------------------------------------------------


async def test_unprovisioned_identity_gets_403_in_its_protocol_and_is_never_forwarded(
    stack_factory: StackFactory, seen: list[Seen]
) -> None:
    stack = await stack_factory({"access.yaml": ACCESS, "oms.yaml": OMS})
    jdoe = stack.client("jdoex1234")

    soap11 = await stack.soap(jdoe, "drrs", DRRS_RETRIEVE)
    assert soap11.status == 500 and "X-Echo-Path" not in soap11.headers  # SOAP 1.1 binding
    root = ElementTree.fromstring(await soap11.read())
    assert str(root.findtext(f"{SOAP_ENV}Body/{SOAP_ENV}Fault/faultcode")).endswith(":Client")
    assert "not provisioned for DRRS" in (await soap11.text())

    soap12 = await stack.soap(jdoe, "sibr", "RetrieveCleanBidSet_SIBRv5_AP", content_type=SOAP12)
    assert soap12.status == 400  # SOAP 1.2 binding: env:Sender
    assert soap12.headers["Content-Type"].startswith("application/soap+xml")
    root = ElementTree.fromstring(await soap12.read())
    value = root.findtext(f"{SOAP12_ENV}Body/{SOAP12_ENV}Fault/{SOAP12_ENV}Code/{SOAP12_ENV}Value")
    assert value is not None and value.endswith(":Sender")

    # the same identity is let through where it is provisioned (application names any case)
    assert (await stack.soap(jdoe, "OMS", "SubmitOutage_OMSv1_AP")).status == 200
    async with jdoe.get(f"{stack.url}/crr/auction/v1.0/portfolio") as ok:
        assert ok.status == 200
    assert {(s.service, s.path.split("?")[0]) for s in seen} == {
        ("soap", "/sst/OMS/SubmitOutage_OMSv1_AP"),
        ("rest", "/auction/v1.0/portfolio"),
    }


async def test_subject_patterns_and_organisations_grant_access(
    stack_factory: StackFactory, seen: list[Seen], tmp_path: Path
) -> None:
    stack = await stack_factory({"access.yaml": ACCESS})
    asmith, blee = stack.client("asmithx5678"), stack.client("bleex4242")
    assert (await stack.soap(asmith, "sibr", "RetrieveCleanBidSet_SIBRv5_AP")).status == 200
    refused = await stack.soap(blee, "sibr", "RetrieveCleanBidSet_SIBRv5_AP")
    assert refused.status == 500 and b"AUP-NOT-PROVISIONED" in await refused.read()
    for client in (asmith, blee):  # O=CAISO
        async with client.get(f"{stack.url}/crr/auction/v1.0/portfolio") as response:
            assert response.status == 200
        assert (await stack.soap(client, "oms", OMS_RETRIEVE)).status == 500  # SOAP 1.1

    # a valid certificate of another organisation: provisioned for nothing
    other = context_for(stack, other_org_client(stack.certs, tmp_path))
    for target in ("/crr/auction/v1.0/portfolio", f"/sst/oms/{OMS_RETRIEVE}"):
        answer = await exchange(stack.running.port, other, request_bytes("GET", target))
        # problem+json for REST; a SOAP 1.1 fault, on 500, for a SOAP application
        expected = 403 if target.startswith("/crr") else 500
        assert answer.status == expected and not answer.forwarded, target
        assert b"NOT-PROVISIONED" in answer.body and b"extx0001 is not provisioned" in answer.body
    assert len(seen) == 3  # asmith SIBR, asmith CRR, blee CRR


async def test_without_an_access_list_every_verified_identity_may_call_everything(
    stack_factory: StackFactory, tmp_path: Path
) -> None:
    stack = await stack_factory(OMS)
    assert stack.running.gateway.policies.access is None
    other = context_for(stack, other_org_client(stack.certs, tmp_path))
    for app, service in (("drrs", DRRS_RETRIEVE), ("sibr", "RetrieveCleanBidSet_SIBRv5_AP")):
        answer = await exchange(
            stack.running.port,
            other,
            request_bytes(
                "POST",
                f"/sst/{app}/{service}",
                f"Content-Type: {SOAP11}",
                body=soap_body(service).encode(),
            ),
        )
        assert answer.status == 200 and answer.forwarded


async def test_the_access_list_reloads_with_the_policies(stack_factory: StackFactory) -> None:
    stack = await stack_factory({"access.yaml": ACCESS})
    gateway = stack.running.gateway
    jdoe = stack.client("jdoex1234")
    refused = await stack.soap(jdoe, "drrs", DRRS_RETRIEVE)
    assert refused.status == 500 and b"AUP-NOT-PROVISIONED" in await refused.read()

    (stack.folder / "policies" / "access.yaml").write_text(
        ACCESS
        + """\
  - subjects: ["CN=jdoex1234,OU=people,O=CAISO,C=US"]
    applications: [DRRS]
"""
    )
    gateway.policies = load_policies(gateway.settings)  # what every reload does: swap whole
    assert (await stack.soap(jdoe, "drrs", DRRS_RETRIEVE)).status == 200

    (stack.folder / "policies" / "access.yaml").unlink()  # no entries left: open again
    gateway.policies = load_policies(gateway.settings)
    assert gateway.policies.access is None
    assert (await stack.soap(stack.client("bleex4242"), "oms", OMS_RETRIEVE)).status == 200


def test_subject_patterns_match_inside_one_value_and_ignore_case() -> None:
    pattern = subject_pattern("cn=*, ou=people, o=caiso, c=us")
    assert pattern.fullmatch(JDOE)
    assert pattern.fullmatch("CN=a\\,b,OU=people,O=CAISO,C=US")  # an escaped comma is a value
    # `*` never swallows extra RDNs: no smuggling a different DN into the pattern's shape
    assert not pattern.fullmatch("CN=x,OU=other,O=Evil,C=US,OU=people,O=CAISO,C=US")
    assert not pattern.fullmatch("CN=x,OU=people,O=CAISO,C=US,CN=y")
    assert subject_pattern("CN=jdoe?????,OU=people,O=CAISO,C=US").fullmatch(JDOE)
    assert subject_pattern("*").fullmatch("anything at all")
    with pytest.raises(ValueError):
        subject_pattern("jdoe*")


# --- identity headers ---------------------------------------------------------------------------


async def test_client_sent_identity_headers_never_reach_the_upstream(
    stack_factory: StackFactory, seen: list[Seen]
) -> None:
    stack = await stack_factory(OMS)
    forged = 'Hash=00;Subject="CN=victimx0001,OU=people,O=CAISO,C=US"'
    spoofed = []
    for name in sorted(OWNED):
        spoofed += [
            f"{name}: {forged}",
            f"{name.upper()}: {forged}",
            f"{name.replace('-', '_')}: {forged}",
            f"{name.title().replace('-', '_')}: x",
        ]
    spoofed += ["Connection: close, X-Hop-Secret", "X-Hop-Secret: forged", "X-Kept: yes"]
    answer = await send(
        stack,
        request_bytes(
            "POST",
            "/sst/oms/SubmitOutage_OMSv1_AP",
            *spoofed[:95],
            f"Content-Type: {SOAP11}",
            body=b"<x/>",
        ),
    )
    assert answer.status == 200
    (request,) = seen
    names = [name.lower().replace("_", "-") for name, _ in request.headers]
    gateway_own = {
        "x-forwarded-client-cert",
        "x-forwarded-for",
        "x-forwarded-proto",
        "x-request-id",
    }
    for name in OWNED:
        assert names.count(name) == (1 if name in gateway_own else 0), name
    jdoe = identity_from_der(
        ssl.PEM_cert_to_DER_cert(stack.certs.clients["jdoex1234"][0].read_text())
    )
    assert request.header("X-Forwarded-Client-Cert") == [jdoe.xfcc]
    assert request.header("X-Forwarded-For") == ["127.0.0.1"]
    assert "victimx0001" not in json.dumps(request.headers)
    assert request.header("X-Hop-Secret") == [] and request.header("X-Kept") == ["yes"]


# --- path and header tricks ---------------------------------------------------------------------

TRICKS = [
    ("POST", f"/sst/drrs/{DRRS_RETRIEVE}"),  # the plain call: not provisioned
    ("POST", f"/sst/DRRS/{DRRS_RETRIEVE}"),
    ("POST", f"/sst/oms/../drrs/{DRRS_RETRIEVE}"),
    ("POST", f"/sst/oms/%2e%2e/drrs/{DRRS_RETRIEVE}"),
    ("POST", f"/sst/oms/%2E%2e/drrs/{DRRS_RETRIEVE}"),
    ("POST", f"/sst/oms/..%2fdrrs/{DRRS_RETRIEVE}"),
    ("POST", f"/sst/oms%2f..%2fdrrs/{DRRS_RETRIEVE}"),
    ("POST", f"/sst/oms/%252e%252e/drrs/{DRRS_RETRIEVE}"),
    ("POST", f"/sst/oms/%c0%ae%c0%ae/drrs/{DRRS_RETRIEVE}"),
    ("POST", f"/sst/oms/..;/drrs/{DRRS_RETRIEVE}"),
    ("POST", f"/sst/oms;x=1/../drrs/{DRRS_RETRIEVE}"),
    ("POST", f"/sst/oms/{OMS_RETRIEVE}/../../drrs/{DRRS_RETRIEVE}"),
    ("POST", f"/sst/oms/{OMS_RETRIEVE}%2f..%2f..%2fdrrs%2f{DRRS_RETRIEVE}"),
    ("POST", f"/sst/oms/.%2e/drrs/{DRRS_RETRIEVE}"),
    ("POST", f"/sst/oms/{OMS_RETRIEVE}%00"),
    ("POST", f"/sst/oms/{OMS_RETRIEVE}%0d%0aX-Injected:%20yes"),
    ("POST", f"/sst/oms\\..\\drrs\\{DRRS_RETRIEVE}"),
    ("POST", f"/sst/oms%5c..%5cdrrs%5c{DRRS_RETRIEVE}"),
    ("POST", f"//sst/drrs/{DRRS_RETRIEVE}"),
    ("POST", f"/sst//drrs/{DRRS_RETRIEVE}"),
    ("POST", f"/sst/%64rrs/{DRRS_RETRIEVE}"),  # an encoded letter is another name, not drrs
    ("POST", f"/sst/oms/{OMS_RETRIEVE}#/../../drrs/{DRRS_RETRIEVE}"),
    ("POST", f"https://evil.example/sst/drrs/{DRRS_RETRIEVE}"),
    ("POST", f"https://localhost/sst/oms/{OMS_RETRIEVE}"),
    ("POST", f"//evil.example/sst/oms/{OMS_RETRIEVE}"),
    ("GET", "/crr/../sst/drrs/x"),
    ("GET", "/crr/auction/v1.0/portfolio/../../../sst/drrs/x"),
    ("GET", "/crr/auction/v1.0/portfolio/..;/..;/..;/admin"),
    ("GET", "/crr%2f..%2fsst/drrs/x"),
    ("GET", "/crr/auction/v1.0/%2e%2e/%2e%2e/secret"),
    ("GET", "/crr/auction/v1.0/portfolio%3f/../../secret"),
    ("OPTIONS", "*"),
    ("CONNECT", "evil.example:443"),
    ("TRACE", f"/sst/oms/{OMS_RETRIEVE}"),
    ("PROPFIND", f"/sst/oms/{OMS_RETRIEVE}"),
    ("A" * 5000, f"/sst/oms/{OMS_RETRIEVE}"),
    ("POST", "/sst/oms/" + "A" * 9000),
]


async def test_path_tricks_never_reach_another_application_or_escape_the_prefix(
    stack_factory: StackFactory, seen: list[Seen]
) -> None:
    stack = await stack_factory({"access.yaml": ACCESS})
    answers: dict[int, int] = {}
    for method, target in TRICKS:
        answer = await send(
            stack,
            request_bytes(
                method,
                target,
                f"Content-Type: {SOAP11}",
                body=soap_body("RetrieveDRLocations").encode(),
            ),
        )
        # a client error: 4xx, or a SOAP 1.1 Client fault (on 500, the binding's status)
        client_fault = answer.status == 500 and b"<faultcode>soapenv:Client<" in answer.body
        assert answer.status is not None, (method, target, answer)
        assert 400 <= answer.status < 500 or client_fault, (method, target, answer)
        assert not answer.forwarded, target
        refused = b"AUP-NOT-PROVISIONED" in answer.body
        answers[refused] = answers.get(refused, 0) + 1
    assert seen == []  # nothing reached any upstream
    assert answers[True] == 2  # only the plain calls got as far as the access list
    # and a query cannot move the path: it is forwarded exactly as sent
    answer = await send(
        stack,
        request_bytes(
            "POST",
            f"/sst/oms/{OMS_RETRIEVE}?/../../drrs/x=%0d%0aInjected:%20yes",
            f"Content-Type: {SOAP11}",
            body=soap_body("RetrieveCurrentOutages").encode(),
        ),
    )
    assert answer.status == 200
    assert [s.path for s in seen] == [
        f"/sst/oms/{OMS_RETRIEVE}?/../../drrs/x=%0d%0aInjected:%20yes"
    ]


@pytest.mark.parametrize(
    "header_block",
    [
        b"X-A: 1\r\n X-Forwarded-Client-Cert: forged\r\n",  # obs-fold continuation
        b"X-A: 1\rX-Forwarded-Client-Cert: forged\r\n",  # bare CR
        b"X-A: 1\nX-Forwarded-Client-Cert: forged\r\n",  # bare LF
        b"X-Forwarded-Client-Cert : forged\r\n",  # space before the colon
        b"X-A: a\x00b\r\n",  # NUL in a value
        b"Host: evil.example\r\n",  # a second Host
        b"Content-Length: 4\r\nTransfer-Encoding: chunked\r\n",  # request smuggling
        b"Content-Length: 4\r\nContent-Length: 5\r\n",
        b"Transfer-Encoding: chunked, identity\r\n",
    ],
)
async def test_crlf_and_malformed_header_lines_are_refused_before_routing(
    stack_factory: StackFactory, seen: list[Seen], header_block: bytes
) -> None:
    stack = await stack_factory(OMS)
    data = (
        f"POST /sst/oms/{OMS_RETRIEVE} HTTP/1.1\r\nHost: localhost\r\n".encode()
        + header_block
        + b"Connection: close\r\n\r\n0\r\n\r\n"
    )
    answer = await send(stack, data)
    assert answer.status == 400 and not answer.forwarded
    assert answer.headers["content-type"].startswith("application/problem+json")
    assert b"forged" not in answer.body and b"evil" not in answer.body  # nothing echoed back
    assert seen == []


@pytest.mark.parametrize("version", ["", " HTTP/0.9", " HTTP/2.0", " HTTP/1.2", " http/1.1"])
async def test_request_lines_other_than_http_1_0_and_1_1_are_refused(
    stack_factory: StackFactory, seen: list[Seen], version: str
) -> None:
    stack = await stack_factory(OMS)
    answer = await send(
        stack,
        f"POST /sst/oms/SubmitOutage_OMSv1_AP{version}\r\nHost: x\r\n"
        "Connection: close\r\n\r\n".encode(),
    )
    assert answer.status in (400, 505) and not answer.forwarded
    assert answer.raw.startswith(b"HTTP/1.")  # an HTTP/1 answer, not one echoing the version
    assert seen == []


async def test_host_header_and_absolute_form_cannot_pick_the_upstream(
    stack_factory: StackFactory, seen: list[Seen]
) -> None:
    stack = await stack_factory(OMS)
    answer = await send(
        stack,
        f"POST /sst/oms/SubmitOutage_OMSv1_AP HTTP/1.1\r\n"
        f"Host: drrs.internal.example\r\nContent-Type: {SOAP11}\r\n"
        "Content-Length: 4\r\nConnection: close\r\n\r\n<x/>".encode(),
    )
    assert answer.status == 200
    (request,) = seen
    host = request.header("Host")
    assert host and host[0].startswith("127.0.0.1:")  # the upstream's own authority
    assert request.path == "/sst/oms/SubmitOutage_OMSv1_AP"
    no_host = await send(
        stack,
        b"POST /sst/oms/SubmitOutage_OMSv1_AP HTTP/1.1\r\n"
        b"Content-Length: 0\r\nConnection: close\r\n\r\n",
    )
    assert no_host.status == 400 and len(seen) == 1  # HTTP/1.1 requires one Host


# --- hostile XML --------------------------------------------------------------------------------

BILLION_LAUGHS = """<?xml version="1.0"?>
<!DOCTYPE lolz [
 <!ENTITY lol "lol">
 <!ENTITY lol1 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">
 <!ENTITY lol2 "&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;">
 <!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;">
 <!ENTITY lol4 "&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;">
 <!ENTITY lol5 "&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;">
 <!ENTITY lol6 "&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;">
 <!ENTITY lol7 "&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;">
 <!ENTITY lol8 "&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;">
 <!ENTITY lol9 "&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;">
]>
<soapenv:Envelope xmlns:soapenv="http://schemas.xmlsoap.org/soap/envelope/"><soapenv:Body>
<RetrieveCurrentOutages>&lol9;</RetrieveCurrentOutages></soapenv:Body></soapenv:Envelope>"""

QUADRATIC = (
    '<?xml version="1.0"?><!DOCTYPE k [<!ENTITY a "' + "x" * 50_000 + '">]>'
    '<soapenv:Envelope xmlns:soapenv="http://schemas.xmlsoap.org/soap/envelope/">'
    "<soapenv:Body><R>" + "&a;" * 10_000 + "</R></soapenv:Body></soapenv:Envelope>"
)

XXE = """<?xml version="1.0"?>
<!DOCTYPE r [<!ENTITY file SYSTEM "file:///etc/passwd">
 <!ENTITY web SYSTEM "http://127.0.0.1:{port}/xxe-fetched">
 <!ENTITY % p SYSTEM "http://127.0.0.1:{port}/xxe-dtd"> %p;]>
<soapenv:Envelope xmlns:soapenv="http://schemas.xmlsoap.org/soap/envelope/"><soapenv:Body>
<RetrieveCurrentOutages>&file;&web;</RetrieveCurrentOutages></soapenv:Body></soapenv:Envelope>"""


@pytest.mark.parametrize("content_type", [SOAP11, SOAP12])
async def test_entity_expansion_gets_a_soap_fault_in_bounded_time_and_memory(
    stack_factory: StackFactory, seen: list[Seen], content_type: str
) -> None:
    stack = await stack_factory(OMS)
    before = vmrss_kib()
    for body in (BILLION_LAUGHS, QUADRATIC):
        started = time.monotonic()
        answer = await send(
            stack,
            request_bytes("POST", "/sst/oms", f"Content-Type: {content_type}", body=body.encode()),
        )
        assert time.monotonic() - started < 1.0
        expected = 500 if content_type == SOAP11 else 400  # the SOAP bindings' statuses
        assert answer.status == expected and not answer.forwarded
        root = ElementTree.fromstring(answer.body)
        assert root.tag in (f"{SOAP_ENV}Envelope", f"{SOAP12_ENV}Envelope")
        assert "document type" in answer.body.decode() and b"lollol" not in answer.body
    assert vmrss_kib() - before < 20_000  # expansion would be gigabytes
    assert seen == []


async def test_external_entities_are_refused_never_fetched_or_echoed(
    stack_factory: StackFactory, seen: list[Seen]
) -> None:
    stack = await stack_factory(OMS)
    port = stack.running.gateway.settings.applications["OMS"].upstream.rsplit(":", 1)[1]
    answer = await send(
        stack,
        request_bytes(
            "POST",
            "/sst/oms",
            f"Content-Type: {SOAP11}",
            'SOAPAction: ""',
            body=XXE.format(port=port).encode(),
        ),
    )
    assert answer.status == 500 and not answer.forwarded  # a SOAP 1.1 fault
    assert b"root:" not in answer.body
    assert seen == []  # neither forwarded nor fetched by an entity resolver


async def test_service_from_the_soap_body_is_routed_limited_and_forwarded_whole(
    stack_factory: StackFactory, seen: list[Seen]
) -> None:
    clock = FakeClock()
    stack = await stack_factory(OMS, limiter=MemoryLimiter(clock))
    security = "<wsse:Security xmlns:wsse='urn:wsse'>" + "A" * 20_000 + "</wsse:Security>"
    small = soap_body("RetrieveCurrentOutages").replace(
        "<soapenv:Header/>", f"<soapenv:Header>{security}</soapenv:Header>"
    )
    first = await send(
        stack, request_bytes("POST", "/sst/oms", f"Content-Type: {SOAP11}", body=small.encode())
    )
    # (the mock itself cannot tell the service without a SOAPAction: it answers a fault)
    assert first.forwarded
    assert first.headers["x-echo-body-sha256"] == hashlib.sha256(small.encode()).hexdigest()
    again = await send(
        stack, request_bytes("POST", "/sst/oms", f"Content-Type: {SOAP11}", body=small.encode())
    )
    assert again.status == 500 and not again.forwarded  # the OMS policy, on the Body's service
    assert "RetrieveCurrentOutages" in again.body.decode() and "Retry-After" in again.raw.decode()

    # a large chunked SOAP 1.2 body: the prefix read for routing goes upstream before the rest
    payload = (
        soap_body("SubmitOutage", "http://www.w3.org/2003/05/soap-envelope")
        .replace(
            "/></soapenv:Body>",
            ">" + "<item>0123456789</item>" * 60_000 + "</SubmitOutage></soapenv:Body>",
        )
        .encode()
    )
    chunks = b"".join(
        b"%x\r\n%s\r\n" % (len(payload[i : i + 7000]), payload[i : i + 7000])
        for i in range(0, len(payload), 7000)
    )
    big = await send(
        stack,
        f"POST /sst/oms HTTP/1.1\r\nHost: x\r\nContent-Type: {SOAP12}\r\n"
        "Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n".encode()
        + chunks
        + b"0\r\n\r\n",
    )
    assert big.forwarded, big
    assert big.headers["x-echo-body-length"] == str(len(payload))
    assert big.headers["x-echo-body-sha256"] == hashlib.sha256(payload).hexdigest()

    # SOAP with attachments: the service is read from the root part
    boundary = "MIMEBoundary_aup"
    package = (
        f"--{boundary}\r\nContent-Type: text/xml; charset=UTF-8\r\nContent-ID: <root>\r\n"
        f"\r\n{soap_body('SubmitBid')}\r\n--{boundary}--\r\n"
    ).encode()
    swa = await send(
        stack,
        request_bytes(
            "POST",
            "/sst/oms",
            f'Content-Type: multipart/related; type="text/xml"; boundary="{boundary}"',
            body=package,
        ),
    )
    assert swa.forwarded and swa.headers["x-echo-body-length"] == str(len(package))
    assert [s.path for s in seen] == ["/sst/oms"] * 3


@pytest.mark.parametrize(
    ("body", "content_type", "status", "code"),
    [
        (
            '<soapenv:Envelope xmlns:soapenv="http://schemas.xmlsoap.org/soap/envelope/">'
            "<soapenv:Body/></soapenv:Envelope>",
            SOAP11,
            500,
            "UNKNOWN-SERVICE",
        ),
        ("<notsoap><Body><RetrieveX/></Body></notsoap>", SOAP11, 500, "BAD-XML"),
        (
            "<soapenv:Envelope xmlns:soapenv='http://schemas.xmlsoap.org/soap/envelope/'><soapenv:Body>"
            "<Retrieve&undefined;/>",
            SOAP11,
            500,
            "BAD-XML",
        ),
        ('{"service": "RetrieveCurrentOutages"}', "application/json", 500, "UNKNOWN-SERVICE"),
        (
            '<soapenv:Envelope xmlns:soapenv="http://schemas.xmlsoap.org/soap/envelope/">'
            "<soapenv:Header>" + "<pad/>" * 20_000 + "</soapenv:Header><soapenv:Body><RetrieveX/>"
            "</soapenv:Body></soapenv:Envelope>",
            SOAP11,
            500,
            "UNKNOWN-SERVICE",
        ),  # past 64 KiB
    ],
)
async def test_a_body_that_names_no_service_is_refused(
    stack_factory: StackFactory,
    seen: list[Seen],
    body: str,
    content_type: str,
    status: int,
    code: str,
) -> None:
    stack = await stack_factory(OMS)
    answer = await send(
        stack,
        request_bytes("POST", "/sst/oms", f"Content-Type: {content_type}", body=body.encode()),
    )
    assert answer.status == status and not answer.forwarded
    assert code in answer.body.decode()
    assert seen == []
