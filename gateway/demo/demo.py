"""`aup-gateway demo`: certificates if missing, the mock market services and the gateway, plus
curl commands that show an allowed call, an OMS violation, a DRRS reset and a REST call routed by
its OpenAPI operationId."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import signal
from pathlib import Path

from gateway.config.settings import Settings, load_settings
from gateway.demo.certs import write_demo_certs

_ENVELOPE = (
    '<soapenv:Envelope xmlns:soapenv="http://schemas.xmlsoap.org/soap/envelope/">'
    "<soapenv:Body/></soapenv:Envelope>"
)


def demo_settings(config: Path) -> Settings:
    """The demo's settings: REDIS_URL, when set, replaces the configured store."""
    settings = load_settings(config)
    redis_url = os.environ.get("REDIS_URL")
    if redis_url:
        settings = dataclasses.replace(
            settings, store=dataclasses.replace(settings.store, url=redis_url)
        )
    return settings


def curl_session(settings: Settings, certs_dir: Path) -> str:
    base = f"https://localhost:{settings.listen.port}"
    clients = _rel(certs_dir / "clients")

    def soap(user: str, app: str, service: str) -> str:
        cert = f"{clients}/{user}-bundle.pem"
        return f'$CURL --cert {cert} -H "$SOAP" -d "$BODY" {base}/sst/{app}/{service}'

    oms = soap("jdoex1234", "oms", "RetrieveCurrentOutages_OMSv1_AP")
    drrs = soap("jdoex1234", "drrs", "RetrieveDRLocations_DRRSv2_AP")
    crr = (
        f"$CURL --cert {clients}/jdoex1234-bundle.pem "
        f"{base}/crr/auction/v1.0/portfolio/PF-2024-000117"
    )
    return "\n".join(
        [
            "# Paste into a shell in this folder:",
            f"CURL='curl -sS -i --cacert {_rel(certs_dir / 'ca.pem')}'",
            "SOAP='Content-Type: text/xml; charset=utf-8'",
            f"BODY='{_ENVELOPE}'",
            "# 1. An allowed OMS retrieve (the mock upstream answers):",
            oms,
            "# 2. The same call again within 5 s: an AUP violation fault (HTTP 500, Retry-After):",
            oms,
            "# 3. An OMS submit is never limited; another user is not affected by jdoex1234:",
            soap("jdoex1234", "oms", "SubmitOutage_OMSv1_AP"),
            soap("asmithx5678", "oms", "RetrieveCurrentOutages_OMSv1_AP"),
            "# 4. DRRS: the first call passes; every retry within 30 s resets the 30 s timer:",
            drrs,
            drrs,
            "# 4b. When may jdoex1234 call DRRS again? Asking is free (never a call, no reset):",
            f"$CURL --cert {clients}/jdoex1234-bundle.pem '{base}/aup/v1/status?application=DRRS'",
            "# 5. REST (CRR), routed by its OpenAPI file: this path is the operation",
            "#    getPortfolioById (tag read, 1 call per 5 s); the second call's violation names",
            "#    the operationId, in the API's own errorList JSON shape:",
            crr,
            crr,
            "# 6. No client certificate: the TLS handshake is refused, nothing is forwarded:",
            f"$CURL {base}/sst/oms/RetrieveCurrentOutages_OMSv1_AP",
        ]
    )


def run_demo(config: Path) -> None:
    settings = demo_settings(config)
    certs_dir = settings.tls.client_ca.parent
    write_demo_certs(certs_dir)
    try:
        import uvloop
    except ImportError:
        asyncio.run(_demo(settings, certs_dir))
    else:
        uvloop.run(_demo(settings, certs_dir))


async def _demo(settings: Settings, certs_dir: Path) -> None:
    from gateway.demo.mock import run_mock_upstream
    from gateway.ops.server import start

    soap_port, rest_port = _mock_ports(settings)
    mock = asyncio.create_task(run_mock_upstream("127.0.0.1", soap_port, rest_port))
    running = await start(settings)
    admin = (
        f"http://{settings.admin.host}:{running.admin_port} (ops page: /ops)"
        if settings.admin
        else "off"
    )
    print(
        f"\nAUP Gateway demo: gateway https://localhost:{running.port}, store "
        f"{running.gateway.limiter.name}, admin {admin}, mock upstream :{soap_port} (SOAP) "
        f":{rest_port} (REST)\n\n{curl_session(settings, certs_dir)}\n\nCtrl-C stops the demo.",
        flush=True,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    await running.stop()
    mock.cancel()


def _mock_ports(settings: Settings) -> tuple[int, int]:
    """The mock serves SOAP and REST on the ports the demo configuration points at."""
    from urllib.parse import urlsplit

    ports = {
        app.protocol: urlsplit(app.upstream).port or 80 for app in settings.applications.values()
    }
    return ports.get("soap", 9080), ports.get("rest", 9081)


def _rel(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)
