"""Store URL -> the limiter behind it, wrapped for store outages: `limiter_from_url`.

One builder per URL scheme, in `_BUILDERS`. Each returns its primary limiter and a
credential-free label; `limiter_from_url` wraps whatever the builder returns in the same
ResilientLimiter, so the fallback, the breaker and the readiness view are the same for every store.

Supported URLs:

    memory://
    redis://[[username]:password@]host[:port][/db][?option=value&...]
    rediss://...                  TLS to Redis; ssl_* options below
    redis+cluster://[[username]:password@]host:port,host:port,...[/][?option=value&...]
    rediss+cluster://...          the same over TLS
    redis+sentinel://[[username]:password@]host:port,host:port,.../service_name[/db][?...]

Options: `db`, `client_name`, `health_check_interval` (seconds), and for TLS only
`ssl_ca_certs`, `ssl_ca_path`, `ssl_certfile`, `ssl_keyfile`, `ssl_password`, `ssl_cert_reqs`
(none | optional | required), `ssl_check_hostname` (true | false), `ssl_ciphers` (the cluster
client takes neither `ssl_ca_path` nor `ssl_password`). Sentinel URLs also take
`sentinel_username` and `sentinel_password`, for sentinels that require their own AUTH; the
user and password before the `@` are the data nodes'. Timeouts and the pool size come from the
store settings, not the URL, so one place sets them.

Cluster: the URL lists startup nodes (any few masters or replicas; the client learns the rest
from CLUSTER SLOTS and follows MOVED and failovers). Each decision is one EVALSHA routed by its
key's hash slot, so the script runs unchanged on whichever master owns the (identity, service).
Redis Cluster has database 0 only. Sentinel: the URL lists sentinels (port 26379 by default) and
the path names the monitored master; a connection asks the sentinels for the current master each
time it connects, so after a failover the next connection goes to the promoted replica.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any
from urllib.parse import SplitResult, parse_qsl, unquote, urlencode, urlsplit

from redis.asyncio import BlockingConnectionPool, Redis, RedisCluster
from redis.asyncio.cluster import ClusterNode
from redis.asyncio.connection import Connection, SSLConnection
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import NoBackoff
from redis.exceptions import RedisError
from redis.maint_notifications import MaintNotificationsConfig

from gateway.clock import Clock, wall_clock
from gateway.config.settings import StoreErrorMode, StoreSettings
from gateway.errors import ConfigError
from gateway.limiter.base import Limiter
from gateway.limiter.fallback import ResilientLimiter
from gateway.limiter.memory import MemoryLimiter
from gateway.limiter.redis import Pipeline, RedisLimiter, Target

# A builder makes the primary limiter for one URL and names it without credentials (for logs).
Builder = Callable[[StoreSettings, SplitResult, Clock], tuple[Limiter, str]]

_BOOL = MappingProxyType({"true": True, "yes": True, "1": True,
                          "false": False, "no": False, "0": False})  # fmt: skip
_CERT_REQS = ("none", "optional", "required")
_OPTIONS = ("db", "client_name", "health_check_interval")
_SENTINEL_OPTIONS = ("sentinel_username", "sentinel_password")
# The cluster client takes a fixed set of TLS arguments; these two it has no parameter for.
_NOT_FOR_CLUSTER = ("ssl_ca_path", "ssl_password")
# Connections a cluster node may open beyond pool_size: the topology refresh (CLUSTER SLOTS) and
# a NOSCRIPT reload borrow one while `pool_size` decisions hold theirs.
_SPARE_CONNECTIONS = 4
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
    clock: Clock = wall_clock,
) -> ResilientLimiter:
    """The limiter for `store.url`, wrapped so that store outages follow `on_store_error`.

    Nothing is connected yet: call `start()` (never fails; warms the store up) and `close()`.
    Raises ConfigError for a URL it cannot use.
    """
    primary, label = _primary(store, clock)
    fallback = primary if isinstance(primary, MemoryLimiter) else MemoryLimiter(clock)
    return ResilientLimiter(
        primary,
        mode=on_store_error,
        cooldown=store.breaker_cooldown,
        fallback=fallback,
        clock=clock,
        label=label,
        # A call that finds a probe in flight waits for it at most as long as the probe can take.
        probe_wait=store.timeout + store.connect_timeout,
    )


@dataclass(frozen=True, slots=True)
class StoreClient:
    """A Redis client on the store's URL for another writer to the same store (the ledger's
    streams), with the name to log it by and what closes it."""

    client: Redis | RedisCluster
    label: str
    close: Callable[[], Awaitable[None]]


def redis_client_from_url(store: StoreSettings) -> StoreClient:
    """A client for `store.url`, read exactly as the limiter reads it (one parser for every
    scheme, Sentinel and Cluster included), with a pool of its own sized by `store`.

    Raises ConfigError for a URL it cannot use, or one that names no Redis (memory://).
    """
    primary, label = _primary(store, wall_clock)
    if not isinstance(primary, RedisLimiter):
        raise ConfigError([f"store: {label} has no Redis client"])
    return StoreClient(primary.client, label, primary.close)


def _primary(store: StoreSettings, clock: Clock) -> tuple[Limiter, str]:
    try:
        parts = urlsplit(store.url)
    except ValueError as exc:
        raise ConfigError([f"store: invalid URL {store.url!r}: {exc}"]) from exc
    builder = _BUILDERS.get(parts.scheme)
    if builder is None:
        known = ", ".join(f"{s}://" for s in _BUILDERS)
        raise ConfigError([f"store: unsupported URL scheme {parts.scheme!r} (use {known})"])
    return builder(store, parts, clock)


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
        pipeline=Pipeline(_target(store, kwargs)),
    )
    return limiter, label


def _target(store: StoreSettings, kwargs: dict[str, Any]) -> Target:
    """The decisions' pipelined connection: the same server, credentials, database, name and TLS
    as the redis-py pool's connections (the TLS context is the one redis-py would build)."""
    ssl_context = None
    if kwargs["connection_class"] is SSLConnection:
        ssl_context = SSLConnection(**{k: v for k, v in kwargs.items() if k != "connection_class"}
                                    ).ssl_context.get()  # fmt: skip
    return Target(
        host=kwargs["host"],
        port=kwargs["port"],
        timeout=store.timeout,
        connect_timeout=store.connect_timeout,
        ssl_context=ssl_context,
        username=kwargs.get("username"),
        password=kwargs.get("password"),
        db=kwargs.get("db", 0),
        client_name=kwargs.get("client_name"),
    )


def redis_connection_kwargs(store: StoreSettings, parts: SplitResult) -> tuple[dict[str, Any], str]:
    """Connection arguments from a redis:// or rediss:// URL, and a label without credentials.

    Public: the ledger's Redis stream uses it; the cluster and sentinel builders read their
    options through it too.
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


def _cluster(store: StoreSettings, parts: SplitResult, clock: Clock) -> tuple[Limiter, str]:
    problems: list[str] = []
    nodes, single = _node_list(parts, 6379, problems)
    if parts.path.strip("/"):
        problems.append(
            f"store: {parts.scheme}:// takes no database in the path (Redis Cluster has db 0 only)"
        )
    kwargs = _data_node_kwargs(store, single, problems)
    if kwargs.pop("db", 0):
        problems.append(f"store: {parts.scheme}:// has database 0 only")
    tls = kwargs.pop("connection_class") is SSLConnection
    for name in _NOT_FOR_CLUSTER:
        if name in kwargs:
            problems.append(f"store: URL option {name!r} is not supported with {parts.scheme}://")
    if problems:
        raise ConfigError(problems)
    try:
        client = RedisCluster(
            startup_nodes=[ClusterNode(host, port) for host, port in nodes],
            ssl=tls,
            max_connections=store.pool_size + _SPARE_CONNECTIONS,
            socket_timeout=store.timeout,
            socket_connect_timeout=store.connect_timeout,
            socket_keepalive=True,
            # As for one server: RESP2, no set-up round trips, no maintenance notifications.
            protocol=2,
            driver_info=None,
            maint_notifications_config=MaintNotificationsConfig(enabled=False),
            # No retries: the cluster client would otherwise retry a failed call up to three
            # times with back-off, paying the timeout each time, and could run a script twice.
            # It still follows MOVED/ASK redirections, which are answers, not failures.
            retry=Retry(NoBackoff(), 0),
            **kwargs,
        )
    except (RedisError, OSError) as exc:  # e.g. a startup host name that does not resolve
        raise ConfigError([f"store: {_label(parts, nodes)}: {exc}"]) from exc
    limiter = RedisLimiter(
        client,
        deadline=store.timeout + store.connect_timeout,
        key_prefix=store.key_prefix,
        max_in_flight=store.pool_size,
    )
    return limiter, _label(parts, nodes)


class _SentinelLimiter(RedisLimiter):
    """A RedisLimiter on the sentinels' current master; closing it closes the sentinel clients."""

    def __init__(self, sentinel: Sentinel, client: Redis, **kwargs: Any) -> None:
        super().__init__(client, **kwargs)
        self._sentinel = sentinel

    async def close(self) -> None:
        await super().close()
        await self._sentinel.aclose()


def _sentinel(store: StoreSettings, parts: SplitResult, clock: Clock) -> tuple[Limiter, str]:
    problems: list[str] = []
    nodes, single = _node_list(parts, 26379, problems)
    service, _, db_path = parts.path.strip("/").partition("/")
    if not service:
        problems.append(
            "store: redis+sentinel:// needs the master's service name as its path, "
            "e.g. redis+sentinel://sentinel-1:26379,sentinel-2:26379/mymaster"
        )
    query = parse_qsl(single.query, keep_blank_values=True)
    own = {name: value for name, value in query if name in _SENTINEL_OPTIONS}
    rest = urlencode([(n, v) for n, v in query if n not in _SENTINEL_OPTIONS])
    kwargs = _data_node_kwargs(store, single._replace(path=f"/{db_path}", query=rest), problems)
    if problems:
        raise ConfigError(problems)
    kwargs.pop("connection_class")
    timeouts: dict[str, Any] = {
        "socket_timeout": store.timeout,
        "socket_connect_timeout": store.connect_timeout,
        "socket_keepalive": True,
        "protocol": 2,
        "driver_info": None,
        "retry": None,
    }
    sentinel_auth = {
        "username": own.get("sentinel_username"),
        "password": own.get("sentinel_password"),
    }
    sentinel = Sentinel(  # type: ignore[no-untyped-call,unused-ignore]  # untyped in some redis-py
        nodes,
        sentinel_kwargs={**timeouts, **sentinel_auth},
        **timeouts,
    )
    client = sentinel.master_for(
        service,
        max_connections=store.pool_size,
        maint_notifications_config=MaintNotificationsConfig(enabled=False),
        **kwargs,
    )
    limiter = _SentinelLimiter(
        sentinel,
        client,
        deadline=store.timeout + store.connect_timeout,
        key_prefix=store.key_prefix,
        max_in_flight=store.pool_size,
    )
    return limiter, _label(parts, nodes, f"/{service}/{kwargs.get('db', 0)}")


def _node_list(
    parts: SplitResult, default_port: int, problems: list[str]
) -> tuple[list[tuple[str, int]], SplitResult]:
    """The `host:port,host:port` list of a cluster or sentinel URL, and the URL with the first
    host alone (redis:// or rediss://), so that redis_connection_kwargs reads its options."""
    userinfo, at, hostlist = parts.netloc.rpartition("@")
    nodes: list[tuple[str, int]] = []
    for item in hostlist.split(","):
        item = item.strip()
        if not item:
            continue
        one = urlsplit(f"//{item}")
        try:
            port = one.port or default_port
        except ValueError:
            problems.append(f"store: invalid port in {parts.scheme}:// node {item!r}")
            continue
        if not one.hostname:
            problems.append(f"store: {parts.scheme}:// node {item!r} has no host")
            continue
        nodes.append((one.hostname, port))
    if not nodes and not problems:
        problems.append(f"store: {parts.scheme}:// needs at least one host:port")
    first = hostlist.split(",")[0].strip() if nodes else "127.0.0.1"
    scheme = "rediss" if parts.scheme.startswith("rediss") else "redis"
    return nodes, parts._replace(scheme=scheme, netloc=f"{userinfo}{at}{first}", path="")


def _data_node_kwargs(
    store: StoreSettings, single: SplitResult, problems: list[str]
) -> dict[str, Any]:
    """Connection arguments for the data nodes, without host and port (each node has its own)."""
    try:
        kwargs, _ = redis_connection_kwargs(store, single)
    except ConfigError as exc:
        problems.extend(exc.problems)
        return {"connection_class": Connection}
    kwargs.pop("host")
    kwargs.pop("port")
    return kwargs


def _label(parts: SplitResult, nodes: list[tuple[str, int]], path: str = "") -> str:
    hosts = ",".join(f"[{h}]:{p}" if ":" in h else f"{h}:{p}" for h, p in nodes)
    return f"{parts.scheme}://{hosts}{path}"


def _redacted(parts: SplitResult) -> str:
    return f"{parts.scheme}://{parts.hostname or ''}{parts.path}"


_BUILDERS: Mapping[str, Builder] = MappingProxyType(
    {
        "memory": _memory,
        "redis": _redis,
        "rediss": _redis,
        "redis+cluster": _cluster,
        "rediss+cluster": _cluster,
        "redis+sentinel": _sentinel,
    }
)
