"""Writing a gateway socket's frames (transport part).

`FrameSender` is the sending half of a `ClientConnection`: a frame is
written at once, into the socket's `Outbox`, when nothing waits before it;
otherwise it joins the connection's send queue, which a writer task
(started when needed, gone when the queue is empty) writes in batches of
frames joined into one message. A full queue, or a write over
``send_timeout``, ends the connection as a slow consumer (close 4001); a
failed write cancels the connection's work (the client is gone). The frames
dropped that way are counted (`GatewayCounters.dropped`).
"""

from __future__ import annotations

from abc import abstractmethod
from collections import deque
from contextlib import contextmanager
from typing import TYPE_CHECKING

import trio
from trio_websocket import ConnectionClosed

from ..transport._ws_connection import CONNECTION_ERRORS
from ._frames import data_frame
from ._protocol import CloseCode, join_frames

if TYPE_CHECKING:
    from collections.abc import Iterator

    from ..transport._ws_outbox import Outbox
    from ._client_info import ClientInfo
    from ._connection import MessageSocket, _Ending
    from ._definition import GatewayConfig
    from ._socket import ServerSocket
    from ._statistics import GatewayCounters

__all__ = ["FrameSender"]


class FrameSender:
    """The sending half of a gateway socket's connection (see the module
    docstring); `ClientConnection` sets its state."""

    __slots__ = ("_queue", "_together", "_writing", "frames_sent")

    ws: ServerSocket | MessageSocket
    info: ClientInfo
    ending: _Ending | None
    frames_sent: int
    _config: GatewayConfig
    _counters: GatewayCounters
    _direct: tuple[ServerSocket, Outbox] | None
    _nursery: trio.Nursery | None
    _queue: deque[bytes | str] | None
    _together: list[tuple[list[bytes | str], bytes]] | None
    """Frames held by `writing_together` (None: none are)."""
    _writing: bool

    @abstractmethod
    def end(self, code: int, reason: str) -> None:
        """Close the connection with ``code`` (its work is cancelled)."""

    @abstractmethod
    def _cancel(self) -> None:
        """Cancel the connection's work at once (the client is gone)."""

    @contextmanager
    def writing_together(self) -> Iterator[None]:
        """Hold the frames sent in the block and send them when it ends, in
        one write if nothing waits (the publications a resume missed and
        its answer, say)."""
        if self._together is not None:  # nested: the outer block sends
            yield
            return
        held: list[tuple[list[bytes | str], bytes]] = []
        self._together = held
        try:
            yield
        finally:
            self._together = None
            if len(held) == 1:
                self.send_run(*held[0])
            elif held:
                frames = [data for each in held for data in each[0]]
                self.send_run(frames, b"".join(each[1] for each in held))

    def send_encoded(self, data: bytes | str, framed: bytes | None = None) -> None:
        """Write an encoded frame now if nothing waits (over TCP: into the
        `Outbox`, synchronously), else queue it for the writer (started if
        it does not run); a full queue ends the connection (slow
        consumer). ``framed``: ``data`` as a WebSocket frame already
        (`data_frame`), when the same frame goes to many sockets."""
        if self.ending is not None:
            return  # the connection is ending: nothing more but its close
        together = self._together
        if together is not None:
            together.append(([data], data_frame(data) if framed is None else framed))
            return
        queue = self._queue
        direct = self._direct
        if not queue and direct is not None and not direct[1].backlog:
            try:
                # `_write_direct`, inlined: every reply comes here.
                ws, outbox = direct
                reason = ws.closed
                if reason is not None:
                    raise ConnectionClosed(reason)
                outbox.write_nowait(data_frame(data) if framed is None else framed)
            except CONNECTION_ERRORS:
                self._counters.dropped("socket_closed")
                self._cancel()  # the client is gone
                return
            self.frames_sent += 1
            self._counters.frames_sent += 1
            return
        if queue is None:
            queue = self._queue = deque()
        elif len(queue) >= self._config.send_queue:
            self._counters.dropped("send_queue_full")
            self.end(CloseCode.SLOW_CONSUMER, "send queue full")
            return
        queue.append(data)
        self._start_writer()

    def send_run(self, frames: list[bytes | str], framed: bytes) -> None:
        """`send_encoded` for several encoded frames, which ``framed`` has
        as WebSocket frames one after another: written in one write when
        nothing waits."""
        if self.ending is not None:
            return
        together = self._together
        if together is not None:
            together.append((frames, framed))
            return
        direct = self._direct
        if not self._queue and direct is not None and not direct[1].backlog:
            try:
                _write_direct(direct, frames[0], framed)
            except CONNECTION_ERRORS:
                self._cancel()  # the client is gone
                return
            count = len(frames)
            self.frames_sent += count
            self._counters.frames_sent += count
            return
        for data in frames:
            self.send_encoded(data)

    def _start_writer(self) -> None:
        """Start the writer unless it runs (or the connection is over: its
        close writes what the outbox holds)."""
        nursery = self._nursery
        if self._writing or nursery is None:
            return
        self._writing = True
        nursery.start_soon(self._write)

    async def _write(self) -> None:
        """Write the outbox's backlog, then what waits in the send queue
        (everything queued at once, as long as it fits in
        ``max_message_size``, as one batch); return when all is written."""
        try:
            while await self._drained():
                queue = self._queue
                if not queue:
                    return
                message, count = self._batch(queue)
                if not await self._write_one(message):
                    self._counters.dropped("socket_closed", count + len(queue))
                    return
                self.frames_sent += count
                self._counters.frames_sent += count
        finally:
            self._writing = False

    async def _drained(self) -> bool:
        """Wait, at most ``send_timeout``, until the outbox's backlog is
        written; False if that ended the connection."""
        direct = self._direct
        if direct is None:
            return True
        with trio.move_on_after(self._config.send_timeout) as waited:
            try:
                await direct[1].flush()
            except CONNECTION_ERRORS:
                self._cancel()  # the client is gone
                return False
        if waited.cancelled_caught:
            self.end(CloseCode.SLOW_CONSUMER, "write over send_timeout")
            return False
        return True

    def _batch(self, queue: deque[bytes | str]) -> tuple[bytes | str, int]:
        """Take the first frames of ``queue`` that fit in one message."""
        first = queue.popleft()
        if not queue:
            return first, 1
        limit = self._config.max_message_size - 16  # room for the list's bytes
        batch, size = [first], len(first)
        while queue and size + len(queue[0]) + 1 <= limit:
            more = queue.popleft()
            batch.append(more)
            size += len(more) + 1
        if len(batch) == 1:
            return first, 1
        return join_frames(batch, self.info.subprotocol), len(batch)

    async def _write_one(self, data: bytes | str) -> bool:
        """Write one message (within ``send_timeout``): over TCP into the
        `Outbox`, else with the socket's ``send_message``; False if that
        ended the connection (the client is gone, or too slow)."""
        direct = self._direct
        with trio.move_on_after(self._config.send_timeout) as waited:
            try:
                if direct is not None:  # `_drained` was the checkpoint
                    _write_direct(direct, data)
                else:
                    await self.ws.send_message(data)
            except CONNECTION_ERRORS:
                self._cancel()  # the client is gone
                return False
        if waited.cancelled_caught:
            self.end(CloseCode.SLOW_CONSUMER, "write over send_timeout")
            return False
        return True


def _write_direct(
    direct: tuple[ServerSocket, Outbox],
    data: bytes | str,
    framed: bytes | None = None,
) -> None:
    """Write ``data`` as one message on the socket of ``direct`` now, into
    its outbox (``framed``: ``data`` as a frame already).

    Raises:
        ConnectionClosed: the WebSocket is closed or closing.
        trio.BrokenResourceError, trio.ClosedResourceError: the stream
            failed or is closed.
    """
    ws, outbox = direct
    reason = ws.closed
    if reason is not None:  # set before a close frame is sent or handled
        raise ConnectionClosed(reason)
    outbox.write_nowait(data_frame(data) if framed is None else framed)
