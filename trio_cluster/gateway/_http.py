"""The HTTP side of a gateway socket, before the WebSocket upgrade (Trio
driver helper).

The gateway reads the request head itself (h11, bounded to `MAX_HEAD`
bytes) before any WebSocket work: that is where a client is refused
cheaply (over the connect rate, unauthenticated, wrong path, no common
subprotocol) with a plain HTTP status, and where ``GET /gateway.js`` is
answered. A request that may upgrade is then handed to trio-websocket with
the bytes already read replayed in front of the stream (`ReplayStream`).
"""

from __future__ import annotations

import email.utils
import importlib.resources
from functools import cache
from typing import Final
from urllib.parse import parse_qsl, urlsplit

import attrs
import h11
import trio

__all__ = [
    "MAX_HEAD",
    "Head",
    "ReplayStream",
    "client_script",
    "http_response",
    "read_head",
]

MAX_HEAD: Final = 16 * 1024
"""Bytes of a request head read at most (a longer one is answered 431)."""

_REASONS: Final = {
    200: "OK",
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    426: "Upgrade Required",
    429: "Too Many Requests",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    503: "Service Unavailable",
}


@attrs.frozen
class Head:
    """A request head, parsed."""

    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    """Names in lower case; repeated headers joined with ``", "``."""
    raw: bytes
    """Every byte read from the stream so far (replayed to trio-websocket)."""

    @classmethod
    def from_parts(
        cls, method: str, path: str, query_string: str, headers: dict[str, str]
    ) -> Head:
        """A head from parts another server parsed (no raw bytes)."""
        return cls(method, path, dict(parse_qsl(query_string)), headers, b"")

    @property
    def upgrade(self) -> bool:
        return "websocket" in self.headers.get("upgrade", "").lower()

    @property
    def subprotocols(self) -> list[str]:
        offered = self.headers.get("sec-websocket-protocol", "")
        return [item.strip() for item in offered.split(",") if item.strip()]


class HeadError(Exception):
    """A request head that cannot be read: answer ``status``."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status


async def read_head(stream: trio.abc.Stream) -> Head | None:
    """Read and parse a request head; None if the client closed first.

    Raises:
        HeadError: malformed (400) or too large (431).
        trio.BrokenResourceError, OSError: the connection broke.

    Cancellation: propagates (the caller closes the stream).
    """
    parser = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)
    raw = bytearray()
    while True:
        try:
            event = parser.next_event()
        except h11.RemoteProtocolError as exc:
            status = exc.error_status_hint
            raise HeadError(431 if status == 431 else 400, str(exc)) from None
        if isinstance(event, h11.Request):
            break
        if event is not h11.NEED_DATA:
            return None  # ConnectionClosed: nothing to answer
        data = bytes(await stream.receive_some(4096))
        raw += data
        if len(raw) > MAX_HEAD:
            raise HeadError(431, "request head too large")
        parser.receive_data(data)
        if not data:
            continue  # h11 reports the close (or a truncated head)
    target = urlsplit(event.target.decode("latin-1"))
    headers: dict[str, str] = {}
    for name, value in event.headers:
        key = name.decode("latin-1").lower()
        text = value.decode("latin-1")
        headers[key] = f"{headers[key]}, {text}" if key in headers else text
    return Head(
        method=event.method.decode("latin-1"),
        path=target.path,
        query=dict(parse_qsl(target.query)),
        headers=headers,
        raw=bytes(raw),
    )


def http_response(
    status: int,
    body: bytes,
    *,
    content_type: str = "text/plain; charset=utf-8",
    headers: tuple[tuple[str, str], ...] = (),
) -> bytes:
    """A complete HTTP/1.1 response that closes the connection."""
    lines = [
        f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}",
        f"Date: {email.utils.formatdate(usegmt=True)}",
        f"Content-Type: {content_type}",
        f"Content-Length: {len(body)}",
        "Connection: close",
        *(f"{name}: {value}" for name, value in headers),
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


@cache
def client_script() -> bytes:
    """The JavaScript client module served at ``GET /gateway.js``."""
    return importlib.resources.files(__package__).joinpath("gateway.js").read_bytes()


class ReplayStream(trio.abc.Stream):
    """``stream`` with ``prefix`` received first (bytes already read)."""

    def __init__(self, prefix: bytes, stream: trio.abc.Stream) -> None:
        self._prefix = prefix
        self._stream = stream

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if self._prefix:
            await trio.lowlevel.checkpoint()
            size = len(self._prefix) if max_bytes is None else max_bytes
            data, self._prefix = self._prefix[:size], self._prefix[size:]
            return data
        return bytes(await self._stream.receive_some(max_bytes))

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self._stream.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self._stream.wait_send_all_might_not_block()

    async def aclose(self) -> None:
        await self._stream.aclose()
