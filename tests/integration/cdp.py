"""A small Chrome DevTools Protocol client over aiohttp websockets, for the page tests.

Starts Debian's Chromium headless with ``--remote-debugging-port=0`` (it prints the port it
took), attaches to its first page and offers what a page test needs: a phone viewport,
navigate, evaluate, wait for a condition, real mouse clicks (Input.dispatchMouseEvent at
the element's centre, not element.click()) and PNG screenshots. No browser download, no
extra package: aiohttp is already a dependency.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
import re
import time
from pathlib import Path
from typing import Any

import aiohttp

LISTENING = re.compile(r"DevTools listening on (ws://[^\s]+)")


class CdpError(RuntimeError):
    pass


class Chromium:
    def __init__(self, executable: str, profile_dir: Path) -> None:
        self.executable = executable
        self.profile_dir = profile_dir
        self.proc: asyncio.subprocess.Process | None = None
        self.console: list[str] = []  # console messages and page errors, for failure messages
        self._http: aiohttp.ClientSession | None = None
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._reader: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Chromium:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def start(self, timeout_s: float = 60.0) -> None:
        self.profile_dir.mkdir(parents=True, exist_ok=True)
        self.proc = await asyncio.create_subprocess_exec(
            self.executable, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
            "--no-first-run", "--no-default-browser-check", "--disable-extensions", "--hide-scrollbars",
            "--remote-debugging-address=127.0.0.1", "--remote-debugging-port=0",
            f"--user-data-dir={self.profile_dir}", "about:blank",
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
        assert self.proc.stderr is not None
        seen: list[str] = []
        deadline = time.monotonic() + timeout_s
        browser_ws = None
        while browser_ws is None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise CdpError("chromium did not print its DevTools address:\n" + "".join(seen[-20:]))
            line = (await asyncio.wait_for(self.proc.stderr.readline(), left)).decode(errors="replace")
            if not line:
                raise CdpError("chromium exited:\n" + "".join(seen[-20:]))
            seen.append(line)
            match = LISTENING.search(line)
            browser_ws = match.group(1) if match else None
        asyncio.get_running_loop().create_task(self._drain_stderr())
        port = int(browser_ws.split(":")[2].split("/")[0])
        self._http = aiohttp.ClientSession()
        async with self._http.get(f"http://127.0.0.1:{port}/json/list") as resp:
            targets = await resp.json()
        page = next(t for t in targets if t["type"] == "page")
        self._ws = await self._http.ws_connect(page["webSocketDebuggerUrl"], max_msg_size=0)
        self._reader = asyncio.get_running_loop().create_task(self._read())
        await self.send("Page.enable")
        await self.send("Runtime.enable")

    async def _drain_stderr(self) -> None:  # chromium logs a lot; a full pipe would block it
        assert self.proc is not None and self.proc.stderr is not None
        while await self.proc.stderr.readline():
            pass

    async def _read(self) -> None:
        assert self._ws is not None
        async for msg in self._ws:
            if msg.type != aiohttp.WSMsgType.TEXT:
                break
            data = json.loads(msg.data)
            future = self._pending.pop(data.get("id", -1), None)
            if future is not None and not future.done():
                future.set_result(data)
            elif data.get("method") == "Runtime.consoleAPICalled":
                args = data["params"]["args"]
                self.console.append(" ".join(str(a.get("value", a.get("description", ""))) for a in args))
            elif data.get("method") == "Runtime.exceptionThrown":
                self.console.append(str(data["params"]["exceptionDetails"].get("exception", {}).get("description")))
        for future in self._pending.values():
            if not future.done():
                future.set_exception(CdpError("the DevTools connection closed"))

    async def send(self, method: str, timeout_s: float = 30.0, **params: Any) -> dict[str, Any]:
        assert self._ws is not None
        ident = next(self._ids)
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[ident] = future
        await self._ws.send_str(json.dumps({"id": ident, "method": method, "params": params}))
        reply = await asyncio.wait_for(future, timeout_s)
        if "error" in reply:
            raise CdpError(f"{method}: {reply['error']}")
        return reply.get("result", {})

    async def phone_viewport(self, width: int = 390, height: int = 844, scale: float = 1.0) -> None:
        await self.send("Emulation.setDeviceMetricsOverride", width=width, height=height,
                        deviceScaleFactor=scale, mobile=True)

    async def navigate(self, url: str) -> None:
        await self.send("Page.navigate", url=url)
        await self.wait_for("document.readyState === 'complete'", 30)

    async def evaluate(self, expression: str) -> Any:
        result = await self.send("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise CdpError(f"{expression}: {result['exceptionDetails'].get('text')}")
        return result["result"].get("value")

    async def wait_for(self, expression: str, timeout_s: float, poll_s: float = 0.1) -> Any:
        deadline = time.monotonic() + timeout_s
        value = None
        while time.monotonic() < deadline:
            value = await self.evaluate(expression)
            if value:
                return value
            await asyncio.sleep(poll_s)
        raise CdpError(f"timed out after {timeout_s} s waiting for {expression} (last {value!r}); "
                       f"console: {self.console[-5:]}")

    async def click(self, selector: str) -> None:
        """A real mouse click at the centre of the element (it must be visible)."""
        box = await self.evaluate(
            f"(() => {{ const e = document.querySelector({json.dumps(selector)}); if (!e) return null;"
            " e.scrollIntoView({block: 'center'}); const r = e.getBoundingClientRect();"
            " return {x: r.left + r.width / 2, y: r.top + r.height / 2, w: r.width, h: r.height}; })()")
        if not box or box["w"] == 0 or box["h"] == 0:
            raise CdpError(f"{selector}: no such visible element")
        for kind in ("mousePressed", "mouseReleased"):
            await self.send("Input.dispatchMouseEvent", type=kind, x=box["x"], y=box["y"], button="left",
                            clickCount=1)

    async def screenshot(self, path: Path) -> Path:
        data = await self.send("Page.captureScreenshot", format="png")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(data["data"]))
        return path

    async def close(self) -> None:
        if self._ws is not None:
            with contextlib.suppress(Exception):
                await self.send("Browser.close", timeout_s=5)
            await self._ws.close()
        if self._reader is not None:
            self._reader.cancel()
        if self._http is not None:
            await self._http.close()
        if self.proc is not None and self.proc.returncode is None:
            try:
                await asyncio.wait_for(self.proc.wait(), 10)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()
