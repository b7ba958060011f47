"""A client's topic subscriptions, kept across reconnects (Trio driver,
client side).

Theory of operation. `Subscription` remembers the last position it handed
out (epoch and offset). Whenever the client's socket comes up, every
subscription subscribes again *from that position*: the gateway sends what
was published meanwhile (if its topic still holds it: ``recovered``), then
the live publications. Publications at or before the remembered position
are dropped here, so a resume never duplicates. When the topic's epoch
changed (its history was lost) or the position left its history,
``recovered`` is False after that resubscribe: the publications in between
are lost, and the subscription says so.
"""

from __future__ import annotations

from typing import Any

import trio

from ._errors import GatewayError
from ._topics import Position, Publication

__all__ = ["Subscription"]


class Subscription:
    """A topic subscription of a `GatewayClient` (``async for publication
    in subscription``), made by `GatewayClient.subscribe`."""

    def __init__(self, topic: str, buffer: int) -> None:
        self.topic = topic
        self.position: Position | None = None
        """The last publication handed out (None: none yet)."""
        self.recovered: bool | None = None
        """After a resubscribe from a position: whether nothing was lost
        (None: not resubscribed yet)."""
        self.connection = 0
        """The client's socket number this subscription is active on."""
        self._send, self._receive = trio.open_memory_channel[Publication](buffer)
        self._overflow = False

    def deliver(self, frame: dict[str, Any]) -> None:
        """A ``pub`` frame for this topic arrived."""
        epoch = frame.get("epoch")
        offset = frame.get("offset")
        if not isinstance(epoch, str) or not isinstance(offset, int):
            return
        position = self.position
        if (
            position is not None
            and position.epoch == epoch
            and offset <= position.offset
        ):
            return  # had it already (a resume overlaps what was received)
        try:
            self._send.send_nowait(Publication(epoch, offset, frame.get("data")))
        except trio.WouldBlock:
            self._overflow = True
            self._send.close()
            return
        except trio.ClosedResourceError:
            return
        self.position = Position(epoch, offset)

    def since(self) -> dict[str, Any] | None:
        position = self.position
        return (
            None
            if position is None
            else {"epoch": position.epoch, "offset": position.offset}
        )

    def close(self) -> None:
        self._send.close()

    def __aiter__(self) -> Subscription:
        return self

    async def __anext__(self) -> Publication:
        """The next publication, in offset order, each once.

        Raises:
            StopAsyncIteration: the subscription's block ended.
            GatewayError: the subscription fell ``buffer`` publications
                behind (it was closed).
        """
        try:
            return await self._receive.receive()
        except (trio.EndOfChannel, trio.ClosedResourceError):
            if self._overflow:
                raise GatewayError(
                    f"subscription to {self.topic!r} fell too far behind and was closed"
                ) from None
            raise StopAsyncIteration from None
