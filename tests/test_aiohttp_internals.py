"""The one private detail of aiohttp the gateway relies on, named so an upgrade fails here first.

`edge/tls.py`'s TlsSite accepts connections itself and puts its listener in `BaseSite._server`:
`BaseSite.stop()` closes it and `BaseRunner.addresses` lists its sockets. pyproject pins aiohttp
to the minor series this was checked with.
"""

from __future__ import annotations

import inspect
from importlib.metadata import version

from aiohttp import web


def test_aiohttp_is_the_pinned_minor_series() -> None:
    assert version("aiohttp").startswith("3.14."), "re-check edge/tls.py TlsSite, then the pin"


def test_base_site_keeps_its_listener_in_server() -> None:
    assert "_server" in web.BaseSite.__slots__
    assert "self._server.close()" in inspect.getsource(web.BaseSite.stop)
    addresses = web.BaseRunner.addresses.fget
    assert addresses is not None and "site._server" in inspect.getsource(addresses)
