"""edge/connection.py subclasses aiohttp's RequestHandler and web.Server and reads their private
state (deadlines, flow control, the queued messages) and builds `_ErrInfo`. aiohttp is pinned
to the minor series this was written against; these tests name every private piece the
gateway depends on, so an upgrade that removes or renames one fails here, loudly, instead of
as a hung or unbounded connection in production."""

from __future__ import annotations

import asyncio
import inspect
import re
from importlib.metadata import version
from pathlib import Path

from aiohttp import web
from aiohttp.streams import EMPTY_PAYLOAD
from aiohttp.web_protocol import RequestHandler

ROOT = Path(__file__).resolve().parent.parent
CONNECTION = ROOT / "gateway" / "edge" / "connection.py"

# RequestHandler's (and its BaseProtocol's) private attributes that GuardedHandler reads or sets.
HANDLER_ATTRIBUTES = (
    "_loop",  # the event loop, for the read and send deadlines
    "_messages",  # queued (message, payload) pairs: refusing other HTTP versions
    "_request_count",  # a request head was parsed by data_received
    "_request_handler",  # replaced to refuse a connection as a whole
    "_current_request",  # a call is being answered: no head timeout
    "_force_close",  # the connection is closing anyway
    "_reading_paused",  # flow control: the body is not read because the handler waits
    "_buffer_paused",
    "_paused",  # the transport's write buffer is full (pause_writing)
)
# web.Server's private attributes that GuardedServer reads to build its handlers.
SERVER_ATTRIBUTES = ("_loop", "_kwargs")


def _slots(cls: type) -> set[str]:
    return {name for klass in cls.__mro__ for name in getattr(klass, "__slots__", ())}


def test_aiohttp_is_the_pinned_minor_series() -> None:
    pin = re.search(r'"aiohttp>=([\d.]+),<([\d.]+)"', (ROOT / "pyproject.toml").read_text())
    assert pin is not None, "pyproject must pin aiohttp to a minor series (edge/connection.py)"
    installed = tuple(int(p) for p in version("aiohttp").split(".")[:2])
    low = tuple(int(p) for p in pin.group(1).split(".")[:2])
    high = tuple(int(p) for p in pin.group(2).split(".")[:2])
    assert low <= installed < high, f"aiohttp {version('aiohttp')} is outside the pin {pin[0]}"


def test_request_handler_keeps_the_private_attributes_the_gateway_uses() -> None:
    missing = [name for name in HANDLER_ATTRIBUTES if name not in _slots(RequestHandler)]
    assert not missing, (
        f"aiohttp {version('aiohttp')}: RequestHandler no longer has {', '.join(missing)}; "
        "gateway/edge/connection.py (GuardedHandler) depends on them"
    )


async def test_a_live_handler_and_server_carry_them() -> None:
    async def handler(request: web.BaseRequest) -> web.StreamResponse:
        return web.Response()

    server = web.Server(handler, loop=asyncio.get_running_loop())
    missing = [f"Server.{name}" for name in SERVER_ATTRIBUTES if not hasattr(server, name)]
    protocol = server()
    missing += [
        f"RequestHandler.{name}" for name in HANDLER_ATTRIBUTES if not hasattr(protocol, name)
    ]
    assert not missing, (
        f"aiohttp {version('aiohttp')}: {', '.join(missing)} not set on a new handler; "
        "gateway/edge/connection.py depends on them"
    )
    assert isinstance(protocol, RequestHandler)
    assert len(protocol._messages) == 0  # a sequence of (message, payload) pairs


def test_err_info_is_built_as_the_gateway_builds_it() -> None:
    try:
        from aiohttp.web_protocol import _ErrInfo
    except ImportError as exc:  # pragma: no cover - the failure this test exists for
        raise AssertionError(
            f"aiohttp {version('aiohttp')} has no web_protocol._ErrInfo; "
            "gateway/edge/connection.py answers other HTTP versions with it"
        ) from exc
    assert list(inspect.signature(_ErrInfo).parameters) == ["status", "exc", "message"]
    error = ValueError("HTTP/2.0")
    info = _ErrInfo(505, error, "HTTP/2.0")
    assert (info.status, info.exc, info.message) == (505, error, "HTTP/2.0")
    assert EMPTY_PAYLOAD.at_eof()


def test_handle_error_keeps_its_signature() -> None:
    parameters = list(inspect.signature(RequestHandler.handle_error).parameters)
    assert parameters == ["self", "request", "status", "exc", "message"], (
        f"aiohttp {version('aiohttp')}: RequestHandler.handle_error is now {parameters}; "
        "GuardedHandler.handle_error overrides it"
    )


def test_every_private_attribute_connection_py_reads_is_listed_here() -> None:
    # A private name that connection.py reads but never sets belongs to aiohttp: it must be in
    # the lists above, so that this file stays the whole inventory.
    source = CONNECTION.read_text(encoding="utf-8")
    read = set(re.findall(r"self\.(_[a-z]\w*)", source))
    own = set(re.findall(r"self\.(_[a-z]\w*)\s*(?::[^=\n]*)?=(?!=)", source))
    own |= set(re.findall(r"def (_\w+)", source))
    inherited = read - own
    unlisted = inherited - set(HANDLER_ATTRIBUTES) - set(SERVER_ATTRIBUTES)
    assert not unlisted, f"connection.py uses aiohttp's {sorted(unlisted)}: list them here"
