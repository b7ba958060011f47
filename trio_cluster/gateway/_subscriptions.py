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

With presence, the subscribe answer carries the topic's presence (it
replaces ``presence``, after every reconnect too) and each ``presence``
frame after it is applied: joins set, leaves deleted.
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

    def __init__(self, topic: str, buffer: int, *, presence: bool = False) -> None:
        self.topic = topic
        self.presence: dict[str, Any] | None = {} if presence else None
        """The topic's presence, ``{connection id: data}`` (None: not
        asked for)."""
        self._presence_changed = trio.Event()
        self.position: Position | None = None
        """The last publication handed out, or where the first subscribe
        answer said the topic was (None: neither yet)."""
        self.recovered: bool | None = None
        """After a resubscribe from a position: whether nothing was lost
        (None: not resubscribed yet)."""
        self.connection = 0
        """The client's socket number this subscription is active on."""
        self._send, self._receive = trio.open_memory_channel[Publication](buffer)
        self._overflow = False

    def answered(self, value: dict[str, Any], *, resumed: bool) -> None:
        """The answer to a (re)subscribe arrived."""
        if resumed:
            self.recovered = bool(value.get("recovered"))
        epoch, offset = value.get("epoch"), value.get("offset")
        if self.position is None and isinstance(epoch, str) and isinstance(offset, int):
            # Nothing handed out yet: the subscription starts at the
            # answer's position, and a resubscribe resumes from there (not
            # from "now", which would skip what came in between).
            self.position = Position(epoch, offset)
        entries = value.get("presence")
        if self.presence is not None and isinstance(entries, dict):
            self.presence = dict(entries)
            self._notify()

    def _notify(self) -> None:
        self._presence_changed.set()
        self._presence_changed = trio.Event()

    async def presence_changed(self) -> dict[str, Any]:
        """Wait for the next change of ``presence``; the new presence.

        Raises:
            ValueError: the subscription was made without presence.

        Cancellation: stops waiting.
        """
        if self.presence is None:
            raise ValueError(f"subscription to {self.topic!r} has no presence")
        await self._presence_changed.wait()
        return dict(self.presence)

    def deliver(self, frame: dict[str, Any]) -> None:
        """A ``pub`` or ``presence`` frame for this topic arrived."""
        if frame["t"] == "presence":
            joins, leaves = frame.get("joins"), frame.get("leaves")
            present = self.presence
            if present is None or not isinstance(joins, dict):
                return
            for key in leaves if isinstance(leaves, dict) else ():
                present.pop(key, None)
            present.update(joins)
            self._notify()
            return
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
