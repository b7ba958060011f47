"""A client's reliable pushes: its session token, the inbox that hands
each push over once and acks it (Trio driver, client side).

Theory of operation. The client names its session with a random token in
the URL (``?session=...``), the same after every reconnect, so the gateway
it reaches attaches the socket to its session (`trio_cluster.gateway.Session`)
and forwards the pushes not acked yet. `PushInbox` queues each push the
first time it arrives and acks it when the application takes it (``async
for push in client.pushes``): a push the application never takes is not
acked, is sent again, and fails at its sender in the end. A copy of a push
already taken (its ack was lost, or crossed a redelivery) is acked again
and dropped; a copy of one still queued is dropped. Acks are sent by one
task (`PushInbox.send_acks`): those that wait while it writes go together
in one frame (the gateway does not count acks of the pushes it sent
against the message rate).
"""

from __future__ import annotations

import secrets
from collections import deque
from contextlib import suppress
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import attrs
import trio

from ._errors import GatewayError
from ._protocol import MAX_ACKS

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

__all__ = ["PushInbox", "ReceivedPush", "new_session", "with_session"]


def new_session() -> str:
    """A random session token (22 URL-safe characters)."""
    return secrets.token_urlsafe(16)


def with_session(url: str, session: str) -> str:
    """``url`` with ``session=<session>`` in its query."""
    parts = urlsplit(url)
    query = [(k, v) for k, v in parse_qsl(parts.query) if k != "session"]
    query.append(("session", session))
    return urlunsplit(parts._replace(query=urlencode(query)))


@attrs.frozen
class ReceivedPush:
    """A push of the client's session."""

    epoch: str
    seq: int
    data: Any


class PushInbox:
    """The pushes of a client's session, each once, acked when taken
    (``async for push in client.pushes``)."""

    def __init__(
        self,
        send: Callable[[dict[str, Any]], Awaitable[None]],
        buffer: int = 10_000,
        remember: int = 100_000,
        ack_delay: float = 0.0,
    ) -> None:
        self._send_frame = send
        self._ack_delay = ack_delay
        self._to_ack: dict[str, list[int]] = {}
        self._acks_waiting = trio.Event()
        self._sending = trio.Lock()
        """Held while acks are written: `flush` waits for those in flight."""
        self._send, self._receive = trio.open_memory_channel[ReceivedPush](buffer)
        self._taken: dict[tuple[str, int], bool] = {}
        """Pushes seen recently: whether handed over (True) or queued."""
        self._order: deque[tuple[str, int]] = deque()
        self._remember = remember
        self.duplicates = 0
        """Copies dropped."""

    async def deliver(self, frame: dict[str, Any]) -> None:
        """A ``push`` frame arrived."""
        epoch, seq = frame.get("epoch"), frame.get("seq")
        if not isinstance(epoch, str) or not isinstance(seq, int):
            await trio.lowlevel.checkpoint()
            return
        key = (epoch, seq)
        taken = self._taken.get(key)
        if taken is not None:
            self.duplicates += 1
            if taken:
                self._ack(key)
            await trio.lowlevel.checkpoint()
            return
        try:
            self._send.send_nowait(ReceivedPush(epoch, seq, frame.get("data")))
        except (trio.WouldBlock, trio.ClosedResourceError):
            await trio.lowlevel.checkpoint()
            return  # not acked: it comes again
        self._taken[key] = False
        self._order.append(key)
        while len(self._order) > self._remember:
            self._taken.pop(self._order.popleft(), None)
        await trio.lowlevel.checkpoint()

    def _ack(self, key: tuple[str, int]) -> None:
        self._to_ack.setdefault(key[0], []).append(key[1])
        self._acks_waiting.set()

    async def send_acks(self) -> None:
        """Send the acks waiting (``ack_delay`` after the first: none by
        default), as few frames as possible; until cancelled (a task of the
        client). An ack lost to a disconnection is sent again when the push
        comes again."""
        while True:
            await self._acks_waiting.wait()
            await trio.sleep(self._ack_delay)
            self._acks_waiting = trio.Event()
            await self._send_waiting()

    async def flush(self) -> None:
        """Send every ack waiting now, after those being sent: the client's
        block is ending, and a push it took must not come again.

        Cancellation: the acks not sent yet are lost (their pushes come
        again, and are acked again, on the session's next socket).
        """
        await self._send_waiting()

    async def _send_waiting(self) -> None:
        async with self._sending:
            waiting, self._to_ack = self._to_ack, {}
            for epoch, seqs in waiting.items():
                for start in range(0, len(seqs), MAX_ACKS):
                    frame = {
                        "t": "ack",
                        "epoch": epoch,
                        "seqs": seqs[start : start + MAX_ACKS],
                    }
                    with suppress(GatewayError):
                        await self._send_frame(frame)

    def close(self) -> None:
        self._send.close()

    def __aiter__(self) -> PushInbox:
        return self

    async def __anext__(self) -> ReceivedPush:
        """The next push (its ack is sent by `send_acks`).

        Raises:
            StopAsyncIteration: the client's block ended.
        """
        try:
            push = await self._receive.receive()
        except (trio.EndOfChannel, trio.ClosedResourceError):
            raise StopAsyncIteration from None
        key = (push.epoch, push.seq)
        if key in self._taken:
            self._taken[key] = True
        self._ack(key)
        return push
