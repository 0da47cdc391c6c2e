"""Decisions and errors -> the fault response the caller's protocol expects (pure, no I/O).

Owns the four fault shapes (SOAP 1.1, SOAP 1.2, RFC 9457 problem+json, the CRR REST `errorList`),
the HTTP status each fault travels on (`status_for`), the rate-limit headers, and the rendering of
a policy's message template.

A SOAP fault's `detail` is the operator's StandardOutput (`gateway/proxy/StandardOutput.xsd`):
only that schema's elements, in its order, because typed clients refuse (zeep) or drop (JAXB)
anything else. Where each fact goes:

- `EventLog/id`, `Event/id`: the request id (also `X-Request-Id`);
- `EventLog/creationTime`, `Event/creationTime`: when the gateway decided;
- `EventLog/collectionType` = `retryAfterSeconds` and `EventLog/collectionQuantity` = the whole
  seconds to wait (the `Retry-After` number), only when there is a retry time;
- `Event/result`: the result code (`gateway.errors.ErrorCode`); `Event/name`: the policy name
  (violations only); `Event/description`: the message, which also says when to retry;
  `Event/severity`: `ERROR`;
- `Service/id`: the application, `Service/name`: the service (each only when known).

Bodies are rendered from templates fixed at import time: per request it is string formatting of
escaped values, never an XML tree; `ViolationFaults` goes further for the rejected hot path and
renders each distinct violation fault once.

Every value that reaches XML is escaped by `xml_text` (the service name comes from the URL and is
attacker-controlled); every value that reaches JSON goes through `json.dumps`; every value that
reaches a header is reduced to printable ASCII.
"""

from __future__ import annotations

import functools
import json
import math
import re
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from http import HTTPStatus
from typing import TYPE_CHECKING, Literal, get_args

from gateway.clock import wall_clock
from gateway.errors import ErrorCode

if TYPE_CHECKING:  # only for types: the settings read these shapes from here
    from gateway.config.settings import Application
    from gateway.limiter.base import Decision, Rate

FaultShape = Literal["soap11", "soap12", "problem", "errorlist"]
# An application's `faults:` setting: a shape, or auto (chosen per request by `shape_for`).
FaultChoice = Literal["auto", FaultShape]
FAULT_CHOICES: tuple[FaultChoice, ...] = get_args(FaultChoice)
# binding: the SOAP bindings' statuses (SOAP 1.1: every fault 500, WS-I BP R1126; SOAP 1.2:
# Sender 400, Receiver 500); http: the status that names the error (403, 404, 413, 429, 502, ...).
FaultStatuses = Literal["binding", "http"]
FAULT_STATUSES: tuple[FaultStatuses, ...] = get_args(FaultStatuses)

SOAP11_NS = "http://schemas.xmlsoap.org/soap/envelope/"
SOAP12_NS = "http://www.w3.org/2003/05/soap-envelope"
STANDARD_OUTPUT_NS = "http://www.caiso.com/soa/2006-06-13/StandardOutput.xsd"
PROBLEM_BASE = "https://aup-gateway.example/problems/"

SOAP11_CONTENT_TYPE = "text/xml; charset=utf-8"
SOAP12_CONTENT_TYPE = "application/soap+xml; charset=utf-8"
PROBLEM_CONTENT_TYPE = "application/problem+json"
ERRORLIST_CONTENT_TYPE = "application/json; charset=utf-8"

VIOLATION_TITLE = "Acceptable Use Policy violation"
# The operator's own REST code for "too many requests": CRR clients already handle it.
ERRORLIST_VIOLATION_CODE = "GEN0003"


MESSAGE_FIELDS = ("retry_after", "service", "per")

# Floats from the store carry noise (29.999999999 for 30): treat values this close to an integer
# as that integer, so the header, the text and the XML all say the same number.
_EPSILON = 1e-6

_XML_UNSAFE = re.compile("[&<>\r\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]")
_MESSAGE_FIELD = re.compile(r"\{(retry_after|service|per)\}")
_HEADER_UNSAFE = re.compile(r'[^\x20-\x7e]|["\\]')
_SLUG_UNSAFE = re.compile(r"[^a-z0-9]+")


@dataclass(frozen=True, slots=True)
class Fault:
    """A complete response: status, headers (Content-Type included) and body."""

    status: int
    headers: dict[str, str]
    body: bytes


# --- templates ---------------------------------------------------------------------------------
# Placeholders are str.format fields; every value substituted is already escaped for its context,
# and substituted values are never re-parsed, so braces inside them are harmless.

# The element order is the schema's (xs:sequence): EventLog's id, creationTime, collectionType,
# collectionQuantity, Event, Service; Event's result, id, name, description, creationTime, severity.
_EVENT_LOG = (
    '<outputDataType xmlns="' + STANDARD_OUTPUT_NS + '"><EventLog>'
    "<id>{request_id}</id><creationTime>{created}</creationTime>{collection}"
    "<Event><result>{code}</result><id>{request_id}</id>{event_name}"
    "<description>{message}</description><creationTime>{created}</creationTime>"
    "<severity>ERROR</severity></Event>{service}"
    "</EventLog></outputDataType>"
)

_SOAP11 = (
    '<?xml version="1.0" encoding="UTF-8"?>'
    '<soapenv:Envelope xmlns:soapenv="' + SOAP11_NS + '"><soapenv:Body><soapenv:Fault>'
    "<faultcode>soapenv:{fault_code}</faultcode><faultstring>{message}</faultstring>"
    "<detail>" + _EVENT_LOG + "</detail>"
    "</soapenv:Fault></soapenv:Body></soapenv:Envelope>"
)

_SOAP12 = (
    '<?xml version="1.0" encoding="UTF-8"?>'
    '<env:Envelope xmlns:env="' + SOAP12_NS + '"><env:Body><env:Fault>'
    "<env:Code><env:Value>env:{fault_code}</env:Value></env:Code>"
    '<env:Reason><env:Text xml:lang="en">{message}</env:Text></env:Reason>'
    "<env:Detail>" + _EVENT_LOG + "</env:Detail>"
    "</env:Fault></env:Body></env:Envelope>"
)

RETRY_COLLECTION_TYPE = "retryAfterSeconds"
_COLLECTION = (
    "<collectionType>" + RETRY_COLLECTION_TYPE + "</collectionType>"
    "<collectionQuantity>{}</collectionQuantity>"
)

# JSON fields below are substituted already encoded by json.dumps.
_PROBLEM_VIOLATION = (
    '{{"type":"' + PROBLEM_BASE + 'aup-violation","title":"' + VIOLATION_TITLE + '",'
    '"status":{status},"detail":{detail},"policy":{policy},"service":{service},'
    '"application":{application},"retry_after":{retry_after},"request_id":{request_id}}}'
)

_ERRORLIST = (
    '{{"errorList":[{{"errorCode":{code},"errorDescription":{message},"severity":"ERROR"}}]}}'
)


# --- escaping and numbers ----------------------------------------------------------------------


def _xml_sub(match: re.Match[str]) -> str:
    char = match.group()
    if char == "&":
        return "&amp;"
    if char == "<":
        return "&lt;"
    if char == ">":
        return "&gt;"
    if char == "\r":
        return "&#13;"  # a literal CR would be normalised away by the parser
    # Not allowed in XML 1.0 at all, not even as a character reference.
    return "\ufffd"


def xml_text(value: str) -> str:
    """`value` made safe as XML character data: markup escaped, forbidden characters replaced."""
    if _XML_UNSAFE.search(value) is None:
        return value
    return _XML_UNSAFE.sub(_xml_sub, value)


def _sf_string(value: str) -> str:
    """`value` as a Structured Field String (RFC 8941): quoted, printable ASCII only."""

    def sub(match: re.Match[str]) -> str:
        char = match.group()
        return "\\" + char if char in '"\\' else "?"

    return '"' + _HEADER_UNSAFE.sub(sub, value) + '"'


def retry_after_seconds(retry_after: float) -> int:
    """The whole seconds a client is told to wait: rounded up, at least 1.

    `Retry-After`, the message's `{retry_after}`, the XML `retryAfter` and the JSON
    `retry_after` all use this, so they always agree.
    """
    return max(1, math.ceil(retry_after - _EPSILON))


def seconds_text(seconds: float) -> str:
    """A duration for people: "30" for 30.0, "0.5" for 0.5, "1.25" for 1.25."""
    nearest = round(seconds)
    if abs(seconds - nearest) < _EPSILON:
        return str(int(nearest))
    return f"{seconds:.3f}".rstrip("0").rstrip(".")


def iso_time(epoch: float) -> str:
    """Epoch seconds as ISO 8601 UTC with milliseconds, e.g. 2024-05-01T12:00:00.250Z."""
    stamp = datetime.fromtimestamp(epoch, UTC).isoformat(timespec="milliseconds")
    return stamp.replace("+00:00", "Z")


# --- messages ----------------------------------------------------------------------------------


def render_message(template: str, *, retry_after: float, service: str, per: float) -> str:
    """Fill a policy's message template.

    Only `{retry_after}`, `{service}` and `{per}` are fields; any other brace text stays as
    written (the template is operator text, not a format string, so no attribute look-ups).
    `retry_after` is whole seconds rounded up, matching `Retry-After`; `per` is exact
    (30.0 -> "30", 0.5 -> "0.5"). The result is plain text: the fault escapes it.
    """
    values = {
        "retry_after": str(retry_after_seconds(retry_after)),
        "service": service,
        "per": seconds_text(per),
    }
    return _MESSAGE_FIELD.sub(lambda m: values[m.group(1)], template)


def unknown_message_fields(template: str) -> list[str]:
    """Brace fields in `template` that are not message fields (likely typos, for `check`)."""
    found = re.findall(r"\{([^{}]*)\}", template)
    return [name for name in found if name not in MESSAGE_FIELDS]


# --- headers -----------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1024)  # per policy and rate: on every allowed call, bounded
def policy_header(policy_name: str, rate: Rate) -> str:
    """The `RateLimit-Policy` value for one policy (draft-ietf-httpapi-ratelimit-headers).

    `w` is an Integer in the draft, so a sub-second window is advertised as 1.
    `x-reset-on-early-retry` is a vendor parameter (clients ignore parameters they do not know)
    telling clients that an early retry restarts the wait.
    """
    window = max(1, math.ceil(rate.per - _EPSILON))
    value = f"{_sf_string(policy_name)};q={rate.limit};w={window}"
    if rate.reset_on_early_retry:
        value += ";x-reset-on-early-retry"
    return value


@functools.lru_cache(maxsize=1024)
def _sf_name(policy_name: str) -> str:
    return _sf_string(policy_name)


def _rate_limit_value(name_sf: str, decision: Decision) -> str:
    # On a rejection `t` is the wait until a call is possible again, the same number as
    # Retry-After, so no header contradicts another; when allowed, when the window is free.
    if decision.allowed:
        reset = max(0, math.ceil(decision.reset_after - _EPSILON))
    else:
        reset = retry_after_seconds(decision.retry_after)
    remaining = 0 if not decision.allowed else max(0, decision.remaining)
    return f"{name_sf};r={remaining};t={reset}"


def rate_limit_headers(policy_name: str, rate: Rate, decision: Decision) -> dict[str, str]:
    """`RateLimit-Policy` and `RateLimit` for any decision, plus `Retry-After` on a rejection.

    e.g. `RateLimit-Policy: "oms-retrieve";q=1;w=5` and `RateLimit: "oms-retrieve";r=0;t=5`.
    """
    headers = {
        "RateLimit-Policy": policy_header(policy_name, rate),
        "RateLimit": _rate_limit_value(_sf_name(policy_name), decision),
    }
    if not decision.allowed:
        headers["Retry-After"] = str(retry_after_seconds(decision.retry_after))
    return headers


# --- shapes ------------------------------------------------------------------------------------


def shape_for(app: Application | None, content_type: str) -> FaultShape:
    """The fault shape for a request: the application's setting, else from the protocol.

    SOAP applications answer SOAP 1.2 to `application/soap+xml` requests (also inside a
    `multipart/related` package: SwA `type=` or MTOM `start-info=`), SOAP 1.1 otherwise; REST
    applications answer problem+json. With no application (unknown ones), the content type alone
    decides: SOAP for SOAP requests, problem+json for everything else.
    """
    if app is not None:
        if app.faults != "auto":
            return app.faults
        if app.protocol == "rest":
            return "problem"
    lowered = content_type.lower()
    media = lowered.partition(";")[0].strip()
    if media == "application/soap+xml":
        return "soap12"
    if media == "multipart/related" and "application/soap+xml" in lowered:
        return "soap12"
    if app is not None or media in ("text/xml", "multipart/related"):
        return "soap11"
    return "problem"


VIOLATION_STATUS = 429  # what a violation means in HTTP terms


def status_for(shape: FaultShape, intended: int, statuses: FaultStatuses = "binding") -> int:
    """The HTTP status a fault travels on: the one place that decides it.

    `intended` is the status that names the error in HTTP (404, 413, 429, 502, ...), which also
    decides Client/Sender (4xx) or Server/Receiver (5xx) in a SOAP fault. JSON shapes always use
    it. SOAP faults use it only with `fault_statuses: http`; with `binding` (the default):
    - soap11: 500 for every fault (WS-I BP R1126; JAX-WS, WCF and suds read a fault's body only
      on 500, and the operator's own client reads the description only on 500);
    - soap12: the SOAP 1.2 HTTP binding's table: env:Sender 400, env:Receiver 500.
    """
    if statuses == "http" or shape == "problem" or shape == "errorlist":
        return intended
    if shape == "soap11":
        return 500
    return 400 if intended < 500 else 500


def _element(name: str, value: str | None) -> str:
    return "" if not value else f"<{name}>{xml_text(value)}</{name}>"


def _soap(
    shape: FaultShape,
    *,
    sender: bool,
    code: str,
    message: str,
    request_id: str,
    created: float,
    retry_after: int | None,
    policy_name: str | None,
    service: str | None,
    application: str | None,
) -> bytes:
    if shape == "soap11":
        template, fault_code = _SOAP11, ("Client" if sender else "Server")
    else:
        template, fault_code = _SOAP12, ("Sender" if sender else "Receiver")
    service_parts = _element("id", application) + _element("name", service)
    text = template.format(
        fault_code=fault_code,
        code=xml_text(code),
        request_id=xml_text(request_id),
        message=xml_text(message),
        created=iso_time(created),
        collection="" if retry_after is None else _COLLECTION.format(retry_after),
        event_name=_element("name", policy_name),
        service=f"<Service>{service_parts}</Service>" if service_parts else "",
    )
    # errors="replace" is a last guard; xml_text already removed every unencodable character.
    return text.encode("utf-8", "replace")


def _content_type(shape: FaultShape) -> str:
    if shape == "soap11":
        return SOAP11_CONTENT_TYPE
    if shape == "soap12":
        return SOAP12_CONTENT_TYPE
    if shape == "problem":
        return PROBLEM_CONTENT_TYPE
    return ERRORLIST_CONTENT_TYPE


def _errorlist(code: str, message: str) -> bytes:
    return _ERRORLIST.format(code=json.dumps(code), message=json.dumps(message)).encode()


def violation_fault(
    shape: FaultShape,
    *,
    policy_name: str,
    message: str,
    rate: Rate,
    decision: Decision,
    application: str,
    service: str,
    request_id: str,
    status: int | None = None,
    statuses: FaultStatuses = "binding",
) -> Fault:
    """The fault for a rejected call, with `Retry-After`, `RateLimit-Policy` and `RateLimit`.

    The status is `status_for(shape, 429, statuses)`: with the bindings' statuses, 500 with
    `soapenv:Client` for SOAP 1.1, 400 with `env:Sender` for SOAP 1.2, 429 for JSON. `status`
    (the application's `fault_status`) overrides it. `message` is the rendered policy message.
    """
    final_status = status_for(shape, VIOLATION_STATUS, statuses) if status is None else status
    wait = retry_after_seconds(decision.retry_after)
    headers = rate_limit_headers(policy_name, rate, decision)
    headers["Content-Type"] = _content_type(shape)

    if shape == "soap11" or shape == "soap12":
        body = _soap(
            shape,
            sender=True,  # the caller's behaviour is at fault, whatever status is configured
            code=ErrorCode.VIOLATION,
            message=message,
            request_id=request_id,
            created=decision.now,
            retry_after=wait,
            policy_name=policy_name,
            service=service,
            application=application,
        )
    elif shape == "problem":
        body = _PROBLEM_VIOLATION.format(
            status=final_status,
            detail=json.dumps(message),
            policy=json.dumps(policy_name),
            service=json.dumps(service),
            application=json.dumps(application),
            retry_after=wait,
            request_id=json.dumps(request_id),
        ).encode()
    else:
        body = _errorlist(ERRORLIST_VIOLATION_CODE, message)
    return Fault(final_status, headers, body)


def _problem_slug(code: str) -> str:
    slug = _SLUG_UNSAFE.sub("-", code.lower()).strip("-")
    return slug.removeprefix("aup-") or "error"


def _title(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Error"


def error_fault(
    shape: FaultShape,
    *,
    status: int,
    code: str,
    message: str,
    application: str | None,
    service: str | None,
    request_id: str,
    retry_after: float | None = None,
    now: float | None = None,
    statuses: FaultStatuses = "binding",
) -> Fault:
    """The fault for a refused request that no policy decided (see the error codes above).

    `status` is the status that names the error; the response's is `status_for(shape, status,
    statuses)`. SOAP faults are Client/Sender when `status` is 4xx, Server/Receiver when 5xx.
    `retry_after` adds `Retry-After` and the detail's retry time (e.g. for 503); the message
    should say it too. `now` stamps the SOAP `creationTime` (defaults to the local clock: the
    timestamp is informational, not a decision).
    """
    headers = {"Content-Type": _content_type(shape)}
    wait = None if retry_after is None else retry_after_seconds(retry_after)
    if wait is not None:
        headers["Retry-After"] = str(wait)

    if shape == "soap11" or shape == "soap12":
        body = _soap(
            shape,
            sender=status < 500,
            code=code,
            message=message,
            request_id=request_id,
            created=wall_clock() if now is None else now,
            retry_after=wait,
            policy_name=None,
            service=service,
            application=application,
        )
    elif shape == "problem":
        problem: dict[str, object] = {
            "type": PROBLEM_BASE + _problem_slug(code),
            "title": _title(status),
            "status": status,
            "detail": message,
            "code": code,
        }
        if application is not None:
            problem["application"] = application
        if service is not None:
            problem["service"] = service
        if wait is not None:
            problem["retry_after"] = wait
        problem["request_id"] = request_id
        body = json.dumps(problem, separators=(",", ":")).encode()
    else:
        body = _errorlist(code, message)
    return Fault(status_for(shape, status, statuses), headers, body)


# --- the rejected path's cache -----------------------------------------------------------------

_ID_MARK = "\ue000request-id\ue000"  # private-use characters: no request id contains them
_EPOCH_TEXT = iso_time(0.0).encode()
_CACHE_SIZE = 10_000


# A cached body: the parts between request ids, each split at the creation times in it.
_Pieces = tuple[tuple[bytes, ...], ...]


class ViolationFaults:
    """Violation faults rendered once per (policy, application, service, shape, status, whole
    seconds to wait) and then only joined around the two values that change per call, the
    request id and the time (each appears twice in the detail): under abuse the same fault goes
    out thousands of times a second.

    The pieces come from `violation_fault` itself (rendered with a marker for the request id and
    the epoch for the time), so a cached fault is byte for byte the one it would render. JSON
    shapes are rendered per call (the rejected hot path is the operator's SOAP services).
    Service names are `[A-Za-z0-9_.-]` (routing), so no marker or epoch text comes from them.
    """

    def __init__(self, size: int = _CACHE_SIZE) -> None:
        self._size = size
        self._pieces: dict[tuple[object, ...], tuple[int, dict[str, str], _Pieces]] = {}

    def fault(
        self,
        shape: FaultShape,
        *,
        policy_name: str,
        message_template: str,
        rate: Rate,
        decision: Decision,
        application: str,
        service: str,
        request_id: str,
        status: int | None = None,
        statuses: FaultStatuses = "binding",
    ) -> Fault:
        wait = retry_after_seconds(decision.retry_after)
        if shape not in ("soap11", "soap12"):
            return self._render(
                shape,
                policy_name,
                message_template,
                rate,
                decision,
                application,
                service,
                request_id,
                status,
                statuses,
            )
        key = (
            shape,
            policy_name,
            message_template,
            rate,
            application,
            service,
            status,
            statuses,
            wait,
        )
        cached = self._pieces.get(key)
        if cached is None:
            fault = self._render(
                shape,
                policy_name,
                message_template,
                rate,
                replace(decision, allowed=False, retry_after=float(wait), remaining=0, now=0.0),
                application,
                service,
                _ID_MARK,
                status,
                statuses,
            )
            pieces = tuple(
                tuple(part.split(_EPOCH_TEXT)) for part in fault.body.split(_ID_MARK.encode())
            )
            cached = (fault.status, fault.headers, pieces)
            if len(self._pieces) < self._size:  # service names come from URLs: bounded
                self._pieces[key] = cached
        status_code, headers, pieces = cached
        created = iso_time(decision.now).encode()
        body = xml_text(request_id).encode().join(created.join(part) for part in pieces)
        return Fault(status_code, dict(headers), body)

    @staticmethod
    def _render(
        shape: FaultShape,
        policy_name: str,
        message_template: str,
        rate: Rate,
        decision: Decision,
        application: str,
        service: str,
        request_id: str,
        status: int | None,
        statuses: FaultStatuses,
    ) -> Fault:
        message = render_message(
            message_template, retry_after=decision.retry_after, service=service, per=rate.per
        )
        return violation_fault(
            shape,
            policy_name=policy_name,
            message=message,
            rate=rate,
            decision=decision,
            application=application,
            service=service,
            request_id=request_id,
            status=status,
            statuses=statuses,
        )
