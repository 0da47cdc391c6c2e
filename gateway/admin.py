"""The admin listener: health and readiness (metrics, policies and key look-ups build on it)."""

from __future__ import annotations

from aiohttp import web

from gateway.app import Gateway

GATEWAY = web.AppKey("gateway", Gateway)


def create_admin_app(gateway: Gateway) -> web.Application:
    app = web.Application()
    app[GATEWAY] = gateway
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    return app


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    gateway = request.app[GATEWAY]
    body = {"status": "ready", "policies": gateway.policies.version,
            "store": gateway.limiter.name}
    return web.json_response(body)
