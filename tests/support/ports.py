"""Free TCP ports on 127.0.0.1, for servers the tests start (gateways, upstreams, Redis) and
for addresses that must have nothing listening (a dead upstream, a dead store)."""

from __future__ import annotations

import socket


def free_port(consecutive: int = 1) -> int:
    """A free TCP port on 127.0.0.1 (the first of `consecutive` free ones); nothing listens on
    it when this returns."""
    for _ in range(200):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = int(sock.getsockname()[1])
        if port + consecutive > 65535:
            continue
        try:
            for offset in range(1, consecutive):
                with socket.socket() as sock:
                    sock.bind(("127.0.0.1", port + offset))
        except OSError:
            continue
        return port
    raise RuntimeError("no free ports")
