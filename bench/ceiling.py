"""The ceiling row's server: the gateway's design with nothing in it. The data plane's own
HTTP/1.1 protocol (gateway/edge/connection.py, on httptools) on uvloop, behind the same mutual
TLS (TLS 1.2+, client certificate required and checked against the CA and CRL, no session
tickets), answering every call with one fixed SOAP fault, repeated calls replayed by the protocol
as the gateway's rejections are. What it serves per second is the most a gateway of this design
can: the rest of the gateway's cost is its own. With `--upstream URL` it forwards every call
through the gateway's upstream pool instead (the forwarding ceiling: no routing, policy,
limiter, header rewriting or observers).

    python -m bench.ceiling --port P --cert server.pem --key key.pem --ca ca.pem [--crl crl.pem]
                            [--upstream http://127.0.0.1:PORT]
"""

from __future__ import annotations

import argparse
import asyncio
import ssl

from gateway.config.settings import Limits
from gateway.edge.connection import GuardedServer
from gateway.edge.http1 import Request, Response
from gateway.proxy.upstream.pool import UpstreamPool

FAULT = (
    b'<?xml version="1.0" encoding="UTF-8"?>'
    b'<soapenv:Envelope xmlns:soapenv="http://schemas.xmlsoap.org/soap/envelope/">'
    b"<soapenv:Body><soapenv:Fault><faultcode>soapenv:Client</faultcode>"
    b"<faultstring>Acceptable Use Policy violation: retry in 5 seconds.</faultstring>"
    b"</soapenv:Fault></soapenv:Body></soapenv:Envelope>"
)
FORWARD_HEADERS = {"Content-Type": "text/xml; charset=utf-8"}


def tls_context(cert: str, key: str, ca: str, crl: str | None) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cert, key)
    ctx.load_verify_locations(ca)
    if crl:
        ctx.load_verify_locations(crl)
        ctx.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.options |= ssl.OP_NO_TICKET
    return ctx


async def serve(args: argparse.Namespace) -> None:
    if args.upstream:
        pool = UpstreamPool(args.upstream, size=64, connect_timeout=1.0, read_timeout=5.0)

        async def forward(request: Request) -> Response:
            # The forwarding ceiling: parse, one task, the gateway's upstream pool, one write
            # back; no routing, policy, limiter, header rewriting or observers.
            body = await request.read()
            headers = [("Content-Type", request.headers.get("Content-Type", ""))]
            upstream = await pool.request(
                request.method, request.raw_path, headers, body or None, content_length=len(body)
            )
            answer = await upstream.read_all()
            return Response(status=upstream.status, body=answer, headers=FORWARD_HEADERS)

        server = GuardedServer(forward, limits=Limits())
        await _listen(server, args)
        return

    async def handler(request: Request) -> Response:
        await request.read()
        answer = Response(
            status=500, body=FAULT, headers={"Content-Type": "text/xml; charset=utf-8"}
        )
        # As the gateway's rejections: the same request again on the connection gets the same
        # answer from the protocol itself (proxy/replay.py), here with nothing to decide.
        again = answer.serialize(request)
        answer.replay = lambda: again
        return answer

    await _listen(GuardedServer(handler, limits=Limits()), args)


async def _listen(server: GuardedServer, args: argparse.Namespace) -> None:
    ctx = tls_context(args.cert, args.key, args.ca, args.crl)
    loop = asyncio.get_running_loop()
    listener = await loop.create_server(server, "127.0.0.1", args.port, ssl=ctx, backlog=1024)
    async with listener:
        await listener.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.ceiling")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--cert", required=True)
    parser.add_argument("--key", required=True)
    parser.add_argument("--ca", required=True)
    parser.add_argument("--crl")
    parser.add_argument("--upstream", help="forward every call to this http:// URL instead")
    args = parser.parse_args()
    try:
        import uvloop

        uvloop.run(serve(args))
    except ImportError:
        asyncio.run(serve(args))


if __name__ == "__main__":
    main()
