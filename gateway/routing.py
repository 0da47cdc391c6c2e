"""Request -> (application, service, upstream path), or the reason the request has no target.

SOAP services are addressed as `/sst/<application>/<service>` (the operator's convention; the
application is matched case-insensitively), with the SOAPAction as a fallback when the path
stops at the application. REST services are found by the application's prefix and its route
table ("GET /auction/v1.0/portfolio/{id}" -> service name). Paths that could escape a prefix or
smuggle a different target (dot segments, encoded slashes, empty segments) are refused here,
before anything else looks at them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from gateway.settings import Application, Route, Settings

_SAFE_PATH = re.compile(r"^/[A-Za-z0-9._~!$&'()*+,;=:@%/-]*$")
_BAD_ESCAPES = re.compile(r"%(2f|5c|2e|00)", re.IGNORECASE)
_SERVICE = re.compile(r"^[A-Za-z0-9_.-]{1,200}$")
_PARAM = re.compile(r"\{[^/{}]+\}")


@dataclass(frozen=True, slots=True)
class Target:
    application: Application
    service: str
    upstream_path: str  # raw path and query, as the upstream receives them


@dataclass(frozen=True, slots=True)
class NoRoute:
    status: int  # 400 malformed, 404 unknown application or service
    code: str
    message: str
    application: Application | None = None


class Router:
    """Built once per Settings; `route()` is called once per request."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._rest: list[tuple[str, Application, list[tuple[str, re.Pattern[str], str]]]] = []
        for app in settings.applications.values():
            if app.protocol == "rest":
                table = [(r.method, _template_regex(r), r.service) for r in app.routes]
                self._rest.append((app.prefix, app, table))
        self._rest.sort(key=lambda entry: -len(entry[0]))  # longest prefix wins

    def route(self, method: str, raw_path: str, query: str, soap_action: str | None,
              content_type: str) -> Target | NoRoute:
        problem = check_path(raw_path)
        if problem:
            return NoRoute(400, "BAD-PATH", problem)
        suffix = f"?{query}" if query else ""
        if raw_path[:5].lower() == "/sst/":
            return self._soap(raw_path, suffix, soap_action, content_type)
        for prefix, app, table in self._rest:
            if raw_path == prefix or raw_path.startswith(prefix + "/"):
                rest = raw_path[len(prefix):] or "/"
                for route_method, pattern, service in table:
                    if route_method == method and pattern.match(rest):
                        return Target(app, service, rest + suffix)
                return NoRoute(404, "UNKNOWN-SERVICE",
                               f"No service of {app.name} answers {method} {rest}.", app)
        return NoRoute(404, "UNKNOWN-APPLICATION", "No application is served at this path.")

    def _soap(self, raw_path: str, suffix: str, soap_action: str | None,
              content_type: str) -> Target | NoRoute:
        parts = raw_path.split("/")  # ['', 'sst', app, service?, ...]
        app = self._settings.application(parts[2]) if len(parts) > 2 else None
        if app is None or app.protocol != "soap":
            return NoRoute(404, "UNKNOWN-APPLICATION",
                           f"Application {parts[2] if len(parts) > 2 else ''!r} is not served here.")
        service = parts[3] if len(parts) > 3 else ""
        if not service:
            service = service_from_action(soap_action, content_type)
        if not _SERVICE.match(service) or len(parts) > 4:
            return NoRoute(404, "UNKNOWN-SERVICE",
                           "The service could not be determined from the path or SOAPAction.", app)
        return Target(app, service, raw_path + suffix)


def check_path(raw_path: str) -> str | None:
    """Why a raw request path is refused, or None when it is safe to route and forward."""
    if not _SAFE_PATH.match(raw_path):
        return "The request path contains characters that are not allowed."
    if "//" in raw_path or _BAD_ESCAPES.search(raw_path):
        return "The request path contains empty segments or encoded separators."
    segments = raw_path.split("/")
    if "." in segments or ".." in segments:
        return "The request path contains dot segments."
    return None


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


def _template_regex(route: Route) -> re.Pattern[str]:
    pattern = ""
    last = 0
    for m in _PARAM.finditer(route.template):
        pattern += re.escape(route.template[last:m.start()]) + r"[^/]+"
        last = m.end()
    pattern += re.escape(route.template[last:])
    return re.compile(f"^{pattern}/?$")
