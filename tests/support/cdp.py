"""Headless Chromium driven over the DevTools protocol, for the ops page's actions: open a
page, type into its fields, click, wait for what the page shows, read its DOM, take a
screenshot. The protocol is JSON over a websocket (aiohttp's client); Chromium is the same
Debian package the other page tests run (`--dump-dom` cannot fill a form)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp


class PageError(AssertionError):
    pass


class Page:
    """One browser tab: commands go out with an id, their answers come back by id."""

    def __init__(self, socket: aiohttp.ClientWebSocketResponse) -> None:
        self._socket = socket
        self._ids = itertools.count(1)
        self._waiting: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self.console: list[str] = []  # the page's exceptions, for failure messages
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        async for message in self._socket:
            if message.type != aiohttp.WSMsgType.TEXT:
                break
            data = json.loads(message.data)
            future = self._waiting.pop(data.get("id", -1), None)
            if future is not None and not future.done():
                future.set_result(data)
            elif data.get("method") == "Runtime.exceptionThrown":
                self.console.append(json.dumps(data["params"]["exceptionDetails"])[:500])
        for future in self._waiting.values():
            future.set_exception(PageError("the browser closed the connection"))

    async def send(self, method: str, **params: Any) -> dict[str, Any]:
        number = next(self._ids)
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._waiting[number] = future
        await self._socket.send_str(json.dumps({"id": number, "method": method, "params": params}))
        answer = await asyncio.wait_for(future, 30)
        if "error" in answer:
            raise PageError(f"{method}: {answer['error']}")
        result: dict[str, Any] = answer["result"]
        return result

    async def evaluate(self, expression: str) -> Any:
        """The value of a JavaScript expression in the page (promises are awaited)."""
        result = await self.send(
            "Runtime.evaluate", expression=expression, awaitPromise=True, returnByValue=True
        )
        if "exceptionDetails" in result:
            raise PageError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    async def goto(self, url: str) -> None:
        await self.send("Page.navigate", url=url)
        await self.wait_for(
            f"location.href === {json.dumps(url)} && document.readyState === 'complete'",
            what=f"{url} to load",
        )

    async def wait_for(self, expression: str, timeout: float = 20.0, what: str = "") -> Any:
        """Poll until the expression is truthy in the page; its value (true for an element)."""
        deadline = time.monotonic() + timeout
        probe = f"(v => v instanceof Node ? true : v)({expression})"
        while True:
            with contextlib.suppress(PageError):  # e.g. evaluated while the page navigates
                value = await self.evaluate(probe)
                if value:
                    return value
            if time.monotonic() > deadline:
                raise PageError(
                    f"timed out waiting for {what or expression}; page errors: {self.console}"
                )
            await asyncio.sleep(0.05)

    async def type(self, selector: str, text: str) -> None:
        """Focus the field, clear it and type `text` into it as keyboard input."""
        await self.evaluate(
            f"(f => {{ f.focus(); f.select(); }})(document.querySelector({json.dumps(selector)}))"
        )
        await self.send(
            "Input.dispatchKeyEvent",
            type="keyDown",
            key="Backspace",
            code="Backspace",
            windowsVirtualKeyCode=8,
        )
        await self.send(
            "Input.dispatchKeyEvent",
            type="keyUp",
            key="Backspace",
            code="Backspace",
            windowsVirtualKeyCode=8,
        )
        if text:
            await self.send("Input.insertText", text=text)

    async def click(self, selector: str) -> None:
        """A mouse click in the middle of the element (scrolled into view first)."""
        box = await self.evaluate(
            f"(e => {{ e.scrollIntoView({{block: 'center'}}); const r = e.getBoundingClientRect();"
            f" return [r.x + r.width / 2, r.y + r.height / 2]; }})"
            f"(document.querySelector({json.dumps(selector)}))"
        )
        x, y = box
        for kind in ("mousePressed", "mouseReleased"):
            await self.send(
                "Input.dispatchMouseEvent", type=kind, x=x, y=y, button="left", clickCount=1
            )

    async def text(self, selector: str) -> str:
        value = await self.evaluate(
            f"(e => e ? e.textContent : null)(document.querySelector({json.dumps(selector)}))"
        )
        if value is None:
            raise PageError(f"no element {selector}")
        return str(value)

    async def rows(self, table: str) -> list[list[str]]:
        """The text of each cell of a table's body."""
        value = await self.evaluate(
            f"[...document.querySelectorAll('#{table} tbody tr')]"
            ".map(tr => [...tr.cells].map(c => c.textContent.trim()))"
        )
        return list(value)

    async def dom(self) -> str:
        return str(await self.evaluate("document.documentElement.outerHTML"))

    async def screenshot(self, path: Path) -> bytes:
        shot = base64.b64decode((await self.send("Page.captureScreenshot", format="png"))["data"])
        path.write_bytes(shot)
        return shot

    async def close(self) -> None:
        await self._socket.close()
        self._reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._reader


@contextlib.asynccontextmanager
async def chromium_page(
    executable: str, profile: Path, width: int = 1200, height: int = 900
) -> AsyncIterator[Page]:
    """Start headless Chromium with the DevTools port on loopback and attach to its tab."""
    profile.mkdir(parents=True, exist_ok=True)
    process = await asyncio.create_subprocess_exec(
        executable,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--hide-scrollbars",
        "--remote-debugging-address=127.0.0.1",
        "--remote-debugging-port=0",
        f"--user-data-dir={profile}",
        f"--window-size={width},{height}",
        "about:blank",
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    page: Page | None = None
    try:
        port_file = profile / "DevToolsActivePort"
        deadline = time.monotonic() + 30
        while not (port_file.exists() and port_file.read_text().count("\n") >= 1):
            if process.returncode is not None or time.monotonic() > deadline:
                raise PageError("Chromium did not open its DevTools port")
            await asyncio.sleep(0.05)
        port = int(port_file.read_text().split()[0])
        async with aiohttp.ClientSession() as session:
            async with session.get(f"http://127.0.0.1:{port}/json/list") as answer:
                targets = await answer.json()
            target = next(t for t in targets if t["type"] == "page")
            socket = await session.ws_connect(target["webSocketDebuggerUrl"], max_msg_size=0)
            page = Page(socket)
            await page.send("Runtime.enable")
            await page.send("Page.enable")
            await page.send(  # the viewport itself, whatever the window's frame takes
                "Emulation.setDeviceMetricsOverride",
                width=width,
                height=height,
                deviceScaleFactor=1,
                mobile=False,
            )
            yield page
    finally:
        if page is not None:
            await page.close()
        if process.returncode is None:
            process.kill()
        await process.wait()
