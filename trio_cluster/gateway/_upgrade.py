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
and a task that waits for its messages. The loop is trio-websocket's
(``_reader_task``), with one shortcut: a whole message `FastWSConnection`
read goes straight to the callback as its payload (what trio-websocket's
handler would do with it, without an event object, a coroutine per message
and a debug log call per event and read); every other event goes to
trio-websocket's own handler. `close_websocket` sends the close
frame and reads until the client's answer (a reader task for that moment
only).

trio-websocket keeps these parts private: `read_messages` names the
attributes the reader sends messages to (``_send_channel``) and the state
its loop reads and calls (``_reader_running``, ``_message_parts``, the
``_handle_*`` methods...); `server_websocket` drops, for a server socket
whose handshake is done, the structures trio-websocket makes for a handshake
still to come and for ``get_message`` (which the gateway does not call).
The version is pinned below 0.13 (``setup.cfg``), and the tests run these
paths.
"""

from __future__ import annotations

import base64
import binascii
import logging
from typing import TYPE_CHECKING, Any, Final, Self

import trio
from trio_websocket import ConnectionClosed, WebSocketConnection
from wsproto.connection import ConnectionState
from wsproto.events import (
    BytesMessage,
    CloseConnection,
    Ping,
    Pong,
    RejectData,
    TextMessage,
)
from wsproto.utilities import RemoteProtocolError, generate_accept_token

from ._frames import FastWSConnection

if TYPE_CHECKING:
    from collections.abc import Callable, Coroutine

    from ._http import Head

log = logging.getLogger("trio_cluster.gateway")

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
_CLOSED: Final = ConnectionState.CLOSED
"""A module constant: read per message (see `_frames._OPEN`)."""
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

    __slots__ = ("deliver", "stopped")

    def __init__(self, deliver: Callable[[bytes | str], bool]) -> None:
        self.deliver = deliver
        self.stopped = False

    async def send(self, message: bytes | str) -> None:
        if not self.stopped and not self.deliver(message):
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
    tap = _Tap(deliver)
    ws._send_channel = tap  # type: ignore[assignment]
    return _reader_loop(ws, tap)


_PAYLOADS: Final = (bytes, str)
"""What `FastWSConnection.take_events` gives for a whole message (a tuple:
the test runs per message, and ``bytes | str`` would be built each time)."""

_HANDLERS: Final[
    dict[type[Any], Callable[[WebSocketConnection, Any], Coroutine[Any, Any, None]]]
] = {
    BytesMessage: WebSocketConnection._handle_message_event,
    TextMessage: WebSocketConnection._handle_message_event,
    CloseConnection: WebSocketConnection._handle_close_connection_event,
    Ping: WebSocketConnection._handle_ping_event,
    Pong: WebSocketConnection._handle_pong_event,
    RejectData: WebSocketConnection._handle_reject_data_event,
}
"""trio-websocket's handler of each event a server socket whose handshake is
done can read (one table: trio-websocket's loop makes one per socket)."""


async def _reader_loop(ws: WebSocketConnection, tap: _Tap) -> None:
    """trio-websocket's ``_reader_task`` (0.12) for a server socket whose
    handshake is done, with the shortcut for whole data messages (see the
    module docstring). One function, as trio-websocket's: a socket's task
    idles in it."""
    connection = ws._wsproto
    assert isinstance(connection, FastWSConnection), "made by server_websocket"
    stream = ws._stream
    async with tap:
        while ws._reader_running:
            for event in connection.take_events():
                if isinstance(event, _PAYLOADS):
                    # A whole message read by `FastWSConnection` (never
                    # amid a message in parts): what `_handle_message_event`
                    # and `_Tap.send` would do with it.
                    if not tap.stopped and not tap.deliver(event):
                        tap.stopped = True
                    continue
                kind = type(event)
                handler = _HANDLERS.get(kind)
                if handler is None:  # pragma: no cover - no other event here
                    log.warning("%s received an unknown event: %r", ws, kind)
                    continue
                try:
                    await handler(ws, event)
                except ConnectionClosed:
                    ws._reader_running = False
                    break
            try:
                received = await stream.receive_some(ws._receive_buffer_size)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                await ws._abort_web_socket()
                break
            if not received:  # TCP closed (before the WebSocket: abnormal)
                if connection.state != _CLOSED:
                    await ws._abort_web_socket()
                break
            if connection.state != _CLOSED:
                try:
                    connection.receive_data(received)  # type: ignore[arg-type]
                except RemoteProtocolError as err:
                    if err.event_hint:
                        await ws._send(err.event_hint)
                    await ws._close_stream()


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
