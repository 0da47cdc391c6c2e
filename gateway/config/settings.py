"""The gateway YAML -> frozen Settings, validated fully; every error names file, line and key.

Relative paths in the file are relative to the file's own folder. Two values hold secrets and
may be read from the environment instead of the file: the store URL (it may carry the Redis
password) and the admin token. Written as exactly `${NAME}`, the value is the environment
variable NAME (a Kubernetes Secret exposed with `env:`); an unset or empty variable is an
error at that line. Nothing else is expanded, so a `$` elsewhere is just a character.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, get_args
from urllib.parse import urlsplit

from gateway.config.yamlread import Fields, Problems, compose, parse_duration, parse_size
from gateway.edge.identity import IDENTITY_MODES, IdentityMode
from gateway.proxy.faults import FAULT_CHOICES, FAULT_STATUSES, FaultChoice, FaultStatuses

StoreErrorMode = Literal["local", "allow", "deny"]
STORE_ERROR_MODES: tuple[StoreErrorMode, ...] = get_args(StoreErrorMode)
Protocol = Literal["soap", "rest"]
PROTOCOLS: tuple[Protocol, ...] = get_args(Protocol)
# enforce: a policy rejects calls over its limit; shadow: it only records that it would have.
Mode = Literal["enforce", "shadow"]
MODES: tuple[Mode, ...] = get_args(Mode)
TlsVersion = Literal["1.2", "1.3"]
TLS_VERSIONS: tuple[TlsVersion, ...] = get_args(TlsVersion)
# The HTTP methods a route or a policy may name.
Method = Literal["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"]
METHODS: tuple[Method, ...] = get_args(Method)

STORE_SCHEMES = ("memory", "redis", "rediss", "redis+cluster", "rediss+cluster", "redis+sentinel")
_APP_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_-]*$")
# The gateway's own services live under this name (/aup/v1/status, /sst/aup/...: proxy/status.py),
# so no configured application may take it: a request for it could mean either.
RESERVED_APPLICATION = "aup"
# A Server header value: a product token, optionally "/version" (RFC 9110 section 10.2.4).
_SERVER_NAME = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]{1,64}(/[!#$%&'*+.^_`|~0-9A-Za-z-]{1,64})?$")
_ROUTE = re.compile(rf"^({'|'.join(METHODS)}) (/\S*)$")
_ENV_REFERENCE = re.compile(r"^\$\{([A-Za-z_][A-Za-z0-9_]*)\}$")


@dataclass(frozen=True, slots=True)
class Listen:
    host: str = "0.0.0.0"
    port: int = 8443


@dataclass(frozen=True, slots=True)
class TlsSettings:
    cert: Path
    key: Path
    client_ca: Path
    crl: Path | None = None
    min_version: TlsVersion = "1.2"
    ciphers: str | None = None
    reload_interval: float = 30.0


@dataclass(frozen=True, slots=True)
class StoreSettings:
    url: str = "memory://"
    timeout: float = 0.05
    connect_timeout: float = 0.25
    pool_size: int = 64
    breaker_cooldown: float = 1.0
    key_prefix: str = "aup"


@dataclass(frozen=True, slots=True)
class AdminSettings:
    host: str = "127.0.0.1"
    port: int = 9901
    token: str | None = None


@dataclass(frozen=True, slots=True)
class Limits:
    """Bounds on what one request or client may cost."""

    max_line_size: int = 8190
    max_header_size: int = 16384
    max_headers: int = 100
    max_body: int = 64 * 2**20
    read_timeout: float = 30.0
    idle_timeout: float = 75.0
    max_connections_per_identity: int = 64


@dataclass(frozen=True, slots=True)
class Route:
    method: str
    template: str
    service: str


@dataclass(frozen=True, slots=True)
class Application:
    name: str
    upstream: str
    protocol: Protocol
    prefix: str = ""
    routes: tuple[Route, ...] = ()
    openapi: Path | None = None  # the spec whose operations are the routes (docs/openapi.md)
    faults: FaultChoice = "auto"
    fault_status: int | None = None
    fault_statuses: FaultStatuses = "binding"
    max_body: int | None = None
    timeout: float = 60.0
    connect_timeout: float = 5.0
    pool_size: int = 100


@dataclass(frozen=True, slots=True)
class LedgerSettings:
    """The episode ledger (ledger.py): where, how long, how much per identity, how often."""

    path: Path | None = None
    retention: float = 400 * 86_400.0  # seconds an episode is kept after its last rejection
    max_per_identity: int = 10_000  # final episodes kept per identity within the retention
    flush_interval: float = 1.0  # seconds between writes; also what a SIGKILL can lose


@dataclass(frozen=True)
class Settings:
    source: Path
    tls: TlsSettings
    listen: Listen = field(default_factory=Listen)
    identity: IdentityMode = "subject"
    store: StoreSettings = field(default_factory=StoreSettings)
    on_store_error: StoreErrorMode = "local"
    admin: AdminSettings | None = field(default_factory=AdminSettings)
    policies: Path = Path("policies")
    mode: Mode = "enforce"
    access_log: bool = True
    ledger: LedgerSettings = field(default_factory=LedgerSettings)
    limits: Limits = field(default_factory=Limits)
    drain_timeout: float = 10.0
    server_name: str = "AUP-Gateway"  # the gateway's own Server header: no software, no version
    applications: dict[str, Application] = field(default_factory=dict)

    _by_lower: dict[str, Application] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        lower = {name.lower(): app for name, app in self.applications.items()}
        object.__setattr__(self, "_by_lower", lower)

    def application(self, name: str) -> Application | None:
        """Case-insensitive look-up: real URLs carry application names in lower case."""
        return self._by_lower.get(name.lower())


def load_settings(path: str | Path) -> Settings:
    """Read and validate the gateway YAML; raises ConfigError listing every problem."""
    source = Path(path)
    problems = Problems()
    root = compose(source, problems)
    problems.raise_if_any()
    if root is None:
        problems.add(str(source), None, "", "the file is empty")
        problems.raise_if_any()
    assert root is not None
    settings = _read_settings(Fields(root, str(source), problems), source)
    problems.raise_if_any()
    assert settings is not None
    return settings


def _port(value: int) -> str | None:
    return None if 0 <= value <= 65535 else f"must be a port number (0-65535), got {value}"


def _status(value: int) -> str | None:
    return None if 400 <= value <= 599 else f"must be an HTTP error status 400-599, got {value}"


def _server_name(value: str) -> str | None:
    if _SERVER_NAME.match(value):
        return None
    return f"must be a product token such as AUP-Gateway (letters, digits, -._~ ...), got {value!r}"


def _positive(value: int | float) -> str | None:
    return None if value > 0 else f"must be greater than zero, got {value}"


def _read_settings(top: Fields, source: Path) -> Settings | None:
    if not top.ok:
        return None
    base = source.parent

    def path_of(fields: Fields, key: str, required: bool = True) -> Path | None:
        if required and not fields.has(key):
            fields.error(key, "is required")
        text = fields.value(key, str, None)
        return None if text is None else (base / text)

    listen = Listen()
    if (sub := top.sub("listen")) is not None:
        listen = Listen(sub.value("host", str, "0.0.0.0"), sub.value("port", int, 8443, _port))
        sub.done()

    tls = None
    sub = top.sub("tls")
    if sub is None:
        top.error("tls", "is required (cert, key, client_ca)")
    else:
        tls = TlsSettings(
            cert=path_of(sub, "cert") or Path(),
            key=path_of(sub, "key") or Path(),
            client_ca=path_of(sub, "client_ca") or Path(),
            crl=path_of(sub, "crl", required=False),
            min_version=sub.choice("min_version", TLS_VERSIONS, "1.2"),
            ciphers=sub.value("ciphers", str, None),
            reload_interval=sub.converted("reload_interval", parse_duration, 30.0),
        )
        sub.done()

    store = _read_store(top)
    admin: AdminSettings | None = AdminSettings()
    if top.has("admin") and top.raw("admin") is not None and top.sub("admin") is None:
        admin = None  # `admin: null` turns the listener off
    elif (sub := top.sub("admin")) is not None:
        admin = AdminSettings(
            sub.value("host", str, "127.0.0.1"),
            sub.value("port", int, 9901, _port),
            _from_environment(sub, "token", sub.value("token", str, None)),
        )
        sub.done()

    ledger = LedgerSettings()
    if (sub := top.sub("ledger")) is not None:
        d_ledger = LedgerSettings()
        ledger = LedgerSettings(
            path_of(sub, "path", required=False),
            sub.converted("retention", parse_duration, d_ledger.retention),
            sub.value("max_per_identity", int, d_ledger.max_per_identity, _positive),
            sub.converted("flush_interval", parse_duration, d_ledger.flush_interval),
        )
        sub.done()

    limits = Limits()
    if (sub := top.sub("limits")) is not None:
        d = Limits()
        limits = Limits(
            max_line_size=sub.converted("max_line_size", parse_size, d.max_line_size),
            max_header_size=sub.converted("max_header_size", parse_size, d.max_header_size),
            max_headers=sub.value("max_headers", int, d.max_headers, _positive),
            max_body=sub.converted("max_body", parse_size, d.max_body),
            read_timeout=sub.converted("read_timeout", parse_duration, d.read_timeout),
            idle_timeout=sub.converted("idle_timeout", parse_duration, d.idle_timeout),
            max_connections_per_identity=sub.value(
                "max_connections_per_identity", int, d.max_connections_per_identity, _positive
            ),
        )
        sub.done()

    applications: dict[str, Application] = {}
    apps = top.sub("applications")
    if apps is None:
        top.error("applications", "is required: at least one application")
    else:
        for name in apps.names():
            node = apps.raw(name)
            if not _APP_NAME.match(name):
                apps.error(name, "application names are letters, digits, '-' and '_'")
            if name.lower() == RESERVED_APPLICATION:
                apps.error(
                    name,
                    f"{name!r} is reserved for the gateway's own status service "
                    "(/aup/v1/status, /sst/aup/RetrieveAUPStatus_AUPv1_AP); choose another name",
                )
            if any(name.lower() == other.lower() for other in applications):
                apps.error(name, "duplicate application (names are case-insensitive)")
            assert node is not None
            app = _read_application(
                Fields(node, apps.file, apps.problems, f"applications.{name}"), name, base
            )
            if app is not None:
                applications[name] = app
        apps.done()

    settings = Settings(
        source=source,
        tls=tls or TlsSettings(Path(), Path(), Path()),
        listen=listen,
        identity=top.choice("identity", IDENTITY_MODES, "subject"),
        store=store,
        on_store_error=top.choice("on_store_error", STORE_ERROR_MODES, "local"),
        admin=admin,
        policies=base / top.value("policies", str, "policies"),
        mode=top.choice("mode", MODES, "enforce"),
        access_log=top.value("access_log", bool, True),
        ledger=ledger,
        limits=limits,
        drain_timeout=top.converted("drain_timeout", parse_duration, 10.0),
        server_name=top.value("server_name", str, "AUP-Gateway", _server_name),
        applications=applications,
    )
    top.done()
    return settings


def _read_store(top: Fields) -> StoreSettings:
    node = top.raw("store")
    if node is None:
        return StoreSettings()
    d = StoreSettings()
    if getattr(node, "tag", "").endswith(":str"):
        url = _from_environment(top, "store", top.value("store", str))
        store = StoreSettings(url=url or "")
        fields = None
    else:
        fields = top.sub("store")
        if fields is None:
            return d
        url = _from_environment(fields, "url", fields.value("url", str))
        store = StoreSettings(
            url=url or "",
            timeout=fields.converted("timeout", parse_duration, d.timeout),
            connect_timeout=fields.converted("connect_timeout", parse_duration, d.connect_timeout),
            pool_size=fields.value("pool_size", int, d.pool_size, _positive),
            breaker_cooldown=fields.converted(
                "breaker_cooldown", parse_duration, d.breaker_cooldown
            ),
            key_prefix=fields.value("key_prefix", str, d.key_prefix),
        )
        fields.done()
    if url is None:  # an unset environment variable, already reported
        return store
    scheme = urlsplit(store.url or "").scheme
    if scheme not in STORE_SCHEMES:
        where = fields.error if fields else top.error
        where(
            "url" if fields else "store",
            f"unsupported store URL {store.url!r} "
            f"(use {', '.join(s + '://' for s in STORE_SCHEMES)})",
        )
    return store


def _from_environment(fields: Fields, key: str, text: str | None) -> str | None:
    """`${NAME}` -> the environment variable NAME; None (and an error at the key's line) when
    it is unset or empty. Any other text is returned as it is."""
    match = _ENV_REFERENCE.match(text or "")
    if match is None:
        return text
    value = os.environ.get(match.group(1), "")
    if not value:
        fields.error(key, f"environment variable {match.group(1)} is not set (or is empty)")
        return None
    return value


def _read_application(f: Fields, name: str, base: Path) -> Application | None:
    if not f.ok:
        return None
    upstream = f.value("upstream", str, "")
    parts = urlsplit(upstream)
    if upstream and (parts.scheme not in ("http", "https") or not parts.hostname):
        f.error("upstream", f"must be an http:// or https:// URL, got {upstream!r}")
    protocol = f.choice("protocol", PROTOCOLS, "soap")
    prefix = f.value("prefix", str, "")
    if prefix and (not prefix.startswith("/") or prefix.endswith("/")):
        f.error("prefix", f"must start with '/' and not end with one, got {prefix!r}")
    if protocol == "rest" and not prefix:
        f.error("prefix", "is required for a rest application")
    routes: list[Route] = []
    route_fields = f.sub("routes")
    if route_fields is not None:
        for spec in route_fields.names():
            service = route_fields.value(spec, str, "")
            match = _ROUTE.match(spec)
            if not match:
                route_fields.error(
                    spec, "a route is 'METHOD /path/{param}', e.g. 'GET /auction/v1.0/portfolio'"
                )
                continue
            routes.append(Route(match.group(1), match.group(2), service))
        route_fields.done()
    if protocol == "soap" and routes:
        f.error("routes", "only rest applications have routes")
    openapi = _read_openapi(f, protocol, base)
    app = Application(
        name=name,
        upstream=upstream.rstrip("/"),
        protocol=protocol,
        prefix=prefix,
        routes=tuple(routes),
        openapi=openapi,
        faults=f.choice("faults", FAULT_CHOICES, "auto"),
        fault_status=f.value("fault_status", int, None, _status),
        fault_statuses=f.choice("fault_statuses", FAULT_STATUSES, "binding"),
        max_body=f.converted("max_body", parse_size, None),
        timeout=f.converted("timeout", parse_duration, 60.0),
        connect_timeout=f.converted("connect_timeout", parse_duration, 5.0),
        pool_size=f.value("pool_size", int, 100, _positive),
    )
    f.done()
    return app


def _read_openapi(f: Fields, protocol: str, base: Path) -> Path | None:
    """`openapi: <file>` (relative to this file): the spec is read with the policies
    (config/openapi.py), so that a reload picks up its changes; here only where it is."""
    text = f.value("openapi", str, None)
    if text is None:
        return None
    if protocol != "rest":
        f.error("openapi", "only rest applications have an OpenAPI spec")
    if f.has("routes"):
        f.error("openapi", "give routes or openapi, not both: the spec's operations are the routes")
    path = base / text
    if not path.is_file():
        f.error("openapi", f"{path} is not a file")
    return path
