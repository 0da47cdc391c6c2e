"""Store URL -> the limiter behind it, wrapped for store outages: `limiter_from_url`.

One builder per URL scheme, in `_BUILDERS`. A new kind of store (Redis Cluster, Sentinel) is one
more builder that returns its primary limiter and a credential-free label; the scheme is already
accepted by settings.py, and `limiter_from_url` wraps whatever the builder returns in the same
ResilientLimiter, so the fallback, the breaker and the readiness view come for free.

Supported URLs:

    memory://
    redis://[[username]:password@]host[:port][/db][?option=value&...]
    rediss://...                  TLS to Redis; ssl_* options below

Options: `db`, `client_name`, `health_check_interval` (seconds), and for rediss:// only
`ssl_ca_certs`, `ssl_ca_path`, `ssl_certfile`, `ssl_keyfile`, `ssl_password`, `ssl_cert_reqs`
(none | optional | required), `ssl_check_hostname` (true | false), `ssl_ciphers`. Timeouts and
the pool size come from the store settings, not the URL, so one place sets them.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any
from urllib.parse import SplitResult, parse_qsl, unquote, urlsplit

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.connection import Connection, SSLConnection
from redis.maint_notifications import MaintNotificationsConfig

from gateway.errors import ConfigError
from gateway.limiter.base import Limiter
from gateway.limiter.fallback import ResilientLimiter
from gateway.limiter.memory import MemoryLimiter
from gateway.limiter.redis import RedisLimiter
from gateway.settings import StoreErrorMode, StoreSettings

Clock = Callable[[], float]
# A builder makes the primary limiter for one URL and names it without credentials (for logs).
Builder = Callable[[StoreSettings, SplitResult, Clock], tuple[Limiter, str]]

_BOOL = MappingProxyType({"true": True, "yes": True, "1": True,
                          "false": False, "no": False, "0": False})  # fmt: skip
_CERT_REQS = ("none", "optional", "required")
_OPTIONS = ("db", "client_name", "health_check_interval")
_TLS_OPTIONS = (
    "ssl_ca_certs",
    "ssl_ca_path",
    "ssl_certfile",
    "ssl_keyfile",
    "ssl_password",
    "ssl_cert_reqs",
    "ssl_check_hostname",
    "ssl_ciphers",
)


def limiter_from_url(
    store: StoreSettings,
    on_store_error: StoreErrorMode = "local",
    clock: Clock = time.time,
) -> ResilientLimiter:
    """The limiter for `store.url`, wrapped so that store outages follow `on_store_error`.

    Nothing is connected yet: call `start()` (never fails; warms the store up) and `close()`.
    Raises ConfigError for a URL it cannot use.
    """
    try:
        parts = urlsplit(store.url)
    except ValueError as exc:
        raise ConfigError([f"store: invalid URL {store.url!r}: {exc}"]) from exc
    builder = _BUILDERS.get(parts.scheme)
    if builder is None:
        known = ", ".join(f"{s}://" for s in _BUILDERS)
        raise ConfigError([f"store: unsupported URL scheme {parts.scheme!r} (use {known})"])
    primary, label = builder(store, parts, clock)
    fallback = primary if isinstance(primary, MemoryLimiter) else MemoryLimiter(clock)
    return ResilientLimiter(
        primary,
        mode=on_store_error,
        cooldown=store.breaker_cooldown,
        fallback=fallback,
        clock=clock,
        label=label,
    )


def _memory(store: StoreSettings, parts: SplitResult, clock: Clock) -> tuple[Limiter, str]:
    if parts.netloc or parts.path.strip("/") or parts.query:
        raise ConfigError([f"store: memory:// takes no host, path or options, got {store.url!r}"])
    return MemoryLimiter(clock), "memory://"


def _redis(store: StoreSettings, parts: SplitResult, clock: Clock) -> tuple[Limiter, str]:
    kwargs, label = redis_connection_kwargs(store, parts)
    pool = BlockingConnectionPool(
        max_connections=store.pool_size,
        # Waiting for a free connection is bounded like the rest of the call.
        timeout=store.timeout + store.connect_timeout,
        socket_timeout=store.timeout,
        socket_connect_timeout=store.connect_timeout,
        socket_keepalive=True,
        # RESP2 without CLIENT SETINFO or maintenance notifications: a new connection needs
        # no set-up round trips (HELLO, SETINFO, MAINT_NOTIFICATIONS), no notification can relax
        # the timeouts to seconds, and redis-py keeps its check that drops pooled connections
        # a dead server closed (it skips that check while notifications are on).
        protocol=2,
        driver_info=None,
        maint_notifications_config=MaintNotificationsConfig(enabled=False),
        # No retries: a failed call goes to the fallback at once instead of paying the timeout
        # again, and a script is never run twice for one call (the breaker does the retrying).
        retry=None,
        **kwargs,
    )
    limiter = RedisLimiter(
        Redis.from_pool(pool),
        deadline=store.timeout + store.connect_timeout,
        key_prefix=store.key_prefix,
    )
    return limiter, label


def redis_connection_kwargs(store: StoreSettings, parts: SplitResult) -> tuple[dict[str, Any], str]:
    """Connection arguments from a redis:// or rediss:// URL, and a label without credentials.

    Public: the ledger's Redis stream uses it, and so can the cluster and sentinel builders.
    """
    tls = parts.scheme.startswith("rediss")
    problems: list[str] = []
    try:
        port = parts.port or 6379
    except ValueError:
        problems.append(f"store: invalid port in {_redacted(parts)!r}")
        port = 6379
    host = parts.hostname or "127.0.0.1"
    kwargs: dict[str, Any] = {
        "host": host,
        "port": port,
        "connection_class": SSLConnection if tls else Connection,
    }
    if parts.username:
        kwargs["username"] = unquote(parts.username)
    if parts.password:
        kwargs["password"] = unquote(parts.password)

    db_text = parts.path.strip("/")
    allowed = _OPTIONS + (_TLS_OPTIONS if tls else ())
    for name, value in parse_qsl(parts.query, keep_blank_values=True):
        if name == "db":
            db_text = value
        elif name in allowed:
            kwargs[name] = _option(name, value, problems)
        elif name in _TLS_OPTIONS:
            problems.append(f"store: URL option {name!r} needs rediss:// (TLS)")
        else:
            problems.append(f"store: unknown URL option {name!r} (known: {', '.join(allowed)})")
    if db_text:
        if db_text.isdigit():
            kwargs["db"] = int(db_text)
        else:
            problems.append(f"store: database must be a number, got {db_text!r}")
    if problems:
        raise ConfigError(problems)
    return kwargs, f"{parts.scheme}://{host}:{port}/{kwargs.get('db', 0)}"


def _option(name: str, value: str, problems: list[str]) -> object:
    if name == "ssl_check_hostname":
        if value.lower() not in _BOOL:
            problems.append(f"store: {name} must be true or false, got {value!r}")
        return _BOOL.get(value.lower(), True)
    if name == "ssl_cert_reqs":
        if value not in _CERT_REQS:
            problems.append(f"store: {name} must be one of {', '.join(_CERT_REQS)}")
        return value
    if name == "health_check_interval":
        try:
            return float(value)
        except ValueError:
            problems.append(f"store: {name} must be a number of seconds, got {value!r}")
            return 0.0
    return value


def _not_yet(store: StoreSettings, parts: SplitResult, clock: Clock) -> tuple[Limiter, str]:
    # The decide script already touches one hash-tagged key per call, so a Cluster or Sentinel
    # builder only needs its client (redis.asyncio.RedisCluster / Sentinel.master_for) and a
    # RedisLimiter around it, with redis_connection_kwargs for the shared options.
    raise ConfigError(
        [f"store: {parts.scheme}:// is not supported yet (use redis:// or rediss://)"]
    )


def _redacted(parts: SplitResult) -> str:
    return f"{parts.scheme}://{parts.hostname or ''}{parts.path}"


_BUILDERS: Mapping[str, Builder] = MappingProxyType(
    {
        "memory": _memory,
        "redis": _redis,
        "rediss": _redis,
        "redis+cluster": _not_yet,
        "rediss+cluster": _not_yet,
        "redis+sentinel": _not_yet,
    }
)
