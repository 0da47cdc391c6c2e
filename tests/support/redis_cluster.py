"""A real Redis Cluster and a real Sentinel set for the tests, on free ports.

`redis_cluster` (session-scoped): three masters, each a `redis-server --cluster-enabled yes`
whose cluster bus port (port + 10000) is free too, joined by `redis-cli --cluster create
--cluster-replicas 0` and ready once every node reports `cluster_state:ok` with all 16384 slots.
`redis_cluster_url` (function-scoped) hands a test that cluster empty, as a `redis+cluster://` URL.

`SentinelSet`: one master, one replica and three sentinels (quorum 2), with a short
`down-after-milliseconds` so a killed master is failed over in a few seconds. `redis_sentinel`
(session-scoped) is one such set, `redis_sentinel_url` (function-scoped) hands a test its
current master empty, as a `redis+sentinel://` URL; a test that kills a master builds its own.

Every server is killed by PID at the end. Without redis-server or redis-cli on PATH the tests
fail when CI is set and skip otherwise.
"""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import redis
from redis.crc import key_slot

from tests.support.ports import free_port
from tests.support.redis import redis_executable
from tests.support.tools import require

SERVICE = "mymaster"
_BUS_OFFSET = 10_000  # Redis Cluster's bus port is the client port + 10000


def redis_cli_executable() -> str:
    return require("redis-cli", package="redis-tools")


def _bindable(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def cluster_port(taken: Sequence[int] = ()) -> int:
    """A free port whose cluster bus port (port + 10000) is free as well.

    Drawn below the usual ephemeral range, so that neither port is likely to be handed to some
    outgoing connection between this check and the server's bind.
    """
    for _ in range(200):
        port = random.randint(12_000, 22_000)
        if port in taken or port + _BUS_OFFSET in taken:
            continue
        if _bindable(port) and _bindable(port + _BUS_OFFSET):
            return port
    raise RuntimeError("no free port pair (port, port + 10000) found")


class RedisProcess:
    """One redis-server (data node or sentinel) on 127.0.0.1, killable and restartable by PID."""

    def __init__(
        self, port: int, folder: Path, args: Sequence[str] = (), config: str | None = None
    ) -> None:
        self.port = port
        self.folder = folder
        self.args = list(args)
        self.config = config  # a config file's text (sentinels rewrite theirs, so they need one)
        self.process: subprocess.Popen[bytes] | None = None
        folder.mkdir(parents=True, exist_ok=True)

    @property
    def log(self) -> Path:
        return self.folder / "redis.log"

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self, timeout: float = 10.0) -> None:
        if self.running:
            return
        command = [redis_executable()]
        if self.config is not None:
            conf = self.folder / "redis.conf"
            conf.write_text(self.config)
            command.append(str(conf))
        command += [
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--dir", str(self.folder),
            "--logfile", str(self.log),
            "--daemonize", "no",
            *self.args,
        ]  # fmt: skip
        self.process = subprocess.Popen(
            command, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"redis-server exited: {self._log_tail()}")
            if self._pong():
                return
            time.sleep(0.02)
        self.stop()
        raise RuntimeError(f"redis-server on {self.port} did not answer PING within {timeout}s")

    def stop(self) -> None:
        """SIGKILL by PID, as a crash would, and reap."""
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        os.kill(process.pid, signal.SIGCONT)
        process.kill()
        process.wait(timeout=10)

    def client(self, **kwargs: object) -> redis.Redis:
        return redis.Redis(port=self.port, socket_timeout=5, **kwargs)  # type: ignore[arg-type]

    def _pong(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(64).startswith(b"+PONG")
        except OSError:
            return False

    def _log_tail(self) -> str:
        try:
            return self.log.read_text(errors="replace")[-2000:]
        except OSError:
            return "(no log)"


_DATA_NODE = ["--save", "", "--appendonly", "no"]


# -- Redis Cluster -------------------------------------------------------------------------------


@dataclass
class RedisClusterSet:
    """Three (or more) masters joined into one cluster, no replicas."""

    folder: Path
    masters: int = 3
    nodes: list[RedisProcess] = field(default_factory=list)

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(f"127.0.0.1:{n.port}" for n in self.nodes)

    def start(self, timeout: float = 20.0) -> None:
        ports: list[int] = []
        for _ in range(self.masters):
            ports.append(cluster_port(ports))
        for port in ports:
            node = RedisProcess(port, self.folder / str(port), [
                *_DATA_NODE,
                "--cluster-enabled", "yes",
                "--cluster-config-file", "nodes.conf",
                "--cluster-node-timeout", "2000",
            ])  # fmt: skip
            self.nodes.append(node)
            node.start()
        create = subprocess.run(
            [redis_cli_executable(), "--cluster", "create",
             *(f"127.0.0.1:{p}" for p in ports), "--cluster-replicas", "0", "--cluster-yes"],
            capture_output=True, text=True, timeout=timeout,
        )  # fmt: skip
        if create.returncode != 0:
            self.stop()
            raise RuntimeError(
                f"redis-cli --cluster create failed:\n{create.stdout}{create.stderr}"
            )
        deadline = time.monotonic() + timeout
        while not self.ready():
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("the cluster did not reach cluster_state:ok")
            time.sleep(0.05)

    def ready(self) -> bool:
        for node in self.nodes:
            try:
                with node.client(decode_responses=True) as client:
                    info = client.cluster("INFO")  # parsed into a dict of strings by redis-py
            except redis.RedisError:
                return False
            if (
                info.get("cluster_state"),
                info.get("cluster_slots_ok"),
                info.get("cluster_known_nodes"),
            ) != ("ok", "16384", str(len(self.nodes))):
                return False
        return True

    def flush(self) -> None:
        for node in self.nodes:
            with node.client() as client:
                client.flushall()
                client.script_flush()

    def owner(self, key: str) -> RedisProcess:
        """The master that holds `key`'s hash slot, as the cluster itself says (CLUSTER SLOTS)."""
        slot = key_slot(key.encode())
        live = next(n for n in self.nodes if n.running)
        with live.client() as client:
            ranges = client.cluster("SLOTS")
        for start, end, primary, *_ in ranges:
            if start <= slot <= end:
                return next(n for n in self.nodes if n.port == int(primary[1]))
        raise LookupError(f"slot {slot} is not served")

    def restart(self, node: RedisProcess, timeout: float = 20.0) -> None:
        """Bring a killed master back (same port, same nodes.conf) and wait for cluster_state:ok."""
        node.start()
        deadline = time.monotonic() + timeout
        while not self.ready():
            if time.monotonic() > deadline:
                raise RuntimeError("the cluster did not recover")
            time.sleep(0.05)

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisClusterSet]:
    cluster = RedisClusterSet(tmp_path_factory.mktemp("redis-cluster"))
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def redis_cluster_url(redis_cluster: RedisClusterSet) -> str:
    """An empty 3-master cluster (keys and scripts flushed on every master)."""
    redis_cluster.flush()
    return redis_cluster.url


# -- Sentinel ------------------------------------------------------------------------------------


_SENTINEL_CONF = """\
sentinel monitor {service} 127.0.0.1 {master} 2
sentinel down-after-milliseconds {service} {down_after}
sentinel failover-timeout {service} {failover_timeout}
sentinel parallel-syncs {service} 1
"""


@dataclass
class SentinelSet:
    """A master, a replica of it, and three sentinels watching it (quorum 2)."""

    folder: Path
    down_after_ms: int = 500
    failover_timeout_ms: int = 2000
    data: list[RedisProcess] = field(default_factory=list)
    sentinels: list[RedisProcess] = field(default_factory=list)

    @property
    def url(self) -> str:
        hosts = ",".join(f"127.0.0.1:{s.port}" for s in self.sentinels)
        return f"redis+sentinel://{hosts}/{SERVICE}/0"

    def start(self, timeout: float = 20.0) -> None:
        master = RedisProcess(free_port(), self.folder / "data-0", _DATA_NODE)
        master.start()
        replica = RedisProcess(
            free_port(),
            self.folder / "data-1",
            [*_DATA_NODE, "--replicaof", "127.0.0.1", str(master.port)],
        )
        replica.start()
        self.data = [master, replica]
        conf = _SENTINEL_CONF.format(
            service=SERVICE,
            master=master.port,
            down_after=self.down_after_ms,
            failover_timeout=self.failover_timeout_ms,
        )
        for i in range(3):
            sentinel = RedisProcess(
                free_port(), self.folder / f"sentinel-{i}", ["--sentinel"], config=conf
            )
            sentinel.start()
            self.sentinels.append(sentinel)
        self.wait_until(self.settled, timeout, "the sentinels did not find each other")

    def settled(self) -> bool:
        """Every sentinel sees the master up, the replica in sync and the two other sentinels."""
        for sentinel in self.sentinels:
            if not sentinel.running:
                continue
            try:
                with sentinel.client(decode_responses=True) as client:
                    master = client.execute_command("SENTINEL", "MASTER", SERVICE)
                    replicas = client.execute_command("SENTINEL", "REPLICAS", SERVICE)
                    others = client.execute_command("SENTINEL", "SENTINELS", SERVICE)
            except redis.RedisError:
                return False
            state = _pairs(master)
            if "s_down" in state["flags"] or "o_down" in state["flags"]:
                return False
            if len(others) < 2 or not any(
                "s_down" not in _pairs(r)["flags"] and _pairs(r).get("master-link-status") == "ok"
                for r in replicas
            ):
                return False
        return True

    def master_port(self) -> int:
        """The master as the sentinels see it now."""
        for sentinel in self.sentinels:
            if not sentinel.running:
                continue
            with sentinel.client(decode_responses=True) as client:
                host_port = client.execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", SERVICE)
            if host_port:
                return int(host_port[1])
        raise RuntimeError("no sentinel answered")

    def node(self, port: int) -> RedisProcess:
        return next(n for n in self.data if n.port == port)

    def flush(self) -> None:
        with self.node(self.master_port()).client() as client:
            client.flushall()
            client.script_flush()

    def promoted(self, old_port: int) -> bool:
        """The sentinels name a new master, and it really is one."""
        try:
            port = self.master_port()
        except (redis.RedisError, RuntimeError):
            return False
        if port == old_port:
            return False
        with self.node(port).client(decode_responses=True) as client:
            return bool(client.info("replication").get("role") == "master")

    @staticmethod
    def wait_until(predicate: object, timeout: float, message: str) -> float:
        assert callable(predicate)
        started = time.monotonic()
        while not predicate():
            if time.monotonic() - started > timeout:
                raise RuntimeError(f"{message} within {timeout}s")
            time.sleep(0.05)
        return time.monotonic() - started

    def stop(self) -> None:
        for process in [*self.sentinels, *self.data]:
            process.stop()


def _pairs(flat: object) -> dict[str, str]:
    """A SENTINEL reply as a dict: redis-py parses some, others come as [name, value, ...]."""
    if isinstance(flat, dict):
        return {str(k): str(v) for k, v in flat.items()}
    assert isinstance(flat, list)
    return {str(flat[i]): str(flat[i + 1]) for i in range(0, len(flat) - 1, 2)}


@pytest.fixture(scope="session")
def redis_sentinel(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SentinelSet]:
    sentinels = SentinelSet(tmp_path_factory.mktemp("redis-sentinel"))
    try:
        sentinels.start()
        yield sentinels
    finally:
        sentinels.stop()


@pytest.fixture
def redis_sentinel_url(redis_sentinel: SentinelSet) -> str:
    """The sentinels' URL, their current master emptied."""
    redis_sentinel.flush()
    return redis_sentinel.url
