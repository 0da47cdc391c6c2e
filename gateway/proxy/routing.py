"""Request -> (application, service, upstream path), or the reason the request has no target.

SOAP services are addressed as `/sst/<application>/<service>` (the operator's convention; the
application is matched case-insensitively), with the SOAPAction as a fallback when the path
stops at the application, and the first element of the SOAP Body (`route_by_body`, read safely
from a bounded prefix) when neither names it. REST services are found by the application's
prefix and its route table ("GET /auction/v1.0/portfolio/{id}" -> service name), or by the
operations of its OpenAPI spec (config/openapi.py: exact templates, the operationId as service).

Requests that could escape a prefix or smuggle a different target are refused here, before
anything else looks at them: methods outside the seven the policies know (TRACE, CONNECT,
WebDAV verbs), absolute-form and asterisk-form targets, dot segments (also `..;` and encoded
ones), encoded slashes, backslashes and control characters, double encoding, percent-escapes that
are malformed or decode to invalid UTF-8 (overlong dots), empty segments and fragments. The
query is forwarded exactly as the client sent it (never decoded and re-sent).
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, replace
from urllib.parse import unquote_to_bytes

from gateway.config.openapi import ApiSpec, template_pattern
from gateway.config.settings import METHODS, Application, Settings
from gateway.errors import ErrorCode
from gateway.proxy.xmlsafe import BodySniffer, MalformedXml, UnsafeXml

# How much of a body may be read to find the service in it: room for a WS-Security header.
SNIFF_LIMIT = 64 * 1024
_SAFE_PATH = re.compile(r"^/[A-Za-z0-9._~!$&'()*+,;=:@%/-]*$")
# Printable ASCII but '#': llhttp already refuses spaces, controls and non-ASCII in a target.
_SAFE_QUERY = re.compile(r"^[\x21\x22\x24-\x7e]*$")
# Encoded '/', '\\', '.', controls and DEL, double encoding (%25xx), malformed escapes.
_BAD_ESCAPES = re.compile(
    r"%(2f|5c|2e|[01][0-9a-f]|7f|25[0-9a-f]{2})|%(?![0-9a-f]{2})", re.IGNORECASE
)
_SERVICE = re.compile(r"^[A-Za-z0-9_.-]{1,200}$")
_NO_SPECS: Mapping[str, ApiSpec] = {}

BodyReader = Callable[[int], Awaitable[bytes]]


@dataclass(frozen=True, slots=True)
class Target:
    application: Application
    service: str
    upstream_path: str  # raw path and query, as the upstream receives them
    from_body: bool = False  # the service is still to be read from the SOAP Body (route_by_body)


@dataclass(frozen=True, slots=True)
class NoRoute:
    status: int  # 400 malformed, 404 unknown application or service
    code: ErrorCode
    message: str
    application: Application | None = None


class Router:
    """Built once per Settings; `route()` is called once per request."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._rest: list[tuple[str, Application, tuple[tuple[str, re.Pattern[str], str], ...]]]
        self._rest = []
        for app in settings.applications.values():
            if app.protocol == "rest":
                table = tuple(
                    (r.method, template_pattern(r.template, exact=False), r.service)
                    for r in app.routes
                )
                self._rest.append((app.prefix, app, table))
        self._rest.sort(key=lambda entry: -len(entry[0]))  # longest prefix wins

    def route(
        self,
        method: str,
        raw_path: str,
        query: str,
        soap_action: str | None,
        content_type: str,
        specs: Mapping[str, ApiSpec] = _NO_SPECS,
    ) -> Target | NoRoute:
        """`raw_path` without the query, `query` as received (still percent-encoded); `specs`
        are the OpenAPI route tables of the running PolicySet (they reload with it)."""
        if method not in METHODS:
            return NoRoute(
                405, ErrorCode.BAD_METHOD, f"The method {method[:20]} is not accepted here."
            )
        problem = check_path(raw_path) or check_query(query)
        if problem:
            return NoRoute(400, ErrorCode.BAD_PATH, problem)
        suffix = f"?{query}" if query else ""
        if raw_path[:5].lower() == "/sst/":
            return self._soap(raw_path, suffix, soap_action, content_type)
        for prefix, app, table in self._rest:
            if raw_path == prefix or raw_path.startswith(prefix + "/"):
                rest = raw_path[len(prefix) :] or "/"
                if app.openapi is not None:
                    spec = specs.get(app.name)
                    table = spec.table if spec is not None else ()
                for route_method, pattern, service in table:
                    if route_method == method and pattern.match(rest):
                        return Target(app, service, rest + suffix)
                return NoRoute(
                    404,
                    ErrorCode.UNKNOWN_SERVICE,
                    f"No service of {app.name} answers {method} {rest}.",
                    app,
                )
        return NoRoute(404, ErrorCode.UNKNOWN_APPLICATION, "No application is served at this path.")

    def _soap(
        self, raw_path: str, suffix: str, soap_action: str | None, content_type: str
    ) -> Target | NoRoute:
        parts = raw_path.split("/")  # ['', 'sst', app, service?, ...]
        app = self._settings.application(parts[2]) if len(parts) > 2 else None
        if app is None or app.protocol != "soap":
            name = parts[2] if len(parts) > 2 else ""
            return NoRoute(
                404, ErrorCode.UNKNOWN_APPLICATION, f"Application {name!r} is not served here."
            )
        service = parts[3] if len(parts) > 3 else ""
        if not service:
            service = service_from_action(soap_action, content_type)
            if not service and len(parts) <= 4:
                return Target(app, "", raw_path + suffix, from_body=True)
        if not _SERVICE.match(service) or len(parts) > 4:
            return NoRoute(
                404,
                ErrorCode.UNKNOWN_SERVICE,
                "The service could not be determined from the path or SOAPAction.",
                app,
            )
        return Target(app, service, raw_path + suffix)


def check_path(raw_path: str) -> str | None:
    """Why a raw request path is refused, or None when it is safe to route and forward."""
    if not _SAFE_PATH.match(raw_path):
        return "The request path contains characters that are not allowed."
    if "//" in raw_path:
        return "The request path contains empty segments."
    if "%" in raw_path:
        if _BAD_ESCAPES.search(raw_path):
            return "The request path contains encoded separators, dots or control characters."
        try:
            unquote_to_bytes(raw_path).decode("utf-8")
        except UnicodeDecodeError:
            return "The request path does not decode to valid UTF-8."
    if "." in raw_path:
        # `..;x` is `..` to servlet containers: compare segments without their parameters.
        for segment in raw_path.split("/"):
            if segment.partition(";")[0] in (".", ".."):
                return "The request path contains dot segments."
    return None


def check_query(query: str) -> str | None:
    """Why a raw query is refused (a fragment or bytes no client should send), or None."""
    if query and not _SAFE_QUERY.match(query):
        return "The request query contains characters that are not allowed."
    return None


async def route_by_body(
    target: Target, content_type: str, read: BodyReader, limit: int = SNIFF_LIMIT
) -> tuple[Target | NoRoute, bytes]:
    """The service named by the first element of the SOAP Body, and the bytes read to find it.

    Reads at most `limit` bytes through `read(n)` (a StreamReader's read: up to n bytes, b"" at
    the end) and stops as soon as the element is seen; the caller forwards the returned prefix
    ahead of the rest of the body. A DTD or entity declaration is refused (400) unexpanded.
    """
    app = target.application
    media = content_type.partition(";")[0].strip().lower()
    if media not in ("text/xml", "application/soap+xml", "multipart/related"):
        return _no_service(app), b""
    chunks: list[bytes] = []
    seen = 0
    try:
        sniffer = BodySniffer(content_type)
        service: str | None = None
        while service is None and seen < limit:
            data = await read(limit - seen)
            if not data:
                service = sniffer.finish()
                break
            chunks.append(data)
            seen += len(data)
            service = sniffer.feed(data)
    except UnsafeXml:
        return NoRoute(
            400,
            ErrorCode.UNSAFE_XML,
            "The SOAP message declares a document type or "
            "entities; they are not allowed and were not processed.",
            app,
        ), b""
    except MalformedXml as exc:
        return NoRoute(
            400, ErrorCode.BAD_XML, f"The SOAP message is not well-formed: {exc}", app
        ), b""
    if not service or not _SERVICE.match(service):
        return _no_service(app), b""
    return replace(target, service=service, from_body=False), b"".join(chunks)


def _no_service(app: Application) -> NoRoute:
    return NoRoute(
        404,
        ErrorCode.UNKNOWN_SERVICE,
        "The service could not be determined from the path, "
        f"the SOAPAction or the first {SNIFF_LIMIT // 1024} KiB of the SOAP Body.",
        app,
    )


def service_from_action(soap_action: str | None, content_type: str) -> str:
    """SOAPAction (SOAP 1.1) or the content type's action parameter (SOAP 1.2) -> service name.

    Actions look like `http://www.caiso.com/soa/RetrieveDRLocations_DRRSv2_AP` or plain names.
    """
    action = soap_action
    if not action and "action=" in content_type:
        action = content_type.split("action=", 1)[1].split(";", 1)[0]
    if not action:
        return ""
    action = action.strip().strip('"').rstrip("/")
    return re.split(r"[/#:]", action)[-1]
