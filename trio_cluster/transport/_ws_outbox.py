"""`Outbox`: a TCP stream whose writes never wait for the network (Trio
driver of the transport edge).

Theory of operation. trio-websocket writes each WebSocket frame with one
``send_all`` on its stream, under its own lock. Over a plain `trio.SocketStream`
that ``send_all`` waits whenever the kernel's send buffer is full, and a
cancellation while it waits leaves half a frame on the wire: the connection
is then broken for every caller. `Outbox` sits between trio-websocket and the
socket and writes differently:

* ``send_all`` writes what the kernel takes at once (a non-blocking
  ``send``), keeps the rest in a *backlog*, and returns: it never waits for
  the peer. While a backlog exists, later data is appended to it, so bytes
  leave in the order they were given.
* the *flusher* waits until the socket is writable and writes the backlog
  out: one task per stream (`Outbox.flush_forever`, in the connection's
  nursery), or a task its owner starts when a backlog begins
  (``on_backlog``, then `Outbox.flush`), so that an idle stream has no task
  of its own (the gateway's sockets).

So a frame is never cut by a cancellation, and any task may send a frame
itself, even one that must never wait for the peer (a connection's reader):
`write_message` writes one synchronously.
Bounding the backlog is the sender's business: `Outbox.backlog` says how
many bytes wait, and `Outbox.wait_drained` waits until none do (the
connection's writer task waits there before each frame; a task sending on
its own does so only when nothing waits).

A failed write (the peer reset the connection) is kept and raised as
`trio.BrokenResourceError` by every later ``send_all``; the reader sees the
connection end in its own way.
"""

from __future__ import annotations

import errno
import os
from collections import deque
from typing import TYPE_CHECKING, Final

import trio
from trio_websocket import ConnectionClosed
from wsproto import WSConnection
from wsproto.events import BytesMessage, TextMessage

if TYPE_CHECKING:
    from collections.abc import Callable

    from trio_websocket import WebSocketConnection

__all__ = ["Outbox", "can_write_message", "open_outbox", "outbox_of", "write_message"]

_WOULD_BLOCK: Final = frozenset((errno.EAGAIN, errno.EWOULDBLOCK))
_RECEIVE_SIZE: Final = 65536
"""Bytes read at most when the caller does not say."""


class Outbox(trio.abc.HalfCloseableStream):
    """A `trio.SocketStream` with non-waiting writes (see the module
    docstring). Reads go to the socket stream unchanged.

    Args:
        stream: the socket stream.
        on_backlog: called (synchronously) each time a backlog starts, for
            an owner that flushes on demand (`flush`) instead of running
            `flush_forever`.

    An idle outbox holds no buffer and no event: a server with many idle
    sockets pays for the backlog's structures only while one exists.
    """

    __slots__ = (
        "_backlog",
        "_closed",
        "_drained",
        "_failure",
        "_fd",
        "_flushing",
        "_held",
        "_queued",
        "_read_all",
        "backlog",
        "on_backlog",
        "stream",
    )

    def __init__(
        self,
        stream: trio.SocketStream,
        *,
        on_backlog: Callable[[], object] | None = None,
    ) -> None:
        self.stream = stream
        self._fd = stream.socket.fileno()
        self._backlog: deque[memoryview] | None = None
        """The bytes not written yet (None: none)."""
        self.backlog = 0
        """Bytes given to `send_all` and not written yet."""
        self.on_backlog = on_backlog
        self._failure: BaseException | None = None
        self._closed = False
        self._flushing = False
        self._read_all = False
        """Whether the last read took less than it asked (the socket was
        emptied)."""
        self._queued: trio.Event | None = None
        """`flush_forever` waits on it for a backlog (None: it does not)."""
        self._drained: trio.Event | None = None
        """Set when the current backlog is written (None: no backlog yet)."""
        self._held: bytes | None = None
        """Bytes to go out in front of the next write (`hold_nowait`)."""

    def _write(self, data: memoryview) -> int:
        """Write what the kernel takes now; return how much that was.

        Raises:
            OSError: the socket failed (not for a full buffer).
        """
        try:
            return os.write(self._fd, data)
        except BlockingIOError:
            return 0
        except OSError as exc:
            if exc.errno in _WOULD_BLOCK:  # pragma: no cover - BlockingIOError
                return 0
            raise

    def _check(self) -> None:
        if self._closed:
            raise trio.ClosedResourceError("the stream is closed")
        if self._failure is not None:
            raise trio.BrokenResourceError(
                f"the connection failed: {self._failure}"
            ) from self._failure

    def write_nowait(self, data: bytes | bytearray | memoryview) -> None:
        """Write ``data``, or keep what the kernel did not take in the backlog
        (after what is there already).

        Raises:
            trio.ClosedResourceError: the stream is closed.
            trio.BrokenResourceError: a write failed (now or before).
        """
        if self._closed or self._failure is not None:
            self._check()
        held = self._held
        if held is not None:
            self._held = None
            data = held + data
        backlog = self._backlog
        if backlog is not None:
            backlog.append(memoryview(data))
            self.backlog += len(data)
            return
        try:
            sent = os.write(self._fd, data)
        except BlockingIOError:
            sent = 0
        except OSError as exc:
            self._failure = exc
            raise trio.BrokenResourceError(f"the connection failed: {exc}") from exc
        if sent == len(data):
            return
        rest = memoryview(data)[sent:]
        self._backlog = deque((rest,))
        self.backlog = len(rest)
        self._drained = trio.Event()
        if self._queued is not None:  # flush_forever waits: it writes it
            self._flushing = True
            self._queued.set()
        if self.on_backlog is not None:
            self.on_backlog()

    def hold_nowait(self, data: bytes) -> None:
        """Keep ``data`` to be written in front of the next write (the
        upgrade's answer and the first frame go out in one write: one
        system call, one wake-up of the peer). Nothing is written if nothing
        follows but the close.

        Raises:
            trio.ClosedResourceError: the stream is closed.
            trio.BrokenResourceError: a write failed before.
        """
        if self._closed or self._failure is not None:
            self._check()
        self._held = data if self._held is None else self._held + data

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        """See `write_nowait`. Cancelled: nothing was written.

        Only trio-websocket calls this, under its lock, whose acquisition is
        already a schedule point: this one is a cancellation point only (a
        second pass through the scheduler per frame would cost as much as
        the write).

        Raises:
            trio.ClosedResourceError: the stream is closed.
            trio.BrokenResourceError: a write failed (now or before).
        """
        await trio.lowlevel.checkpoint_if_cancelled()
        self.write_nowait(data)

    async def send_eof(self) -> None:
        """Write what is held and the backlog out, then shut the socket for
        writing: the peer reads the end of the stream after everything sent
        (`trio.SocketStream.send_eof`, once nothing waits). Reading goes on.

        Raises:
            trio.BrokenResourceError: a write failed (now or before).
            trio.ClosedResourceError: the stream is closed.

        Cancellation: safe (the socket is not shut; the backlog stays).
        """
        if self._held is not None:
            self.write_nowait(b"")
        await self.flush()
        await self.stream.send_eof()

    async def wait_drained(self) -> None:
        """Wait until the backlog is written (returns at once if it is).

        Raises:
            trio.BrokenResourceError: a write failed.
            trio.ClosedResourceError: the stream was closed.

        Cancellation: safe.
        """
        if self.backlog and self._drained is not None:
            await self._drained.wait()
        else:
            await trio.lowlevel.checkpoint()
        self._check()

    async def wait_send_all_might_not_block(self) -> None:
        await self.wait_drained()

    async def flush_forever(self) -> None:
        """The flusher: write the backlog whenever there is one, until the
        stream is closed or fails. Cancellation: stops (the backlog stays)."""
        try:
            while not self._closed and self._failure is None:
                if not self.backlog:
                    self._queued = trio.Event()
                    await self._queued.wait()  # write_nowait claims the backlog
                    self._queued = None
                elif not self._flushing:
                    self._flushing = True
                else:  # another task writes it: wait for the next one
                    await self.wait_drained()
                    continue
                await self._flush()
        except trio.ClosedResourceError:
            pass  # the socket was closed while the flusher waited
        finally:
            self._queued = None
            if self._drained is not None:
                self._drained.set()

    async def flush(self) -> None:
        """Write the backlog out (returns at once if there is none), for
        an owner that flushes on demand; if another task writes it, wait
        for that.

        Raises:
            trio.BrokenResourceError: a write failed (now or before).
            trio.ClosedResourceError: the stream is or was closed.

        Cancellation: safe (what is not written stays in the backlog).
        """
        if self._flushing or not self.backlog:
            await self.wait_drained()
            return
        self._flushing = True
        await self._flush()
        self._check()

    async def _flush(self) -> None:
        """Write the backlog out; the caller set ``_flushing`` (it alone
        waits on the socket)."""
        backlog = self._backlog
        try:
            while backlog:
                await trio.lowlevel.wait_writable(self._fd)
                view = backlog[0]
                try:
                    sent = self._write(view)
                except OSError as exc:
                    self._failure = exc
                    break
                self.backlog -= sent
                if sent == len(view):
                    backlog.popleft()
                else:
                    backlog[0] = view[sent:]
        finally:
            self._flushing = False
        if not backlog:
            self._backlog = None
        if self._drained is not None:
            self._drained.set()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        """What `trio.SocketStream.receive_some` does, reading the socket
        directly (a waiting reader holds a shorter chain of frames: the
        gateway has one per socket).

        Raises:
            trio.ClosedResourceError: the stream is closed.
            trio.BrokenResourceError: the connection failed.
        """
        size = _RECEIVE_SIZE if max_bytes is None else max_bytes
        if size < 1:
            raise ValueError("max_bytes must be >= 1")
        waited = False
        if self._read_all:
            # The last read emptied the socket: most likely nothing came
            # since, so wait first (a read now would cost a system call to
            # learn that). The wait is the cancellation point.
            await trio.lowlevel.wait_readable(self._fd)
            waited = True
        else:
            await trio.lowlevel.checkpoint_if_cancelled()
        while True:
            if self._closed:
                raise trio.ClosedResourceError("the stream is closed")
            data = self._read(size)
            if data is not None:
                break
            # Not inside an except clause: a socket idles here, and an
            # exception kept while waiting would keep its traceback alive.
            await trio.lowlevel.wait_readable(self._fd)
            waited = True
        self._read_all = len(data) < size
        if not waited:  # data was there at once: a schedule point all the same
            await trio.lowlevel.cancel_shielded_checkpoint()
        return data

    @property
    def fd(self) -> int:
        """The socket's file descriptor (to wait on, `receive_nowait`)."""
        return self._fd

    def receive_nowait(self, max_bytes: int) -> bytes | None:
        """What the socket has now, at most ``max_bytes`` (``b""``: the
        peer closed the connection); None if nothing yet: then wait until
        `fd` is readable. For a reader that waits itself (the gateway's
        sockets: `receive_some` without a coroutine per read).

        Raises:
            trio.ClosedResourceError: the stream is closed.
            trio.BrokenResourceError: the connection failed.
        """
        if self._closed:
            raise trio.ClosedResourceError("the stream is closed")
        return self._read(max_bytes)

    def _read(self, size: int) -> bytes | None:
        """What the socket has now (None: nothing yet).

        Raises:
            trio.ClosedResourceError: the stream is closed.
            trio.BrokenResourceError: the connection failed.
        """
        try:
            return os.read(self._fd, size)
        except BlockingIOError:
            return None
        except OSError as exc:
            if self._closed:
                raise trio.ClosedResourceError("the stream is closed") from None
            raise trio.BrokenResourceError(f"the connection failed: {exc}") from exc

    async def aclose(self) -> None:
        """Write the backlog out (until cancelled), then close the socket.

        Cancellation: the socket is closed at once, the backlog dropped.
        """
        if self._closed:
            await trio.lowlevel.checkpoint()
            return
        try:
            if self.backlog and self._failure is None:
                await self.flush()  # or wait for the task flushing it
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # closing anyway
        finally:
            self._closed = True
            self._backlog = None
            self.backlog = 0
            if self._drained is not None:
                self._drained.set()
            if self._queued is not None:
                self._queued.set()
            await self.stream.aclose()


def open_outbox(nursery: trio.Nursery, stream: trio.abc.Stream) -> trio.abc.Stream:
    """``stream`` as an `Outbox` with its flusher running in ``nursery``, if
    it is a plain TCP stream; any other stream (TLS) unchanged."""
    if not isinstance(stream, trio.SocketStream):
        return stream
    outbox = Outbox(stream)
    nursery.start_soon(outbox.flush_forever)
    return outbox


def outbox_of(ws: WebSocketConnection) -> Outbox | None:
    """The `Outbox` ``ws`` writes to, if `open_outbox` made one.

    trio-websocket keeps its stream private: this reads the attribute its
    reader and writer use.
    """
    stream = getattr(ws, "_stream", None)
    return stream if isinstance(stream, Outbox) else None


def can_write_message(ws: WebSocketConnection) -> bool:
    """Whether `write_message` can write on ``ws``: trio-websocket keeps its
    wsproto object private, and one that names it otherwise has none that
    this finds (then only its ``send_message`` writes)."""
    return isinstance(getattr(ws, "_wsproto", None), WSConnection)


def write_message(
    ws: WebSocketConnection, outbox: Outbox, message: bytes | str
) -> None:
    """Write ``message`` as one binary (text, for a ``str``) WebSocket
    message on ``ws`` (whose stream is ``outbox``) now, from the calling
    task, without trio-websocket's
    ``send_message``: its frame is made by the connection's wsproto object
    and handed to `Outbox.write_nowait`, with no lock and no checkpoint.

    Why this is sound: a data message is one whole frame (no extension is
    negotiated, nothing is fragmented), so frames written this way and by
    trio-websocket (pings, pongs, the close frame) may interleave only as
    whole frames; wsproto refuses a message after a close frame was made.

    Raises:
        ConnectionClosed: the WebSocket is closed or closing.
        wsproto.utilities.LocalProtocolError: it is closing (wsproto's
            state).
        trio.BrokenResourceError, trio.ClosedResourceError: the stream
            failed or is closed.
    """
    reason = ws.closed
    if reason is not None:
        raise ConnectionClosed(reason)
    event = (
        BytesMessage(data=message)
        if isinstance(message, bytes)
        else TextMessage(data=message)
    )
    outbox.write_nowait(ws._wsproto.send(event))
