"""The upstream HTTP/1.1 client: one keep-alive pool per upstream, requests written straight to
the transport, answers parsed by httptools (llhttp, the parser uvicorn uses).

Three modules, imported one way (response <- protocol <- pool):

- response.py: one exchange's answer (`UpstreamResponse`), its states, its bounded body buffer,
  and the failures (`UpstreamFailed`, `UpstreamTimeout`).
- protocol.py: one connection (an asyncio.Protocol): request framing, feeding the answer to its
  exchange, flow control both ways.
- pool.py: `UpstreamPool`: connecting, queueing for a place, reuse and idle expiry, the read
  timeout, the one retry the keep-alive race allows.

It knows nothing of the gateway's statuses: failures are UpstreamFailed and UpstreamTimeout, which
forward.py turns into 502 and 504. Exceptions raised by a request body iterator pass through
unchanged.

Why not aiohttp's client: on the gateway's hot path it was the largest single cost (session
bookkeeping, auto headers, payload objects, a stream reader per response), none of which a
proxy that already holds validated headers and a raw target needs.
"""

from __future__ import annotations

from gateway.proxy.upstream.pool import UpstreamPool
from gateway.proxy.upstream.response import (
    HIGH_WATER,
    UpstreamFailed,
    UpstreamResponse,
    UpstreamTimeout,
)

__all__ = ["HIGH_WATER", "UpstreamFailed", "UpstreamPool", "UpstreamResponse", "UpstreamTimeout"]
