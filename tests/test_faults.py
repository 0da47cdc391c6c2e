"""Faults as the market's clients read them: every SOAP body parsed with a real XML parser and
checked field by field, the JSON shapes member by member, and the rate-limit headers."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import cast
from xml.etree.ElementTree import Element

import defusedxml.ElementTree as SafeET
import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.config.settings import Application, Protocol
from gateway.errors import ErrorCode
from gateway.limiter.base import Decision, Rate
from gateway.proxy.faults import (
    Fault,
    FaultStatuses,
    error_fault,
    policy_header,
    rate_limit_headers,
    render_message,
    retry_after_seconds,
    seconds_text,
    shape_for,
    unknown_message_fields,
    violation_fault,
    xml_text,
)
from gateway.proxy.faults import FaultChoice as SettingsShape

SOAP11 = "{http://schemas.xmlsoap.org/soap/envelope/}"
SOAP12 = "{http://www.w3.org/2003/05/soap-envelope}"
SO = "{http://www.caiso.com/soa/2006-06-13/StandardOutput.xsd}"
XML_LANG = "{http://www.w3.org/XML/1998/namespace}lang"

DRRS_TEMPLATE = (
    "CAISO DRRS Acceptable Use Policy Violation. Please retry your request again in {per} "
    "seconds from now. Note: Time resets each time you request before expiration."
)
DRRS_MESSAGE = (
    "CAISO DRRS Acceptable Use Policy Violation. Please retry your request again in 30 seconds "
    "from now. Note: Time resets each time you request before expiration."
)
DRRS_RATE = Rate(limit=1, per=30.0, reset_on_early_retry=True)
OMS_RATE = Rate(limit=1, per=5.0)
NOW = 1714564800.25  # 2024-05-01T12:00:00.250Z
# Store arithmetic leaves noise: 30 s must still say 30, not 31.
DRRS_REJECT = Decision(
    allowed=False, retry_after=30.000000001, remaining=0, reset_after=30.0, now=NOW
)
SERVICE = "RetrieveDRLocations_DRRSv2_AP"


def drrs_fault(shape: str, **overrides: object) -> Fault:
    args: dict[str, object] = dict(
        policy_name="drrs-per-service",
        message=DRRS_MESSAGE,
        rate=DRRS_RATE,
        decision=DRRS_REJECT,
        application="DRRS",
        service=SERVICE,
        request_id="req-7f3a",
    )
    args.update(overrides)
    return violation_fault(shape, **args)  # type: ignore[arg-type]


def parse(body: bytes) -> Element:
    root: Element = SafeET.fromstring(body)
    return root


def one(parent: Element, path: str) -> Element:
    found = parent.find(path)
    assert found is not None, f"{path} missing"
    return found


def event_of(detail: Element) -> Element:
    output = one(detail, f"{SO}outputDataType")
    return one(output, f"{SO}EventLog/{SO}Event")


# --- messages ----------------------------------------------------------------------------------


def test_render_message_drrs_text_exactly() -> None:
    text = render_message(DRRS_TEMPLATE, retry_after=12.3, service=SERVICE, per=30.0)
    assert text == DRRS_MESSAGE


@pytest.mark.parametrize(
    ("per", "expected"), [(30.0, "30"), (0.5, "0.5"), (5, "5"), (1.25, "1.25"), (29.9999999, "30")]
)
def test_per_rendered_exactly(per: float, expected: str) -> None:
    assert render_message("{per}", retry_after=1, service="s", per=per) == expected
    assert seconds_text(per) == expected


@pytest.mark.parametrize(
    ("retry_after", "expected"),
    [(29.2, "30"), (30.0, "30"), (30.000000001, "30"), (0.2, "1"), (0.0, "1"), (4.0001, "5")],
)
def test_retry_after_rounded_up_at_least_one(retry_after: float, expected: str) -> None:
    assert render_message("{retry_after}", retry_after=retry_after, service="s", per=5) == expected


def test_template_is_not_a_format_string() -> None:
    template = "{service.__class__} {0} {retry_after} {{per}} {unknown} in {service}"
    text = render_message(template, retry_after=4.5, service="Svc", per=5)
    assert text == "{service.__class__} {0} 5 {5} {unknown} in Svc"
    assert unknown_message_fields(template) == ["service.__class__", "0", "unknown"]
    assert unknown_message_fields(DRRS_TEMPLATE) == []


# --- headers -----------------------------------------------------------------------------------


def test_rate_limit_headers_on_rejection() -> None:
    headers = rate_limit_headers("oms-retrieve", OMS_RATE, Decision(False, 3.2, 0, 3.2, NOW))
    assert headers == {
        "RateLimit-Policy": '"oms-retrieve";q=1;w=5',
        "RateLimit": '"oms-retrieve";r=0;t=4',
        "Retry-After": "4",
    }


def test_rate_limit_headers_when_allowed_have_no_retry_after() -> None:
    headers = rate_limit_headers("crr", Rate(10, 60.0), Decision(True, 0.0, 7, 42.5, NOW))
    assert headers == {"RateLimit-Policy": '"crr";q=10;w=60', "RateLimit": '"crr";r=7;t=43'}


def test_reset_parameter_and_sub_second_window() -> None:
    assert policy_header("drrs", DRRS_RATE) == '"drrs";q=1;w=30;x-reset-on-early-retry'
    assert policy_header("fast", Rate(2, 0.5)) == '"fast";q=2;w=1'


@pytest.mark.parametrize("retry_after", [0.001, 0.5, 1.0, 1.0000001, 4.2, 29.99, 3600.4])
def test_retry_after_header_is_ceil_min_one(retry_after: float) -> None:
    headers = rate_limit_headers("p", OMS_RATE, Decision(False, retry_after, 0, retry_after, NOW))
    expected = max(1, math.ceil(retry_after - 1e-6))
    assert headers["Retry-After"] == str(expected)
    assert headers["RateLimit"] == f'"p";r=0;t={expected}'
    assert retry_after_seconds(retry_after) == expected


def test_policy_name_is_a_safe_structured_string() -> None:
    value = policy_header('we"ird\\name\r\nX-Injected: 1é', OMS_RATE)
    assert value == '"we\\"ird\\\\name??X-Injected: 1?";q=1;w=5'
    assert all(0x20 <= ord(c) <= 0x7E for c in value)


# --- SOAP 1.1 ----------------------------------------------------------------------------------


def test_soap11_violation_field_by_field() -> None:
    fault = drrs_fault("soap11")
    assert fault.status == 500
    assert fault.headers["Content-Type"] == "text/xml; charset=utf-8"
    assert fault.headers["Retry-After"] == "30"
    assert fault.headers["RateLimit-Policy"] == (
        '"drrs-per-service";q=1;w=30;x-reset-on-early-retry'
    )
    assert fault.headers["RateLimit"] == '"drrs-per-service";r=0;t=30'

    envelope = parse(fault.body)
    assert envelope.tag == f"{SOAP11}Envelope"
    soap_fault = one(envelope, f"{SOAP11}Body/{SOAP11}Fault")
    # SOAP 1.1 fault children are unqualified.
    assert one(soap_fault, "faultcode").text == "soapenv:Client"
    assert b'xmlns:soapenv="http://schemas.xmlsoap.org/soap/envelope/"' in fault.body
    assert one(soap_fault, "faultstring").text == DRRS_MESSAGE
    detail = one(soap_fault, "detail")
    event = event_of(detail)
    # The exact path typed clients read.
    description = one(detail, f"{SO}outputDataType/{SO}EventLog/{SO}Event/{SO}description")
    assert description.text == DRRS_MESSAGE
    # Only the schema's elements, in its order.
    log = one(detail, f"{SO}outputDataType/{SO}EventLog")
    assert [child.tag.removeprefix(SO) for child in log] == [
        "id",
        "creationTime",
        "collectionType",
        "collectionQuantity",
        "Event",
        "Service",
    ]
    assert one(log, f"{SO}id").text == "req-7f3a"
    assert one(log, f"{SO}creationTime").text == "2024-05-01T12:00:00.250Z"
    assert one(log, f"{SO}collectionType").text == "retryAfterSeconds"
    assert one(log, f"{SO}collectionQuantity").text == "30"
    assert [child.tag.removeprefix(SO) for child in event] == [
        "result",
        "id",
        "name",
        "description",
        "creationTime",
        "severity",
    ]
    assert one(event, f"{SO}result").text == "AUP-VIOLATION"
    assert one(event, f"{SO}id").text == "req-7f3a"
    assert one(event, f"{SO}name").text == "drrs-per-service"
    assert one(event, f"{SO}creationTime").text == "2024-05-01T12:00:00.250Z"
    assert one(event, f"{SO}severity").text == "ERROR"
    service = one(log, f"{SO}Service")
    assert [child.tag.removeprefix(SO) for child in service] == ["id", "name"]
    assert one(service, f"{SO}id").text == "DRRS"
    assert one(service, f"{SO}name").text == SERVICE


def test_soap11_status_override_keeps_client_fault() -> None:
    fault = drrs_fault("soap11", status=429)
    assert fault.status == 429
    assert one(parse(fault.body), f"{SOAP11}Body/{SOAP11}Fault/faultcode").text == "soapenv:Client"


@pytest.mark.parametrize(
    ("statuses", "forbidden", "timeout"), [("binding", 500, 500), ("http", 403, 504)]
)
def test_soap11_error_faults_client_and_server(
    statuses: FaultStatuses, forbidden: int, timeout: int
) -> None:
    refused = error_fault(
        "soap11",
        statuses=statuses,
        status=403,
        code=ErrorCode.NOT_PROVISIONED,
        message="Not provisioned for DRRS",
        application="DRRS",
        service=SERVICE,
        request_id="r1",
        now=NOW,
    )
    assert refused.status == forbidden
    assert "Retry-After" not in refused.headers
    body = parse(refused.body)
    assert one(body, f"{SOAP11}Body/{SOAP11}Fault/faultcode").text == "soapenv:Client"
    detail = one(body, f"{SOAP11}Body/{SOAP11}Fault/detail")
    event = event_of(detail)
    assert one(event, f"{SO}result").text == ErrorCode.NOT_PROVISIONED
    assert one(event, f"{SO}description").text == "Not provisioned for DRRS"
    assert event.find(f"{SO}name") is None  # no policy decided
    assert detail.find(f".//{SO}collectionQuantity") is None

    answer = error_fault(
        "soap11",
        statuses=statuses,
        status=504,
        code=ErrorCode.UPSTREAM_TIMEOUT,
        message="Upstream timed out",
        application="OMS",
        service="RetrieveX_OMSv1_AP",
        request_id="r2",
        now=NOW,
    )
    body = parse(answer.body)
    assert answer.status == timeout
    assert one(body, f"{SOAP11}Body/{SOAP11}Fault/faultcode").text == "soapenv:Server"


def test_soap_error_without_application_or_service() -> None:
    fault = error_fault(
        "soap11",
        status=404,
        code=ErrorCode.UNKNOWN_APPLICATION,
        message="No such app",
        application=None,
        service=None,
        request_id="r3",
        now=NOW,
    )
    detail = one(parse(fault.body), f"{SOAP11}Body/{SOAP11}Fault/detail")
    assert detail.find(f"{SO}outputDataType/{SO}EventLog/{SO}Service") is None
    only_service = error_fault(
        "soap11",
        status=404,
        code=ErrorCode.UNKNOWN_SERVICE,
        message="No such service",
        application=None,
        service="RetrieveX_OMSv1_AP",
        request_id="r4",
        now=NOW,
    )
    service = one(parse(only_service.body), f".//{SO}Service")
    assert [(child.tag.removeprefix(SO), child.text) for child in service] == [
        ("name", "RetrieveX_OMSv1_AP")
    ]


# --- SOAP 1.2 ----------------------------------------------------------------------------------


def test_soap12_violation_field_by_field() -> None:
    fault = drrs_fault("soap12")
    assert fault.status == 400
    assert fault.headers["Content-Type"] == "application/soap+xml; charset=utf-8"
    assert fault.headers["Retry-After"] == "30"
    envelope = parse(fault.body)
    assert envelope.tag == f"{SOAP12}Envelope"
    soap_fault = one(envelope, f"{SOAP12}Body/{SOAP12}Fault")
    assert one(soap_fault, f"{SOAP12}Code/{SOAP12}Value").text == "env:Sender"
    text = one(soap_fault, f"{SOAP12}Reason/{SOAP12}Text")
    assert text.text == DRRS_MESSAGE
    assert text.get(XML_LANG) == "en"
    event = event_of(one(soap_fault, f"{SOAP12}Detail"))
    assert one(event, f"{SO}description").text == DRRS_MESSAGE
    assert one(soap_fault, f".//{SO}EventLog/{SO}collectionQuantity").text == "30"


def test_soap12_receiver_for_5xx() -> None:
    fault = error_fault(
        "soap12",
        status=503,
        code=ErrorCode.STORE_UNAVAILABLE,
        message="Try later",
        application="OMS",
        service="S",
        request_id="r",
        retry_after=0.3,
        now=NOW,
    )
    assert fault.status == 500  # the SOAP 1.2 binding: env:Receiver is 500
    assert fault.headers["Retry-After"] == "1"
    soap_fault = one(parse(fault.body), f"{SOAP12}Body/{SOAP12}Fault")
    assert one(soap_fault, f"{SOAP12}Code/{SOAP12}Value").text == "env:Receiver"
    assert one(soap_fault, f".//{SO}EventLog/{SO}collectionQuantity").text == "1"


# --- JSON shapes -------------------------------------------------------------------------------


def test_problem_violation_members() -> None:
    fault = drrs_fault("problem")
    assert fault.status == 429
    assert fault.headers["Content-Type"] == "application/problem+json"
    assert fault.headers["Retry-After"] == "30"
    assert json.loads(fault.body) == {
        "type": "https://aup-gateway.example/problems/aup-violation",
        "title": "Acceptable Use Policy violation",
        "status": 429,
        "detail": DRRS_MESSAGE,
        "policy": "drrs-per-service",
        "service": SERVICE,
        "application": "DRRS",
        "retry_after": 30,
        "request_id": "req-7f3a",
    }


def test_problem_error_members() -> None:
    fault = error_fault(
        "problem",
        status=413,
        code=ErrorCode.BODY_TOO_LARGE,
        message="Body over 64 MiB",
        application="CRR",
        service="portfolioSubmission",
        request_id="r9",
    )
    assert fault.status == 413
    assert json.loads(fault.body) == {
        "type": "https://aup-gateway.example/problems/body-too-large",
        "title": "Request Entity Too Large",
        "status": 413,
        "detail": "Body over 64 MiB",
        "code": ErrorCode.BODY_TOO_LARGE,
        "application": "CRR",
        "service": "portfolioSubmission",
        "request_id": "r9",
    }
    unknown = error_fault(
        "problem",
        status=404,
        code=ErrorCode.UNKNOWN_APPLICATION,
        message="no",
        application=None,
        service=None,
        request_id="r",
    )
    assert "application" not in json.loads(unknown.body)


def test_errorlist_violation_and_error() -> None:
    fault = drrs_fault("errorlist")
    assert fault.status == 429
    assert fault.headers["Content-Type"].startswith("application/json")
    assert fault.headers["RateLimit"] == '"drrs-per-service";r=0;t=30'
    assert json.loads(fault.body) == {
        "errorList": [
            {"errorCode": "GEN0003", "errorDescription": DRRS_MESSAGE, "severity": "ERROR"}
        ]
    }
    error = error_fault(
        "errorlist",
        status=502,
        code="AUP-UPSTREAM-UNAVAILABLE",
        message='Upstream "CRR" refused',
        application="CRR",
        service=None,
        request_id="r",
    )
    assert error.status == 502
    assert json.loads(error.body)["errorList"][0]["errorDescription"] == 'Upstream "CRR" refused'


# --- hostile input -----------------------------------------------------------------------------

HOSTILE = [
    '<x>&"',
    "]]><!ENTITY x SYSTEM 'file:///etc/passwd'>",
    "a\x00b\x1fc\ud800d\uffffe",
    "line\r\nbreak\ttab",
    "{service}{per}</description>",
    "é中文🙂",
]


@pytest.mark.parametrize("service", HOSTILE)
@pytest.mark.parametrize("shape", ["soap11", "soap12"])
def test_hostile_service_name_is_well_formed(shape: str, service: str) -> None:
    fault = drrs_fault(shape, service=service, request_id=service, message=f"m {service}")
    root = parse(fault.body)  # raises on anything not well-formed
    ns = SOAP11 if shape == "soap11" else SOAP12
    names = [one(service, f"{SO}name").text or "" for service in root.iter(f"{SO}Service")]
    assert len(names) == 1
    expected = (
        xml_text(service)
        .replace("&amp;", "&")
        .replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&#13;", "\r")
    )
    assert names[0] == expected
    assert root.tag == f"{ns}Envelope"
    assert len(list(root.iter(f"{SO}Event"))) == 1


def test_hostile_markup_survives_exactly() -> None:
    fault = drrs_fault("soap11", service='<x>&"', message="<b>&amp;</b> ]]>")
    root = parse(fault.body)
    assert one(root, f".//{SO}Service/{SO}name").text == '<x>&"'
    assert one(root, f".//{SO}Event/{SO}description").text == "<b>&amp;</b> ]]>"
    assert one(root, ".//faultstring").text == "<b>&amp;</b> ]]>"


@pytest.mark.parametrize("service", HOSTILE)
@pytest.mark.parametrize("shape", ["problem", "errorlist"])
def test_hostile_values_in_json(shape: str, service: str) -> None:
    fault = drrs_fault(shape, service=service, message=service)
    document = json.loads(fault.body)
    if shape == "problem":
        assert document["service"] == service
        assert document["detail"] == service
    else:
        assert document["errorList"][0]["errorDescription"] == service


@given(st.text())
def test_any_text_gives_well_formed_soap(text: str) -> None:
    fault = drrs_fault("soap11", service=text, message=text, request_id=text)
    parse(fault.body)


# --- shape choice ------------------------------------------------------------------------------


def app(protocol: str, faults: str = "auto") -> Application:
    return Application(
        name="X",
        upstream="http://127.0.0.1:1",
        protocol=cast(Protocol, protocol),
        faults=cast(SettingsShape, faults),
    )


@pytest.mark.parametrize(
    ("protocol", "faults", "content_type", "expected"),
    [
        ("soap", "auto", "text/xml; charset=utf-8", "soap11"),
        ("soap", "auto", 'application/soap+xml; charset=utf-8; action="urn:x"', "soap12"),
        ("soap", "auto", "Application/SOAP+XML", "soap12"),
        ("soap", "auto", 'multipart/related; type="text/xml"; boundary=b', "soap11"),
        (
            "soap",
            "auto",
            'multipart/related; type="application/xop+xml"; start-info="application/soap+xml"',
            "soap12",
        ),
        ("soap", "auto", "", "soap11"),
        ("rest", "auto", "application/json", "problem"),
        ("rest", "auto", "application/soap+xml", "problem"),
        ("rest", "errorlist", "application/json", "errorlist"),
        ("soap", "problem", "text/xml", "problem"),
        ("soap", "soap12", "text/xml", "soap12"),
    ],
)
def test_shape_for(protocol: str, faults: str, content_type: str, expected: str) -> None:
    assert shape_for(app(protocol, faults), content_type) == expected


def test_shape_for_unknown_application() -> None:
    assert shape_for(None, "text/xml") == "soap11"
    assert shape_for(None, "application/soap+xml") == "soap12"
    assert shape_for(None, "application/json") == "problem"


def test_module_has_no_tree_building_imports() -> None:
    # The hot path formats templates; building XML trees per request is what this guards against.
    source = Path(__file__).parents[1].joinpath("gateway", "proxy", "faults.py").read_text()
    assert "ElementTree" not in source and "minidom" not in source


@pytest.mark.parametrize("statuses", ["binding", "http"])
@pytest.mark.parametrize("shape", ["soap11", "soap12", "problem", "errorlist"])
def test_cached_violation_faults_are_byte_for_byte_the_rendered_ones(
    shape: str, statuses: FaultStatuses
) -> None:
    from gateway.proxy.faults import ViolationFaults, render_message, violation_fault

    cache = ViolationFaults()
    rate = Rate(1, 30.0, reset_on_early_retry=True)
    template = "Retry in {retry_after} s; {service} once per {per} s."
    calls = (
        ("a&<1>", 1_790_000_000.25, 29.2),
        ("b-2", 1_790_000_003.5, 30.0),
        ("c-3", 1_790_000_004.999, 7.01),
    )
    for request_id, now, retry in calls:
        decision = Decision(False, retry, 0, retry, now)
        cached = cache.fault(
            shape,
            policy_name="drrs",
            message_template=template,
            rate=rate,
            decision=decision,
            application="DRRS",
            service="Svc<&>",
            request_id=request_id,
            statuses=statuses,
        )
        rendered = violation_fault(
            shape,
            policy_name="drrs",
            rate=rate,
            decision=decision,
            application="DRRS",
            service="Svc<&>",
            request_id=request_id,
            message=render_message(template, retry_after=retry, service="Svc<&>", per=30.0),
            statuses=statuses,
        )
        # the request id and the time each appear twice in a SOAP detail
        if shape.startswith("soap"):
            assert cached.body.count(xml_text(request_id).encode()) == 2
        assert (cached.status, cached.headers, cached.body) == (
            rendered.status,
            rendered.headers,
            rendered.body,
        )
