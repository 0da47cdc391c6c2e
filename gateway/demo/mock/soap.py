"""The demo SOAP market services (OMS, DRRS, SIBR, CMRI) behind `/sst/<application>/<service>`.

Answers like the operator's B2B services: `Retrieve*` returns a payload document (DocAttach
variants return it as base64(gzip(XML)) in `ISOAttachment/AttachmentValue`), `Submit*` returns
the standard output with `Event/result` Success, anything else a SOAP fault whose detail is the
standard output with `Event/result` Failure. A SOAP 1.2 request (`application/soap+xml`, also as
the root part of a `multipart/related` package) is answered in a SOAP 1.2 envelope.

The request body is never parsed: it is hashed as it streams in (SOAP with attachments and MTOM
packages included), which is all the tests need to see what the gateway forwarded.
"""

from __future__ import annotations

import base64
import gzip
import re
import uuid
from datetime import UTC, datetime
from typing import Literal
from xml.sax.saxutils import escape

from aiohttp import web

from gateway.demo.mock.echo import BODY, add_mock_hooks

SoapVersion = Literal["1.1", "1.2"]

APPLICATIONS = ("OMS", "DRRS", "SIBR", "CMRI")
SOAP11_NS = "http://schemas.xmlsoap.org/soap/envelope/"
SOAP12_NS = "http://www.w3.org/2003/05/soap-envelope"
STANDARD_OUTPUT_NS = "http://www.caiso.com/soa/2006-06-13/StandardOutput.xsd"
ATTACHMENT_NS = "http://www.caiso.com/soa/2006-10-26/ISOAttachment.xsd"

_SERVICE = re.compile(
    r"^(?P<verb>Retrieve|Submit)(?P<thing>[A-Za-z0-9]+)"
    r"(?:_(?P<app>[A-Za-z]+)v(?P<version>\d+))?(?P<docattach>_DocAttach)?_AP$"
)
_NOT_XML = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]")

_ENVELOPE = {
    "1.1": (
        '<?xml version="1.0" encoding="UTF-8"?><soapenv:Envelope xmlns:soapenv="'
        + SOAP11_NS
        + '"><soapenv:Header/><soapenv:Body>{body}</soapenv:Body></soapenv:Envelope>'
    ),
    "1.2": (
        '<?xml version="1.0" encoding="UTF-8"?><env:Envelope xmlns:env="'
        + SOAP12_NS
        + '"><env:Header/><env:Body>{body}</env:Body></env:Envelope>'
    ),
}
_FAULT = {
    "1.1": (
        "<soapenv:Fault><faultcode>soapenv:{code}</faultcode><faultstring>{text}</faultstring>"
        "<detail>{detail}</detail></soapenv:Fault>"
    ),
    "1.2": (
        "<env:Fault><env:Code><env:Value>env:{code}</env:Value></env:Code><env:Reason>"
        '<env:Text xml:lang="en">{text}</env:Text></env:Reason><env:Detail>{detail}</env:Detail>'
        "</env:Fault>"
    ),
}
_CONTENT_TYPE = {"1.1": "text/xml; charset=utf-8", "1.2": "application/soap+xml; charset=utf-8"}

# A couple of demand response locations, as RetrieveDRLocations returns them.
_DR_LOCATIONS = (
    ("LOC_PGAE_0001", "PGAE", "PGFG", "Fresno Cold Storage", "PGAE-APND", "ACTIVE"),
    ("LOC_SCE_0002", "SCE", "SCEW", "Ontario Logistics Park", "SCEW-APND", "ACTIVE"),
)


def soap_version(content_type: str) -> SoapVersion:
    """SOAP 1.2 for `application/soap+xml`, also as a multipart package's root; else 1.1."""
    lowered = content_type.lower()
    media = lowered.partition(";")[0].strip()
    if media == "application/soap+xml":
        return "1.2"
    if media == "multipart/related" and "application/soap+xml" in lowered:
        return "1.2"
    return "1.1"


def _text(value: str) -> str:
    return escape(_NOT_XML.sub("\ufffd", value))


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def standard_output(
    *, result: str, code: str, description: str, service: str, application: str
) -> str:
    """The operator's standard output document (StandardOutput.xsd)."""
    return (
        f'<outputDataType xmlns="{STANDARD_OUTPUT_NS}"><EventLog><Event>'
        f"<result>{result}</result><code>{_text(code)}</code><id>{uuid.uuid4()}</id>"
        f"<description>{_text(description)}</description><creationTime>{_now()}</creationTime>"
        f"</Event><Service><name>{_text(service)}</name>"
        f"<application>{_text(application)}</application></Service></EventLog></outputDataType>"
    )


def _payload(thing: str, app: str, version: str, service: str) -> str:
    """A Retrieve service's document: header plus a few records (DR locations are specific)."""
    ns = f"http://www.caiso.com/soa/2016-01-01/{thing}_{app}v{version}.xsd"
    header = (
        f"<MessageHeader><TimeDate>{_now()}</TimeDate><Source>CAISO</Source>"
        f"<Version>v{version}</Version><Service>{_text(service)}</Service></MessageHeader>"
    )
    if thing == "DRLocations":
        records = "".join(
            f"<DRLocation><locationId>{loc}</locationId><utilityDistributionCompany>{udc}"
            f"</utilityDistributionCompany><subLap>{sublap}</subLap><locationName>{name}"
            f"</locationName><pnode>{pnode}</pnode><status>{state}</status>"
            f"<startDate>2024-01-01</startDate></DRLocation>"
            for loc, udc, sublap, name, pnode, state in _DR_LOCATIONS
        )
    else:
        records = "".join(
            f"<{thing}Record><id>{thing.upper()}-{n:04d}</id><tradeDate>2024-05-01</tradeDate>"
            f"<interval>{n}</interval><value>{100 + 12.5 * n:.2f}</value></{thing}Record>"
            for n in (1, 2)
        )
    return (
        f'<{thing}Data xmlns="{ns}">{header}<MessagePayload>{records}</MessagePayload>'
        f"</{thing}Data>"
    )


def _response(version: SoapVersion, body: str, status: int = 200) -> web.Response:
    return web.Response(
        status=status,
        body=_ENVELOPE[version].format(body=body).encode("utf-8", "replace"),
        headers={"Content-Type": _CONTENT_TYPE[version]},
    )


def soap_fault(
    version: SoapVersion, *, status: int, code: str, text: str, service: str, application: str
) -> web.Response:
    """A SOAP fault as the operator sends it: status 500 (1.1) or 400/500 (1.2)."""
    client = status < 500
    fault_code = (
        ("Client" if client else "Server")
        if version == "1.1"
        else ("Sender" if client else "Receiver")
    )
    http_status = 500 if version == "1.1" else (400 if client else 500)
    detail = standard_output(
        result="Failure", code=code, description=text, service=service, application=application
    )
    fault = _FAULT[version].format(code=fault_code, text=_text(text), detail=detail)
    return _response(version, fault, http_status)


def _service_from_action(request: web.Request) -> str:
    """The service named by SOAPAction (1.1) or the `action` media-type parameter (1.2)."""
    action = request.headers.get("SOAPAction", "").strip().strip('"')
    if not action:
        match = re.search(r'action="?([^";]+)', request.headers.get("Content-Type", ""))
        action = match.group(1) if match else ""
    return action.rstrip("/").rsplit("/", 1)[-1]


async def handle_service(request: web.Request) -> web.Response:
    version = soap_version(request.headers.get("Content-Type", ""))
    service = request.match_info.get("service") or _service_from_action(request)
    application = request.match_info.get("application", "")
    if application and application.upper() not in APPLICATIONS:
        return soap_fault(
            version,
            status=404,
            code="SVC0404",
            text=f"Unknown application {application}",
            service=service,
            application=application,
        )
    match = _SERVICE.match(service)
    app_name = application.upper() or ((match and match.group("app")) or "").upper()
    if match is None:
        return soap_fault(
            version,
            status=400,
            code="SVC0001",
            text=f"Unknown service {service}",
            service=service,
            application=app_name,
        )
    body = request[BODY]
    if match.group("verb") == "Submit":
        document = standard_output(
            result="Success",
            code="0",
            description=f"Received {body.length} bytes, sha256 {body.sha256}",
            service=service,
            application=app_name,
        )
        return _response(version, document)

    payload = _payload(match.group("thing"), app_name, match.group("version") or "1", service)
    if match.group("docattach"):
        packed = base64.b64encode(gzip.compress(payload.encode(), mtime=0)).decode()
        payload = (
            f'<ISOAttachment xmlns="{ATTACHMENT_NS}"><AttachmentValue>{packed}'
            f"</AttachmentValue></ISOAttachment>"
        )
    return _response(version, payload)


def create_soap_app() -> web.Application:
    """The SOAP services at POST /sst/{application}/{service}, /{service}, / (by SOAPAction)."""
    app = web.Application()
    add_mock_hooks(app)
    app.router.add_post("/sst/{application}/{service}", handle_service)
    app.router.add_post("/sst/{application}", handle_service)  # service from the SOAPAction
    app.router.add_post("/{service}", handle_service)
    app.router.add_post("/", handle_service)
    return app
