"""Client compatibility: the gateway as participants' own software meets it.

Each test drives a real client stack (requests with urllib3's Retry, httpx, curl, Java 17's
java.net.http.HttpClient, node-soap) against a real gateway, with policies shaped like the
operator's but with short windows: OMS (1 call per 2 s per identity and service), DRRS (1 per
2 s, every early retry resets the timer), CRR and SIBR submits (1 per minute, so a second call is
surely refused). For each client: what it shows for a violation, for a refused certificate, and
for a 2 MB submit with `Expect: 100-continue` (zeep and suds are in test_faults.py).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import ssl
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import requests
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.serialization import PrivateFormat, pkcs12
from requests.adapters import HTTPAdapter
from urllib3.util.retry import Retry

from tests.support.clients import (
    CRR_SHORT,
    DRRS_SHORT,
    OMS_SHORT,
    SIBR_PATH,
    SIBR_POLICY,
    TWO_MB,
    bid_set,
    policies,
    run,
    sha256,
)
from tests.support.stack import ENVELOPE, SOAP11, Stack, StackFactory
from tests.support.tools import require

CLIENTS = Path(__file__).parent / "clients"
OMS_RETRIEVE = "RetrieveResourceOutage_OMSv1_AP"
DRRS_RETRIEVE = "RetrieveDRLocations_DRRSv2_AP"
PORTFOLIO = "/crr/auction/v1.0/portfolio"
NODE_SOAP = "soap@1.13.0"
# How each client stack spells the TLS alert for an expired certificate (certificate_expired,
# SSLV3_ALERT_CERTIFICATE_EXPIRED, "sslv3 alert certificate expired").
EXPIRED = re.compile(r"certificate.expired", re.IGNORECASE)
DESCRIPTION = re.compile(r"<description>([^<]*)</description>")


@pytest.fixture
async def stack(stack_factory: StackFactory) -> Stack:
    return await stack_factory(policies(OMS_SHORT, DRRS_SHORT, CRR_SHORT, SIBR_POLICY))


def envelope(service: str) -> bytes:
    return ENVELOPE.format(op=service.split("_")[0]).encode()


def soap_url(stack: Stack, app: str, service: str) -> str:
    return f"{stack.url}/sst/{app}/{service}"


def pair(stack: Stack, user: str) -> tuple[Path, Path]:
    return stack.certs.clients.get(user) or stack.certs.bad[user]


def described(body: str) -> str:
    """The fault's Event/description, where typed clients read the text."""
    found = DESCRIPTION.search(body)
    assert found, body[:1000]
    return found[1]


# --- requests + urllib3 Retry ----------------------------------------------------------------


def retrying_session(stack: Stack, methods: frozenset[str] | None) -> requests.Session:
    """A session that retries faults and 429s and waits as long as Retry-After says."""
    session = requests.Session()
    session.trust_env = False  # the machine's REQUESTS_CA_BUNDLE would override `verify`
    session.verify = str(stack.certs.ca)
    session.cert = tuple(str(p) for p in pair(stack, "jdoex1234"))  # type: ignore[assignment]
    retry = Retry(
        total=3,
        status_forcelist=[500, 429],
        allowed_methods=methods,
        respect_retry_after_header=True,
        backoff_factor=0,
        raise_on_status=False,
    )
    session.mount("https://", HTTPAdapter(max_retries=retry))
    return session


def call_twice(session: requests.Session, url: str, service: str) -> list[requests.Response]:
    headers = {"Content-Type": SOAP11, "SOAPAction": f'"{service}"'}
    return [session.post(url, data=envelope(service), headers=headers) for _ in range(2)]


@pytest.mark.parametrize(
    ("app", "service", "methods"),
    [("oms", OMS_RETRIEVE, None), ("drrs", DRRS_RETRIEVE, frozenset({"POST"}))],
    ids=["OMS", "DRRS"],
)
async def test_requests_honouring_retry_after_gets_through_on_its_first_retry(
    stack: Stack, app: str, service: str, methods: frozenset[str] | None
) -> None:
    session = retrying_session(stack, methods)
    try:
        first, second = await asyncio.to_thread(
            call_twice, session, soap_url(stack, app, service), service
        )
    finally:
        session.close()
    assert first.status_code == 200
    assert first.raw.retries is None or not first.raw.retries.history
    # The second call was refused once (a SOAP 1.1 fault on 500 with Retry-After), urllib3
    # waited the Retry-After and its one retry got through. Under DRRS's reset rule, a retry
    # any earlier would have restarted the lockout instead.
    history = second.raw.retries.history
    assert [h.status for h in history] == [500], history
    assert second.status_code == 200, second.text[:500]
    assert b"ResourceOutageData" in second.content or b"DRLocation" in second.content


async def test_requests_with_an_expired_certificate_gets_the_reason(stack: Stack) -> None:
    session = retrying_session(stack, None)
    session.cert = tuple(str(p) for p in pair(stack, "expired"))  # type: ignore[assignment]
    url = soap_url(stack, "oms", OMS_RETRIEVE)
    try:
        with pytest.raises(requests.exceptions.SSLError) as refused:
            await asyncio.to_thread(session.post, url, data=envelope(OMS_RETRIEVE))
    finally:
        session.close()
    assert EXPIRED.search(str(refused.value)), refused.value


# --- httpx (REST) ---------------------------------------------------------------------------


def httpx_client(stack: Stack, user: str = "jdoex1234") -> httpx.AsyncClient:
    return httpx.AsyncClient(verify=stack.ssl_for(user), trust_env=False, timeout=20.0)


async def test_httpx_reads_a_rest_violation_as_problem_json_with_retry_after(
    stack: Stack,
) -> None:
    async with httpx_client(stack) as client:
        first = await client.get(stack.url + PORTFOLIO)
        second = await client.get(stack.url + PORTFOLIO)
    assert first.status_code == 200
    assert "portfolios" in first.json()
    assert second.status_code == 429
    assert second.headers["content-type"].startswith("application/problem+json")
    retry_after = int(second.headers["retry-after"])
    assert 1 <= retry_after <= 60
    problem = second.json()
    assert problem["retry_after"] == retry_after
    assert problem["policy"] == "crr-portfolio"
    assert problem["service"] == "getPortfolio"
    assert str(retry_after) in problem["detail"]


async def test_httpx_with_an_expired_certificate_gets_the_reason(stack: Stack) -> None:
    # On TLS 1.3 the alert arrives on the first read; httpcore's anyio backend lets that
    # ssl.SSLError through as it is (it wraps only EOF and broken streams in httpx errors).
    async with httpx_client(stack, "expired") as client:
        with pytest.raises((httpx.TransportError, ssl.SSLError)) as refused:
            await client.get(stack.url + PORTFOLIO)
    assert EXPIRED.search(repr(refused.value)), repr(refused.value)


async def test_httpx_posts_2mb_with_expect_100_continue(stack: Stack) -> None:
    # httpx (h11) sends `Expect` as a plain header and its body straight after the head; the
    # gateway's 100 Continue arrives unasked-for-now and h11 skips it.
    body = bid_set()
    headers = {"Content-Type": SOAP11, "Expect": "100-continue"}
    async with httpx_client(stack) as client:
        response = await client.post(stack.url + SIBR_PATH, content=body, headers=headers)
    assert response.status_code == 200, response.text[:500]
    assert response.headers["x-echo-body-sha256"] == sha256(body)
    forwarded = {name.lower() for name in json.loads(response.headers["x-echo-headers"])}
    assert "expect" not in forwarded


# --- curl -----------------------------------------------------------------------------------


def curl_argv(stack: Stack, user: str = "jdoex1234") -> list[str]:
    cert, key = pair(stack, user)
    return [
        require("curl", package="curl"),
        "-sS",
        "--cacert",
        str(stack.certs.ca),
        "--cert",
        str(cert),
        "--key",
        str(key),
    ]


async def test_curl_sees_a_violation_fault_with_retry_after(stack: Stack) -> None:
    argv = [
        *curl_argv(stack),
        "-D",
        "-",
        "-H",
        f"Content-Type: {SOAP11}",
        "--data-binary",
        envelope(OMS_RETRIEVE).decode(),
        soap_url(stack, "oms", OMS_RETRIEVE),
    ]
    first = await run(*argv)
    second = await run(*argv)
    assert first.returncode == 0 and first.stdout.startswith("HTTP/1.1 200"), first
    assert second.returncode == 0, second.stderr
    assert second.stdout.startswith("HTTP/1.1 500"), second.stdout[:300]
    retry_after = re.search(r"(?im)^retry-after: (\d+)\r?$", second.stdout)
    assert retry_after and retry_after[1] == "2", second.stdout[:600]
    assert "<faultstring>" in second.stdout
    assert "retry your request again in 2 seconds" in described(second.stdout)
    assert "<collectionQuantity>2</collectionQuantity>" in second.stdout  # the retry seconds


async def test_curl_with_an_expired_certificate_gets_the_reason(stack: Stack) -> None:
    refused = await run(*curl_argv(stack, "expired"), soap_url(stack, "oms", OMS_RETRIEVE))
    assert refused.returncode != 0
    assert EXPIRED.search(refused.stderr), refused.stderr


async def test_curl_uploads_2mb_after_100_continue_and_nothing_when_refused(
    stack: Stack,
) -> None:
    body_file = stack.folder / "bidset.xml"
    body_file.write_bytes(bid_set())
    argv = [
        *curl_argv(stack),
        "-v",
        "-H",
        f"Content-Type: {SOAP11}",
        "--data-binary",
        f"@{body_file}",
        "-o",
        "/dev/null",
        "-w",
        "%{size_upload} %{http_code}",
        stack.url + SIBR_PATH,
    ]
    allowed = await run(*argv)
    assert allowed.returncode == 0, allowed.stderr
    assert "> Expect: 100-continue" in allowed.stderr  # curl asks by itself over 1 MB
    assert "< HTTP/1.1 100 Continue" in allowed.stderr
    assert allowed.stdout == f"{TWO_MB} 200"

    refused = await run(*argv)  # the minute's one submit is spent
    assert refused.returncode == 0, refused.stderr
    assert "> Expect: 100-continue" in refused.stderr
    assert "100 Continue" not in refused.stderr
    assert refused.stdout == "0 500"  # the fault came back; not one body byte went out


# --- Java 17 java.net.http.HttpClient --------------------------------------------------------


def java_launcher() -> str:
    require("javac", package="openjdk-17-jdk-headless")  # `java File.java` compiles it first
    return require("java", package="openjdk-17-jdk-headless")


def pkcs12_keystore(stack: Stack, user: str, password: bytes) -> Path:
    """The participant's certificate and key as a PKCS12 keystore Java's KeyStore reads."""
    cert_path, key_path = pair(stack, user)
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    key = serialization.load_pem_private_key(key_path.read_bytes(), None)
    encryption = (
        PrivateFormat.PKCS12.encryption_builder()
        .kdf_rounds(50_000)
        .key_cert_algorithm(pkcs12.PBES.PBESv2SHA256AndAES256CBC)
        .hmac_hash(hashes.SHA256())
        .build(password)
    )
    data = pkcs12.serialize_key_and_certificates(
        user.encode(),
        key,  # type: ignore[arg-type]
        cert,
        None,
        encryption,
    )
    out = stack.folder / f"{user}.p12"
    out.write_bytes(data)
    return out


async def java_client(stack: Stack, user: str, *requests_: str) -> list[dict[str, object]]:
    """Run tests/clients/Client.java; one dict per request (status, headers, body or errors)."""
    java = java_launcher()
    keystore = pkcs12_keystore(stack, user, b"changeit")
    ran = await run(
        java,
        str(CLIENTS / "Client.java"),
        str(keystore),
        "changeit",
        str(stack.certs.ca),
        "20",
        *requests_,
        timeout=120,
    )
    assert ran.returncode == 0, ran.stderr
    results: list[dict[str, object]] = []
    for line in ran.stdout.splitlines():
        kind, _, rest = line.partition(" ")
        if (
            kind == "STATUS"
            or (kind == "EXCEPTION" and not results)
            or (kind == "EXCEPTION" and "status" in results[-1])
        ):
            results.append({})
        current = results[-1]
        if kind == "STATUS":
            current["status"] = int(rest)
            current["headers"] = {}
        elif kind == "HEADER":
            name, _, value = rest.partition(": ")
            current["headers"][name.lower()] = value  # type: ignore[index]
        elif kind == "BODY":
            current["body"] = rest
        elif kind == "EXCEPTION":
            current.setdefault("errors", []).append(rest)  # type: ignore[attr-defined]
    return results


def java_request(url: str, body: Path | None = None, expect: bool = False) -> str:
    return f"POST|{url}|{SOAP11}|{body or '-'}|{int(expect)}"


async def test_java_httpclient_sees_the_violation_and_submits_2mb_with_expect_continue(
    stack: Stack,
) -> None:
    oms = stack.folder / "oms.xml"
    oms.write_bytes(envelope(OMS_RETRIEVE))
    bidset = stack.folder / "bidset.xml"
    body = bid_set()
    bidset.write_bytes(body)
    url = soap_url(stack, "oms", OMS_RETRIEVE)
    allowed, violation, submit = await java_client(
        stack,
        "jdoex1234",
        java_request(url, oms),
        java_request(url, oms),
        java_request(stack.url + SIBR_PATH, bidset, expect=True),
    )
    assert allowed["status"] == 200, allowed
    assert violation["status"] == 500, violation
    assert violation["headers"]["retry-after"] == "2"  # type: ignore[index]
    assert "retry your request again in 2 seconds" in described(str(violation["body"]))
    assert "<collectionQuantity>2</collectionQuantity>" in str(violation["body"])
    # expectContinue(true): Java waits for 100 Continue; it came, so no hang and no timeout.
    assert submit.get("status") == 200, submit
    assert submit["headers"]["x-echo-body-sha256"] == sha256(body)  # type: ignore[index]


async def test_java_httpclient_with_an_expired_certificate_gets_the_reason(stack: Stack) -> None:
    oms = stack.folder / "oms.xml"
    oms.write_bytes(envelope(OMS_RETRIEVE))
    (refused,) = await java_client(
        stack, "expired", java_request(soap_url(stack, "oms", OMS_RETRIEVE), oms)
    )
    errors = refused.get("errors")
    assert errors, refused
    assert "javax.net.ssl.SSL" in " ".join(errors)  # type: ignore[arg-type]
    assert EXPIRED.search(" ".join(errors)), errors  # type: ignore[arg-type]


# --- node-soap -----------------------------------------------------------------------------


@pytest.fixture(scope="session")
def node_modules() -> Path:
    """npm's `soap` package, installed once into the virtualenv (gitignored) when missing."""
    node = require("node", package="nodejs")
    npm = require("npm", package="npm")
    prefix = Path(sys.prefix) / "node"
    installed = prefix / "node_modules" / "soap" / "package.json"
    wanted = NODE_SOAP.rpartition("@")[2]
    if not installed.exists() or json.loads(installed.read_text())["version"] != wanted:
        prefix.mkdir(parents=True, exist_ok=True)
        done = subprocess.run(
            [npm, "install", "--prefix", str(prefix), "--no-audit", "--no-fund", NODE_SOAP],
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        assert done.returncode == 0, f"npm install {NODE_SOAP} failed:\n{done.stderr[-2000:]}"
    assert shutil.which(node)
    return prefix / "node_modules"


async def node_soap(
    stack: Stack, node_modules: Path, user: str, calls: int
) -> list[dict[str, object]]:
    cert, key = pair(stack, user)
    options = {
        "wsdl": str(CLIENTS / "oms.wsdl"),
        "endpoint": soap_url(stack, "oms", OMS_RETRIEVE),
        "key": str(key),
        "cert": str(cert),
        "ca": str(stack.certs.ca),
        "calls": calls,
    }
    process = await asyncio.create_subprocess_exec(
        require("node", package="nodejs"),
        str(CLIENTS / "soap_client.js"),
        json.dumps(options),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "NODE_PATH": str(node_modules)},
    )
    out, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 0, err.decode()
    return [json.loads(line) for line in out.decode().splitlines()]


async def test_node_soap_reads_the_violation_fault_through_the_wsdl(
    stack: Stack, node_modules: Path
) -> None:
    allowed, violation = await node_soap(stack, node_modules, "jdoex1234", 2)
    assert allowed["ok"], allowed
    assert "MessagePayload" in json.dumps(allowed["result"])
    assert not violation["ok"]
    assert violation["status"] == 500
    assert violation["retryAfter"] == "2"
    fault = violation["fault"]
    assert isinstance(fault, dict), violation
    assert "retry your request again in 2 seconds" in fault["faultstring"]
    event_log = fault["detail"]["outputDataType"]["EventLog"]
    assert "retry your request again in 2 seconds" in event_log["Event"]["description"]
    assert event_log["collectionQuantity"] == "2"  # the retry seconds, in a schema element


async def test_node_soap_with_an_expired_certificate_gets_the_reason(
    stack: Stack, node_modules: Path
) -> None:
    (refused,) = await node_soap(stack, node_modules, "expired", 1)
    assert not refused["ok"]
    assert EXPIRED.search(f"{refused['message']} {refused['code']}"), refused


# --- JAX-WS (reference implementation 2.3, Debian's libjaxws-java) ---------------------------

JAXWS_JARS = (
    "jaxws-api",
    "jaxws-rt",
    "jws-api",
    "javax.xml.soap-api",
    "saaj-impl",
    "jaxb-api",
    "jaxb-runtime",
    "javax.activation",
    "stax-ex",
    "streambuffer",
    "mimepull",
    "istack-commons-runtime",
    "gmbal",
    "glassfish-management-api",
    "glassfish-pfl-basic",
    "glassfish-pfl-tf",
    "metro-policy",
    "FastInfoset",
)


def jaxws_classpath() -> str:
    jars = [Path("/usr/share/java") / f"{name}.jar" for name in JAXWS_JARS]
    missing = [str(jar) for jar in jars if not jar.exists()]
    if missing:
        pytest.fail(
            f"JAX-WS is not installed ({', '.join(missing)}): apt-get install libjaxws-java "
            "(`make test` installs it when run as root)"
        )
    return os.pathsep.join(str(jar) for jar in jars)


async def jaxws_client(stack: Stack, user: str, calls: int) -> list[str]:
    java = java_launcher()
    keystore = pkcs12_keystore(stack, user, b"changeit")
    request = stack.folder / "oms.xml"
    request.write_bytes(envelope(OMS_RETRIEVE))
    ran = await run(
        java,
        "-cp",
        jaxws_classpath(),
        str(CLIENTS / "JaxwsClient.java"),
        str(keystore),
        "changeit",
        str(stack.certs.ca),
        soap_url(stack, "oms", OMS_RETRIEVE),
        f"http://www.caiso.com/soa/{OMS_RETRIEVE}",
        str(request),
        str(calls),
        timeout=120,
    )
    assert ran.returncode == 0, ran.stderr[-3000:]
    return ran.stdout.splitlines()


async def test_jaxws_dispatch_reads_the_violation_fault(stack: Stack) -> None:
    lines = await jaxws_client(stack, "jdoex1234", 2)
    assert lines[0] == "OK ResourceOutageData", lines
    faults = dict(line.split(" ", 1) for line in lines[1:])
    assert "retry your request again in 2 seconds" in faults["FAULTSTRING"], lines
    assert "retry your request again in 2 seconds" in faults["DESCRIPTION"], lines
    assert faults["QUANTITY"] == "2", lines  # the retry seconds, in a schema element


async def test_jaxws_with_an_expired_certificate_is_refused_without_an_answer(
    stack: Stack,
) -> None:
    # HttpURLConnection (under JAX-WS) writes its request before it reads anything, and on TLS
    # 1.3 its handshake is over before the gateway has checked its certificate: the gateway
    # reads and drops those bytes after its alert (TlsSite lingers), so the write goes through
    # and the alert is read (SSLHandshakeException: certificate_expired), never "Error writing
    # to server". The call fails in transport: nothing was answered, nothing forwarded.
    lines = await jaxws_client(stack, "expired", 1)
    assert lines and all(line.startswith("EXCEPTION") for line in lines), lines
    errors = " ".join(lines)
    assert "WebServiceException" in errors or "ClientTransportException" in errors, lines
    assert EXPIRED.search(errors), lines
    assert not re.search(r"Broken pipe|Error writing|reset", errors), lines
