"""`Tap`: a WebSocket connection's messages handled in trio-websocket's own
reader task (Trio driver of the transport edge).

Theory of operation. trio-websocket's reader task parses what arrives and
puts each message in a memory channel, which
`WebSocketConnection.get_message` reads: a connection whose reader task
reads that channel pays a pass through the scheduler per message (the
reader task wakes, handles the message, then wakes the caller waiting for
it). A `Tap` stands in for the channel's sending end: trio-websocket's
reader awaits `Tap.send`, which hands the message to the connection at once,
in that task. The channel still tells the end of the connection:
trio-websocket closes it (`Tap.aclose`) when the WebSocket closes, and
``get_message`` then raises `ConnectionClosed` with the reason (1009 for an
oversized message included).

Messages that arrived before the tap was installed (a listener may send
frames right behind its hello) wait in the channel: `Tap.run` hands them over
first, holding what arrives meanwhile, then lets the reader hand messages
over directly, so they are handled in arrival order.

trio-websocket keeps its channel private: `install_tap` replaces the
attribute its reader sends to (``_send_channel``) and reads the waiting
messages from ``_recv_channel``; with a trio-websocket whose attributes are
not these channels, it installs nothing and the connection reads with
``get_message``.
"""

from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING

import trio

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from trio_websocket import WebSocketConnection

__all__ = ["Tap", "install_tap"]


class Tap:
    """See the module docstring. ``deliver(message)`` handles one message
    and returns False once the connection ends (no more are delivered)."""

    def __init__(
        self,
        ws: WebSocketConnection,
        channel: trio.MemorySendChannel[bytes | str],
        waiting: trio.MemoryReceiveChannel[bytes | str],
        deliver: Callable[[bytes | str], Awaitable[bool]],
    ) -> None:
        self._ws = ws
        self._channel = channel
        self._waiting = waiting
        self._deliver = deliver
        self._held: deque[bytes | str] | None = deque()
        """Messages that arrived while `run` hands over the waiting ones;
        None once the reader hands them over directly."""
        self._stopped = False

    async def send(self, message: bytes | str) -> None:
        """Called by trio-websocket's reader for each message.

        Cancellation: the reader's (the connection is closing).
        """
        if self._stopped:
            return
        if self._held is not None:
            self._held.append(message)
            return
        if not await self._deliver(message):
            self._stopped = True

    async def aclose(self) -> None:
        """Called by trio-websocket when the WebSocket closes."""
        await self._channel.aclose()

    async def run(self) -> None:
        """Hand over the messages that waited in the channel, then those
        held meanwhile; then wait for the connection to close.

        Raises:
            ConnectionClosed: it closed (with trio-websocket's reason).
        """
        while True:
            try:
                message = self._waiting.receive_nowait()
            except trio.WouldBlock:
                break
            except (trio.EndOfChannel, trio.ClosedResourceError):
                break  # closed: get_message says why
            if not await self._deliver(message):
                self._stopped = True
                return
        held = self._held
        assert held is not None
        while held:
            if not await self._deliver(held.popleft()):
                self._stopped = True
                return
        self._held = None
        while await self._deliver(await self._ws.get_message()):
            pass  # nothing sends in the channel any more; get_message raises
        self._stopped = True


def install_tap(
    ws: WebSocketConnection, deliver: Callable[[bytes | str], Awaitable[bool]]
) -> Tap | None:
    """Install a `Tap` on ``ws`` (see the module docstring); None if this
    trio-websocket keeps its messages otherwise."""
    channel = getattr(ws, "_send_channel", None)
    waiting = getattr(ws, "_recv_channel", None)
    if not isinstance(channel, trio.MemorySendChannel) or not isinstance(
        waiting, trio.MemoryReceiveChannel
    ):
        return None  # pragma: no cover - another trio-websocket
    tap = Tap(ws, channel, waiting, deliver)
    ws._send_channel = tap  # type: ignore[assignment]
    return tap
