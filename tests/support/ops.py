"""Helpers for the operations tests: admin calls, metric samples, waiting for a condition,
and starting a second gateway from a stack's folder with changed settings."""

from __future__ import annotations

import asyncio
import dataclasses
import ssl
import subprocess
import sys
import textwrap
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
from multidict import CIMultiDictProxy
from prometheus_client.parser import text_string_to_metric_families

from gateway.config.settings import load_settings
from gateway.demo.certs import DemoCerts
from gateway.limiter.base import Limiter
from gateway.ops.server import Running, start
from tests.support.stack import Stack


async def admin(
    stack: Stack | Running,
    method: str,
    path: str,
    token: str | None = None,
) -> tuple[int, Any, CIMultiDictProxy[str]]:
    """One admin call: (status, JSON body or text, headers)."""
    running = stack.running if isinstance(stack, Stack) else stack
    url = f"http://127.0.0.1:{running.admin_port}{path}"
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with (
        aiohttp.ClientSession() as session,
        session.request(method, url, headers=headers) as answer,
    ):
        if answer.content_type == "application/json":
            body: Any = await answer.json()
        else:
            body = await answer.text()
        return answer.status, body, answer.headers


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Prometheus text -> {(sample name, labels): value}, via prometheus-client's parser."""
    found: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return found


def value(
    parsed: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str
) -> float:
    """The sample's value (0 when the series does not exist)."""
    return parsed.get((name, frozenset(labels.items())), 0.0)


async def wait_for(
    condition: Callable[[], bool | Awaitable[bool]], timeout: float = 15.0, what: str = "condition"
) -> None:
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if not isinstance(result, bool):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.02)


async def restart_with(stack: Stack, limiter: Limiter | None = None, **changes: Any) -> Running:
    """Another gateway from the stack's own files, with some settings replaced (e.g. the
    admin token, which the stack's YAML cannot take twice). The caller stops it."""
    settings = dataclasses.replace(load_settings(stack.folder / "gateway.yaml"), **changes)
    return await start(settings, limiter=limiter)


def write_gateway(
    folder: Path,
    certs: DemoCerts,
    soap_port: int,
    *,
    port: int,
    admin_port: int,
    policies: str,
    store: str = "memory://",
    extra: str = "",
) -> Path:
    """A gateway.yaml (OMS and DRRS on the mock SOAP port) and one policy file, for a gateway
    run as its own process."""
    (folder / "policies").mkdir(parents=True, exist_ok=True)
    (folder / "policies" / "main.yaml").write_text(textwrap.dedent(policies))
    config = folder / "gateway.yaml"
    config.write_text(
        f"listen: {{host: 127.0.0.1, port: {port}}}\n"
        f"tls: {{cert: {certs.server}, key: {certs.server_key}, client_ca: {certs.ca}}}\n"
        f"admin: {{host: 127.0.0.1, port: {admin_port}}}\n"
        f"store: {store}\n"
        "access_log: false\n"
        "applications:\n"
        f'  OMS: {{upstream: "http://127.0.0.1:{soap_port}", protocol: soap}}\n'
        f'  DRRS: {{upstream: "http://127.0.0.1:{soap_port}", protocol: soap}}\n'
        + textwrap.dedent(extra)
    )
    return config


def serve_process(config: Path, *args: str) -> subprocess.Popen[str]:
    """`python -m gateway serve --config ...` as a real process (logs on stderr)."""
    return subprocess.Popen(
        [sys.executable, "-m", "gateway", "serve", "--config", str(config), *args],
        cwd=Path(__file__).parents[2],
        text=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def client_ssl(certs: DemoCerts, user: str = "jdoex1234") -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(certs.ca))
    cert, key = certs.clients[user]
    context.load_cert_chain(str(cert), str(key))
    return context


async def wait_ready(
    admin_port: int, process: subprocess.Popen[str] | None = None, timeout: float = 30.0
) -> dict[str, Any]:
    """Poll /healthz until the process's admin listener answers; its body."""
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as session:
        while True:
            if process is not None and process.poll() is not None:
                raise AssertionError(
                    f"the gateway exited with {process.returncode}: "
                    f"{process.stderr.read() if process.stderr else ''}"
                )
            try:
                async with session.get(f"http://127.0.0.1:{admin_port}/healthz") as answer:
                    if answer.status == 200:
                        body: dict[str, Any] = await answer.json()
                        return body
            except aiohttp.ClientError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"admin port {admin_port} did not answer in {timeout}s")
            await asyncio.sleep(0.05)
