"""The demo CRR REST service: exactly the operations of specs/crr_auction_1.0.0.yaml
(`GET`/`POST /auction/v1.0/portfolio`, `GET /auction/v1.0/portfolio/{portfolioId}`), JSON in
and out. tests/test_openapi.py holds the two to each other: every operation of the spec is served
with answers its schemas describe, and nothing else is (but the `/_mock/*` test hooks).

Errors, routing ones included, come in the operator's `errorList` shape, and every answer
carries the request's `caiso-request-id` (a fresh UUID when the client sent none).
"""

from __future__ import annotations

import json
import uuid

from aiohttp import web

from gateway.demo.mock.echo import BODY, Handler, add_mock_hooks

REQUEST_ID = "caiso-request-id"


def _portfolios() -> list[dict[str, object]]:
    """The portfolios GET returns (built per call: no shared mutable module state)."""
    return [
        {
            "portfolioId": "PF-2024-000117",
            "portfolioName": "NP15-HEDGE-Q3",
            "marketName": "2024 Q3 Seasonal Auction",
            "status": "ACTIVE",
            "crrs": [
                {
                    "source": "PGAE_APND",
                    "sink": "TH_NP15_GEN-APND",
                    "timeOfUse": "ON",
                    "mw": 25.0,
                    "clearingPrice": 3.42,
                },
                {
                    "source": "PGAE_APND",
                    "sink": "TH_NP15_GEN-APND",
                    "timeOfUse": "OFF",
                    "mw": 10.0,
                    "clearingPrice": 1.07,
                },
            ],
        },
        {
            "portfolioId": "PF-2024-000118",
            "portfolioName": "SP15-LOAD",
            "marketName": "2024 August Monthly Auction",
            "status": "PENDING",
            "crrs": [
                {
                    "source": "SCE_APND",
                    "sink": "TH_SP15_GEN-APND",
                    "timeOfUse": "ON",
                    "mw": 40.0,
                    "clearingPrice": None,
                },
            ],
        },
    ]


def error_list(status: int, code: str, description: str) -> web.Response:
    return web.json_response(
        {"errorList": [{"errorCode": code, "errorDescription": description, "severity": "ERROR"}]},
        status=status,
    )


@web.middleware
async def rest_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Echo `caiso-request-id`; turn routing errors into `errorList` answers."""
    request_id = request.headers.get(REQUEST_ID) or str(uuid.uuid4())
    try:
        response = await handler(request)
    except web.HTTPException as error:
        if error.status < 400:
            raise
        code = {404: "GEN0004", 405: "GEN0005"}.get(error.status, "GEN0001")
        response = error_list(
            error.status, code, f"{error.reason}: {request.method} {request.path}"
        )
    if not response.prepared:
        response.headers[REQUEST_ID] = request_id
    return response


async def get_portfolio(request: web.Request) -> web.Response:
    wanted = request.query.get("portfolioName")
    portfolios = [p for p in _portfolios() if wanted is None or p["portfolioName"] == wanted]
    return web.json_response({"portfolios": portfolios, "count": len(portfolios)})


async def get_portfolio_by_id(request: web.Request) -> web.Response:
    wanted = request.match_info["portfolioId"]
    found = next((p for p in _portfolios() if p["portfolioId"] == wanted), None)
    if found is None:
        return error_list(404, "GEN0004", f"Portfolio {wanted} was not found.")
    return web.json_response(found)


async def submit_portfolio(request: web.Request) -> web.Response:
    body = request[BODY]
    if body.kept is None:
        return error_list(413, "GEN0413", "Payload too large for a portfolio submission.")
    try:
        document = json.loads(body.kept or b"null")
    except (ValueError, UnicodeDecodeError):
        return error_list(400, "GEN0001", "Request body is not valid JSON.")
    if not isinstance(document, dict) or not document.get("portfolioName"):
        return error_list(400, "GEN0002", "portfolioName is required.")
    return web.json_response(
        {
            "portfolioId": f"PF-{uuid.uuid4().hex[:12].upper()}",
            "portfolioName": document["portfolioName"],
            "status": "SUBMITTED",
            "receivedBytes": body.length,
            "sha256": body.sha256,
        }
    )


def create_rest_app() -> web.Application:
    """The CRR REST service with the shared echo headers and `/_mock/*` hooks."""
    app = web.Application()
    add_mock_hooks(app)  # outermost: the echo sees every answer, errorList ones included
    app.middlewares.append(rest_middleware)
    # allow_head=False: HEAD is not an operation of the spec
    app.router.add_get("/auction/v1.0/portfolio", get_portfolio, allow_head=False)
    app.router.add_post("/auction/v1.0/portfolio", submit_portfolio)
    app.router.add_get(
        "/auction/v1.0/portfolio/{portfolioId}", get_portfolio_by_id, allow_head=False
    )
    return app
