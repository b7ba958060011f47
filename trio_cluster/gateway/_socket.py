"""A client's WebSocket on the gateway after its upgrade, read in the
socket's own task (Trio driver helper).

Theory of operation. The gateway answers the upgrade itself
(`_upgrade.accept_response`), so what is left of a WebSocket server is the
data phase, which `ServerSocket` does with one object and no task of its
own: the connection's task awaits `ServerSocket.read_messages`, which reads
the stream, feeds the bytes to a `FastWSConnection` and hands each message
to a callback, in that task. An idle socket is that task waiting in one
read, this object, its `FastWSConnection` and its stream: no reader task,
channel, lock or event per socket (a lock is made only for a stream whose
writes can wait: not over an `Outbox`).

What it does is what trio-websocket's server connection (0.12) does in its
data phase, event by event:

* a message (read whole by `FastWSConnection`, or in parts by wsproto) goes
  to the callback (after every 32 messages of one read, the task lets the
  other tasks run: a client's burst delays the others by 32 messages'
  work at most; after each one if the callback answers `LATER`, the
  socket being ahead of its message rate, and the next read is a short
  one); parts are joined, and a message over
  ``max_message_size`` is answered with close 1009 (``Exceeded maximum
  message size: N bytes``): the reading goes on, dropping messages, until
  the client answers the close or the connection ends;
* a ping is answered with its pong; a pong is ignored (the gateway sends no
  WebSocket pings: its heartbeats are frames, which browsers can answer);
* the client's close is answered with the same code, then the stream is
  closed; ``closed`` is the client's code and reason. A frame wsproto
  refuses (a protocol error) closes the stream without a close frame,
  ``closed`` being wsproto's code (1002, 1007...);
* the stream ending or failing first is close 1006 (abnormal).

`ServerSocket.aclose` is the server's side of the close handshake: the
close frame, then reading (messages dropped) until the client answers it or
the connection ends, then the stream is closed; for a client that broke a
rule (``unread``), the stream is shut for writing after the close frame and
what comes is discarded unparsed until the client's end. Closing raises what
trio-websocket raises (`trio_websocket.ConnectionClosed` with its
`trio_websocket.CloseReason`), so the gateway handles its sockets, the ASGI
server's and the network's failures alike.
"""

from __future__ import annotations

from contextlib import suppress
from typing import TYPE_CHECKING, Any, Final

import trio
from trio_websocket import CloseReason, ConnectionClosed
from wsproto.connection import ConnectionState
from wsproto.events import (
    BytesMessage,
    CloseConnection,
    Event,
    Message,
    Ping,
    TextMessage,
)

from ..transport._ws_outbox import Outbox
from ._frames import FastWSConnection

if TYPE_CHECKING:
    from collections.abc import Callable

__all__ = ["LATER", "MORE", "STOP", "ServerSocket"]

STOP: Final = 0
"""`ServerSocket.read_messages`' callback wants no more messages (later
ones are read and dropped)."""
MORE: Final = 1
"""... wants the next message at once."""
LATER: Final = 2
"""... wants the next message once the other tasks ready to run have run
(the socket is ahead of its message rate): then its reads are short ones
(`_BEHIND_SIZE`), until it is not."""

_RECEIVE_SIZE: Final = 65536
"""Bytes read at most at once (trio-websocket's default)."""
_BEHIND_SIZE: Final = 2048
"""... by a socket ahead of its message rate (the bytes read are parsed in
one step: a flooding client's read is a short one)."""
_MAX_FAST_FRAME: Final = 1 << 16
"""Larger frames are read by wsproto, as they arrive (`FastWSConnection`)."""
_REMOTE_CLOSING: Final = ConnectionState.REMOTE_CLOSING
_CLOSED: Final = ConnectionState.CLOSED
"""Module constants: read per read (see `_frames._OPEN`)."""
_PAYLOADS: Final = (bytes, str)
"""What `FastWSConnection.take_events` gives for a whole message."""
_wait_readable: Final = trio.lowlevel.wait_readable
_checkpoint: Final = trio.lowlevel.checkpoint
_yield: Final = trio.lowlevel.cancel_shielded_checkpoint
_FAIR_SHARE: Final = 32
"""Messages of one read delivered before the reader lets others run."""
_ABNORMAL: Final = 1006
_TOO_BIG: Final = 1009


class ServerSocket:
    """A server WebSocket whose upgrade was answered (see the module
    docstring).

    Args:
        stream: the connection (an `Outbox` over TCP: writes never wait).
        trailing_data: the bytes read after the request head.
        max_message_size: the largest message read (larger: close 1009).
    """

    # A gateway holds tens of thousands of these: no per-instance dict.
    __slots__ = (
        "_lock",
        "_max_message_size",
        "_outbox",
        "_parts",
        "_size",
        "_stream",
        "_wsproto",
        "closed",
    )

    def __init__(
        self,
        stream: trio.abc.Stream,
        *,
        trailing_data: bytes = b"",
        max_message_size: int,
    ) -> None:
        self._stream = stream
        self._outbox = stream if isinstance(stream, Outbox) else None
        self._wsproto = FastWSConnection(
            trailing_data, max_frame=min(max_message_size, _MAX_FAST_FRAME)
        )
        self._max_message_size = max_message_size
        self._lock: trio.StrictFIFOLock | None = None
        """Serializes writes that can wait (made at the first one)."""
        self._parts: list[bytes | str] | None = None
        """The parts of a message wsproto reads in parts (None: none)."""
        self._size = 0
        self.closed: CloseReason | None = None
        """Why the socket is closed or closing; None while it is open (what
        trio-websocket's ``closed`` says)."""

    async def read_messages(self, deliver: Callable[[bytes | str], int]) -> None:
        """Read the socket until it closes, in the calling task: each
        message goes to ``deliver``, which returns `MORE`, `LATER` (the
        other ready tasks run before the next message, and the next read is
        a short one) or `STOP` when it wants no more (later messages are
        read and dropped). Pings are answered, the client's close too (then
        the stream is closed); see the module docstring.

        Cancellation: stops reading (the socket stays as it is; see
        `aclose`).
        """
        connection = self._wsproto
        stream = self._stream
        outbox = self._outbox
        emptied = True
        """Whether the last read emptied the socket (over an `Outbox`)."""
        size = _RECEIVE_SIZE
        while True:
            delivered = 0
            for event in connection.take_events():
                if isinstance(event, _PAYLOADS):
                    # A whole message read by `FastWSConnection` (never
                    # amid a message in parts).
                    state = deliver(event)
                    if state != MORE:
                        if state == LATER:
                            delivered = 0
                            size = _BEHIND_SIZE
                            await _yield()
                            continue
                        deliver = _drop
                    delivered += 1
                    if delivered == _FAIR_SHARE:
                        # A read with many messages (a burst): let the other
                        # sockets' readers run between every `_FAIR_SHARE`
                        # (no cancellation here: it comes at the next read).
                        delivered = 0
                        await _yield()
                elif isinstance(event, Message):
                    message = self._join(event)
                    if message is None:
                        continue
                    if isinstance(message, int):  # over max_message_size
                        if not await self._too_big():
                            return
                        deliver = _drop  # until the client answers the close
                    else:
                        state = deliver(message)
                        if state == LATER:
                            size = _BEHIND_SIZE
                            await _yield()
                        elif state != MORE:
                            deliver = _drop
                elif not await self._control(event):
                    return
            try:
                if outbox is None:
                    received = await stream.receive_some(size)
                    size = _RECEIVE_SIZE
                else:
                    # `Outbox.receive_some`, inline: an idle socket waits
                    # with one coroutine fewer, and makes one fewer per read.
                    # The last read emptied the socket: most likely nothing
                    # came since, so wait first (the wait is the schedule
                    # point).
                    if emptied:
                        await _wait_readable(outbox.fd)
                    else:
                        await _checkpoint()
                    data = outbox.receive_nowait(size)
                    while data is None:
                        await _wait_readable(outbox.fd)
                        data = outbox.receive_nowait(size)
                    received = data
                    emptied = len(data) < size
                    size = _RECEIVE_SIZE
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                self._abort()
                return
            if not received:  # TCP closed (before the WebSocket: abnormal)
                if connection.state is not _CLOSED:
                    self._abort()
                return
            if connection.state is not _CLOSED:
                connection.receive_data(received)  # type: ignore[arg-type]

    async def _too_big(self) -> bool:
        """Close 1009 for a message over ``max_message_size``; False if the
        stream failed."""
        reason = f"Exceeded maximum message size: {self._max_message_size} bytes"
        self.closed = CloseReason(_TOO_BIG, reason)
        return await self._send_event(CloseConnection(code=_TOO_BIG, reason=reason))

    async def _control(self, event: Event) -> bool:
        """Handle a control event wsproto read; False once reading is over."""
        if isinstance(event, CloseConnection):
            # The client's close (answered), the answer to ours, or a
            # protocol error (no close frame): the stream is closed. The
            # reason is the client's (or wsproto's), but a 1009 sent for a
            # message too big stays (the socket's close is counted by it).
            closed = self.closed
            if closed is None or closed.code != _TOO_BIG:
                self.closed = CloseReason(event.code, event.reason or None)
            if self._wsproto.state is _REMOTE_CLOSING:
                await self._send_event(event.response())
            await self._close_stream()
            return False
        if isinstance(event, Ping):
            return await self._send_event(event.response())
        return True  # a pong: nothing waits for one

    def _join(self, event: Message[Any]) -> bytes | str | int | None:
        """A message wsproto read (in parts): the whole message once its
        last part is in, None before, its size so far once that is over
        ``max_message_size`` (the parts are dropped)."""
        data = event.data
        size = self._size + len(data)
        if size > self._max_message_size:
            self._parts = None
            self._size = 0
            return size
        if event.message_finished and self._parts is None:
            return bytes(data) if isinstance(data, bytearray) else data
        parts = self._parts
        if parts is None:
            parts = self._parts = []
        parts.append(bytes(data) if isinstance(data, bytearray) else data)
        self._size = size
        if not event.message_finished:
            return None
        self._parts = None
        self._size = 0
        if isinstance(event, BytesMessage):
            return b"".join(parts)  # type: ignore[arg-type]
        assert isinstance(event, TextMessage)
        return "".join(parts)  # type: ignore[arg-type]

    async def send_message(self, message: bytes | str) -> None:
        """Write ``message`` as one frame (binary for bytes, text for a
        string). Over an `Outbox` it never waits for the client.

        Raises:
            ConnectionClosed: the socket is closed or closing (or the stream
                failed: then it is closed, 1006).

        Cancellation: nothing was written.
        """
        if self.closed is not None:
            raise ConnectionClosed(self.closed)
        if isinstance(message, str):
            event: Message[Any] = TextMessage(data=message)
        elif isinstance(message, bytes):
            event = BytesMessage(data=message)
        else:
            raise TypeError("message must be str or bytes")
        await self._write(self._wsproto.send(event))

    async def aclose(
        self, code: int = 1000, reason: str | None = None, *, unread: bool = False
    ) -> None:
        """Close the socket: the close frame with ``code`` and ``reason``,
        then read (dropping messages) until the client answers it or the
        connection ends; the stream is closed then. Does nothing more if the
        socket is closed or closing already (the stream is closed).

        ``unread``: for a client that broke a rule (a flood, say), what it
        sends after the close frame is not parsed: the stream is shut for
        writing after the close frame (the client reads its end), then what
        comes is read and discarded whole until the client closes its side.

        Cancellation: the stream is closed at once.
        """
        try:
            if self.closed is None:
                # As trio-websocket says, until the client's answer (none is
                # read after a close ``unread``: ours, then).
                self.closed = (
                    CloseReason(code, reason) if unread else CloseReason(1000, None)
                )
                await self._write(
                    self._wsproto.send(CloseConnection(code=code, reason=reason))
                )
                if unread:
                    await self._discard()
                else:
                    await self.read_messages(_drop)
            else:
                await trio.lowlevel.checkpoint()
        except ConnectionClosed:
            pass  # the stream failed
        finally:
            await self._close_stream()

    async def _discard(self) -> None:
        """Shut the stream for writing, then read and drop what comes until
        its end (a read per `_RECEIVE_SIZE` bytes, nothing per message)."""
        stream = self._stream
        try:
            if isinstance(stream, trio.abc.HalfCloseableStream):
                await stream.send_eof()
            while await stream.receive_some(_RECEIVE_SIZE):
                pass
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the connection is gone: nothing more to drop

    async def _send_event(self, event: Event) -> bool:
        """Write ``event``; False if the stream failed (the socket is
        closed, 1006)."""
        try:
            await self._write(self._wsproto.send(event))
        except ConnectionClosed:
            return False
        return True

    async def _write(self, data: bytes) -> None:
        """Write ``data`` (over an `Outbox`, at once).

        Raises:
            ConnectionClosed: the stream failed or is closed (the socket is
                closed, 1006).
        """
        try:
            outbox = self._outbox
            if outbox is not None:
                await trio.lowlevel.checkpoint_if_cancelled()
                outbox.write_nowait(data)
                await trio.lowlevel.cancel_shielded_checkpoint()
                return
            lock = self._lock
            if lock is None:
                lock = self._lock = trio.StrictFIFOLock()
            async with lock:
                await self._stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            self._abort()
            assert self.closed is not None
            raise ConnectionClosed(self.closed) from None

    def _abort(self) -> None:
        """The stream ended or failed before the close handshake: closed,
        1006 (unless a reason is known already)."""
        if self.closed is None:
            self.closed = CloseReason(_ABNORMAL, None)

    async def _close_stream(self) -> None:
        """Close the stream (an `Outbox` writes its backlog out first).

        Cancellation: the stream is closed at once.
        """
        with suppress(trio.BrokenResourceError):  # the connection is gone
            await self._stream.aclose()


def _drop(message: bytes | str) -> int:
    return STOP
