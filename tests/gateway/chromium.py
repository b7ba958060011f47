"""Debian's headless Chromium for the browser tests (test support): where
it is, and `open_chromium`, which drives pages over the DevTools protocol
(CDP, JSON over a WebSocket, spoken here with trio-websocket): open a page,
evaluate JavaScript in it. No browser is downloaded: without Chromium the
tests that use it FAIL (`.ci/run` installs it)."""

from __future__ import annotations

import itertools
import json
import shutil
import signal
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any

import trio
from trio_websocket import WebSocketConnection, open_websocket_url


def chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    assert path is not None, (
        "Chromium is not installed: `apt-get install -y chromium` (.ci/run does it)"
    )
    return path


class CdpError(Exception):
    """A CDP command failed, or the page's JavaScript threw."""


class Browser:
    """One Chromium process's DevTools connection (see `open_chromium`)."""

    def __init__(self, ws: WebSocketConnection) -> None:
        self._ws = ws
        self._ids = itertools.count(1)
        self._waiting: dict[int, tuple[trio.Event, list[dict[str, Any]]]] = {}

    async def read(self) -> None:
        """Hand each answer to its command (events are ignored)."""
        while True:
            message = json.loads(await self._ws.get_message())
            waiting = self._waiting.pop(message.get("id", -1), None)
            if waiting is not None:
                waiting[1].append(message)
                waiting[0].set()

    async def send(
        self, method: str, params: dict[str, Any] | None = None, session: str = ""
    ) -> dict[str, Any]:
        number = next(self._ids)
        done: tuple[trio.Event, list[dict[str, Any]]] = (trio.Event(), [])
        self._waiting[number] = done
        command: dict[str, Any] = {"id": number, "method": method}
        command["params"] = params or {}
        if session:
            command["sessionId"] = session
        await self._ws.send_message(json.dumps(command))
        await done[0].wait()
        answer = done[1][0]
        if "error" in answer:
            raise CdpError(f"{method}: {answer['error']}")
        result: dict[str, Any] = answer["result"]
        return result

    async def open_page(self, url: str) -> Page:
        """A new tab showing ``url``."""
        target = await self.send("Target.createTarget", {"url": url})
        attached = await self.send(
            "Target.attachToTarget", {"targetId": target["targetId"], "flatten": True}
        )
        return Page(self, target["targetId"], attached["sessionId"])


class Page:
    """One tab."""

    def __init__(self, browser: Browser, target: str, session: str) -> None:
        self._browser = browser
        self.target = target
        self._session = session

    async def evaluate(self, expression: str) -> Any:
        """The value of a JavaScript expression in the page (awaited if a
        promise; JSON values only).

        Raises:
            CdpError: it threw.
        """
        result = await self._browser.send(
            "Runtime.evaluate",
            {"expression": expression, "awaitPromise": True, "returnByValue": True},
            self._session,
        )
        if "exceptionDetails" in result:
            raise CdpError(f"{expression!r} threw: {result['exceptionDetails']}")
        return result["result"].get("value")

    async def wait_for(self, expression: str, *, poll: float = 0.05) -> Any:
        """Evaluate ``expression`` until it is truthy (a JavaScript error
        counts as falsy: the page may still be loading); its value. Bound
        it with a cancel scope."""
        while True:
            try:
                value = await self.evaluate(expression)
            except CdpError:
                value = None
            if value:
                return value
            await trio.sleep(poll)

    async def close(self) -> None:
        await self._browser.send("Target.closeTarget", {"targetId": self.target})


@asynccontextmanager
async def open_chromium(profile: Path) -> AsyncIterator[Browser]:
    """A headless Chromium with a fresh profile in ``profile``, and its
    DevTools connection; terminated at the end of the block."""
    command = [
        chromium(),
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--no-first-run",
        "--remote-debugging-port=0",
        f"--user-data-dir={profile}",
        "about:blank",
    ]
    async with trio.open_nursery() as nursery:
        process: Any = await nursery.start(
            partial(
                trio.run_process,
                command,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                check=False,
            )
        )
        try:
            active = profile / "DevToolsActivePort"
            with trio.fail_after(30):
                # Chromium writes its port and path when it listens.
                while len(lines := _read_lines(active)) < 2:  # noqa: ASYNC110
                    await trio.sleep(0.05)
            url = f"ws://127.0.0.1:{lines[0]}{lines[1]}"
            async with (
                open_websocket_url(url, max_message_size=1 << 24) as ws,
                trio.open_nursery() as readers,
            ):
                browser = Browser(ws)
                readers.start_soon(browser.read)
                yield browser
                readers.cancel_scope.cancel()
        finally:
            process.send_signal(signal.SIGTERM)


def _read_lines(path: Path) -> list[str]:
    try:
        return path.read_text().split()
    except FileNotFoundError:
        return []
