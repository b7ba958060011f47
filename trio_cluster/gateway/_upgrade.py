"""The WebSocket upgrade answered by the gateway itself, and a socket read
in its own task (Trio driver helper).

Theory of operation. The gateway reads and parses the request head itself
(`read_head`) to refuse cheaply. It also checks the head's WebSocket fields
(RFC 6455 §4.2.1, the checks wsproto makes: `upgrade_refusal`) and writes the
``101 Switching Protocols`` answer (`accept_response`), then wraps the stream
in a trio-websocket `WebSocketConnection` whose wsproto object starts open:
a `FastWSConnection` over wsproto's low-level `Connection`, meant for
handshakes done elsewhere (`server_websocket`). So the head is parsed once,
no HTTP state is kept for the socket's life, and plain data frames are read
and written without wsproto's general machinery.

`read_messages` runs trio-websocket's reader loop in the calling task (the
socket's own task), and hands every message to a callback there: a socket
has one task, which reads, parses and dispatches, instead of a reader task
and a task that waits for its messages. `close_websocket` sends the close
frame and reads until the client's answer (a reader task for that moment
only).

trio-websocket keeps these parts private: `read_messages` names the
attributes the reader sends messages to (``_send_channel``) and the loop
itself (``_reader_task``); `server_websocket` drops, for a server socket
whose handshake is done, the structures trio-websocket makes for a handshake
still to come and for ``get_message`` (which the gateway does not call).
The version is pinned below 0.13 (``setup.cfg``), and the tests run these
paths.
"""

from __future__ import annotations

import base64
import binascii
from typing import TYPE_CHECKING, Any, Final, Self

import trio
from trio_websocket import WebSocketConnection
from wsproto.utilities import generate_accept_token

from ._frames import FastWSConnection

if TYPE_CHECKING:
    from collections.abc import Callable, Coroutine

    from ._http import Head

__all__ = [
    "Refusal",
    "accept_response",
    "close_websocket",
    "read_messages",
    "server_websocket",
    "upgrade_refusal",
]

Refusal = tuple[int, str, tuple[tuple[str, str], ...]]
"""An HTTP status, its reason text and extra headers."""

_VERSION: Final = "13"
_MAX_FAST_FRAME: Final = 1 << 16
"""Larger frames are read by wsproto, as they arrive (`FastWSConnection`)."""


def upgrade_refusal(head: Head) -> Refusal | None:
    """Why ``head`` (a ``GET`` with ``Upgrade: websocket``) cannot be
    upgraded, as wsproto would refuse it; None if it can."""
    headers = head.headers
    tokens = {
        token.strip().lower() for token in headers.get("connection", "").split(",")
    }
    if "upgrade" not in tokens:
        return 400, "missing header 'Connection: Upgrade'", ()
    version = headers.get("sec-websocket-version")
    if version != _VERSION:
        status = 426 if version else 400
        return (
            status,
            "Sec-WebSocket-Version must be 13",
            (("Sec-WebSocket-Version", _VERSION),),
        )
    key = headers.get("sec-websocket-key")
    if key is None or not _valid_key(key):
        return 400, "missing or invalid header 'Sec-WebSocket-Key'", ()
    if "host" not in headers:
        return 400, "missing header 'Host'", ()
    return None


def _valid_key(key: str) -> bool:
    try:
        return len(base64.b64decode(key.strip(), validate=True)) == 16
    except (binascii.Error, ValueError):
        return False


def accept_response(head: Head, subprotocol: str) -> bytes:
    """The ``101`` answer to ``head`` (which passed `upgrade_refusal`)."""
    token = generate_accept_token(head.headers["sec-websocket-key"].strip().encode())
    return (
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
        b"Connection: Upgrade\r\nSec-WebSocket-Accept: " + token + b"\r\n"
        b"Sec-WebSocket-Protocol: " + subprotocol.encode("ascii") + b"\r\n\r\n"
    )


def head_rest(head: Head) -> bytes:
    """The bytes read after the request head (frames the client sent right
    behind its upgrade request)."""
    end = head.raw.find(b"\r\n\r\n")
    return b"" if end < 0 else head.raw[end + 4 :]


def server_websocket(
    stream: trio.abc.Stream,
    *,
    trailing_data: bytes,
    subprotocol: str,
    path: str,
    max_message_size: int,
) -> WebSocketConnection:
    """A trio-websocket server connection over ``stream``, whose upgrade
    was answered (`accept_response`); ``trailing_data`` are the bytes that
    followed the request head. Read it with `read_messages`, never with
    ``get_message``."""
    ws = WebSocketConnection(
        stream,
        FastWSConnection(
            trailing_data, max_frame=min(max_message_size, _MAX_FAST_FRAME)
        ),
        message_queue_size=0,
        max_message_size=max_message_size,
    )
    ws._subprotocol = subprotocol
    ws._path = path
    # A server whose handshake is done never waits for a proposal or the
    # opening handshake, and its messages go to the tap (`read_messages`):
    # these would live as long as the socket for nothing.
    ws._connection_proposal = None
    ws._open_handshake = _DONE
    ws._for_testing_peer_closed_connection = _DONE
    ws._send_channel = ws._recv_channel = _NO_CHANNEL  # type: ignore[assignment]
    return ws


class _NoChannel:
    """trio-websocket's message channel once the gateway takes messages
    directly: closing it (when the socket closes) does nothing, and
    ``get_message`` says the socket is closed."""

    __slots__ = ()

    async def receive(self) -> Any:
        await trio.lowlevel.checkpoint()
        raise trio.EndOfChannel

    async def aclose(self) -> None:
        await trio.lowlevel.checkpoint()


_NO_CHANNEL: Final = _NoChannel()
_DONE: Final = trio.Event()
_DONE.set()


class _Tap:
    """Stands for trio-websocket's message channel while `read_messages`
    runs: its reader awaits `send` for each message."""

    __slots__ = ("_deliver", "stopped")

    def __init__(self, deliver: Callable[[bytes | str], bool]) -> None:
        self._deliver = deliver
        self.stopped = False

    async def send(self, message: bytes | str) -> None:
        if not self.stopped and not self._deliver(message):
            self.stopped = True

    async def aclose(self) -> None:
        self.stopped = True
        await trio.lowlevel.checkpoint()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()


def read_messages(
    ws: WebSocketConnection, deliver: Callable[[bytes | str], bool]
) -> Coroutine[Any, Any, None]:
    """``ws``'s reader (trio-websocket's loop), for the caller to await in
    its own task: until the socket closes, each message goes to
    ``deliver``, which returns False once the connection ends (later
    messages are dropped). It is returned, not wrapped: an idle socket's
    task waits in a chain of frames one shorter.

    Cancellation: stops reading (the socket stays as it is; see
    `close_websocket`).
    """
    ws._send_channel = _Tap(deliver)  # type: ignore[assignment]
    return ws._reader_task()


async def close_websocket(ws: WebSocketConnection, code: int, reason: str) -> None:
    """Send the close frame with ``code`` and ``reason``, and read (dropping
    messages) until the client answers it or closes the connection.

    Cancellation: stops waiting (the caller closes the stream).
    """
    if ws.closed is not None:
        await trio.lowlevel.checkpoint()
        return
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_read_dropping, ws)
        await ws.aclose(code, reason)
        nursery.cancel_scope.cancel()


async def _read_dropping(ws: WebSocketConnection) -> None:
    await read_messages(ws, _drop)


def _drop(message: bytes | str) -> bool:
    return False
