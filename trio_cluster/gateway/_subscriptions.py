"""A client's topic subscriptions, kept across reconnects (Trio driver,
client side).

Theory of operation. `Subscription` remembers the last position it handed
out (epoch and offset). Whenever the client's socket comes up, every
subscription subscribes again *from that position*: the gateway sends what
was published meanwhile (if its topic still holds it: ``recovered``), then
the live publications. Publications at or before the remembered position
are dropped here, so a resume never duplicates, and so are those of an
epoch older than the position's (epochs compare in the order they began).
When the topic's epoch changed (its history was lost) or the position left
its history, ``recovered`` is False after that resubscribe: the
publications in between are lost, and the subscription says so.

With presence, the subscribe answer carries the topic's presence (it
replaces ``presence``, after every reconnect too) and each ``presence``
frame after it is applied: joins set, leaves deleted.

`ClientTopics` is the topics half of a `GatewayClient`: ``subscribe``,
``presence`` and the resubscribes after a reconnect, over the client's
request exchange.
"""

from __future__ import annotations

import logging
from abc import abstractmethod
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

import trio

from ._errors import GatewayCallError, GatewayError
from ._topics import Position, Publication, older

if TYPE_CHECKING:
    import random
    from collections.abc import AsyncIterator

    from ._client_config import ClientConfig, ConnectionState

__all__ = ["ClientTopics", "Subscription"]

log = logging.getLogger("trio_cluster.gateway.client")


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
        if position is not None and (
            offset <= position.offset
            if position.epoch == epoch
            else older(epoch, position.epoch)
        ):
            # Had it already (a resume overlaps what was received), or it
            # is of an epoch this subscription has left.
            return
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


class ClientTopics:
    """The topic subscriptions of a `GatewayClient` (see the module
    docstring); the client sets its state."""

    _config: ClientConfig
    _opened: int
    """The number of the client's current socket (0: none yet)."""
    _rng: random.Random
    _state: ConnectionState
    _subscriptions: dict[str, Subscription]

    @abstractmethod
    async def wait_connected(self) -> None:
        """Wait until a socket is up."""

    @abstractmethod
    async def _exchange(self, frame: dict[str, Any]) -> Any:
        """Send a request frame and wait for its reply's value."""

    @abstractmethod
    async def _send(self, frame: dict[str, Any]) -> None:
        """Send a frame if a socket is up (no answer awaited)."""

    @abstractmethod
    def _new_id(self) -> int:
        """A new request id."""

    @asynccontextmanager
    async def subscribe(
        self, topic: str, *, buffer: int = 10_000, presence: bool = False
    ) -> AsyncIterator[Subscription]:
        """Subscribe to ``topic``: ``async with client.subscribe("room:1") as
        sub: async for publication in sub``. After a reconnect the
        subscription resumes from the last publication it handed out (see
        `Subscription`). ``buffer`` publications may wait unread; one more
        closes the subscription (its iteration raises `GatewayError`).
        With ``presence``, ``sub.presence`` is the topic's presence, kept
        up to date (``await sub.presence_changed()``).

        Raises:
            ValueError: already subscribed to ``topic`` on this client.
            GatewayCallError: refused (``not_found``: no such topic;
                ``forbidden``), or the topic's entity failed.
            GatewayDisconnectedError, GatewayRefusedError: as `call`.

        Cancellation: the subscription ends (an ``unsubscribe`` is sent).
        """
        if topic in self._subscriptions:
            raise ValueError(f"already subscribed to {topic!r} on this client")
        subscription = self._subscriptions[topic] = Subscription(
            topic, buffer, presence=presence
        )
        try:
            while subscription.connection != self._opened or not self._state.connected:
                await self.wait_connected()
                await self._subscribe(subscription)
            yield subscription
        finally:
            del self._subscriptions[topic]
            subscription.close()
            with (
                trio.CancelScope(shield=True),
                trio.move_on_after(self._config.close_timeout),
            ):
                await self._send(
                    {"t": "unsubscribe", "id": self._new_id(), "topic": topic}
                )

    async def _subscribe(self, subscription: Subscription) -> None:
        """(Re)subscribe on the current socket, from the subscription's
        position."""
        number = self._opened
        frame: dict[str, Any] = {"t": "subscribe", "topic": subscription.topic}
        since = subscription.since()
        if since is not None:
            frame["since"] = since
        if subscription.presence is not None:
            frame["presence"] = True
        value = await self._exchange(frame)
        if isinstance(value, dict):
            subscription.answered(value, resumed=since is not None)
        subscription.connection = number

    async def presence(self, topic: str) -> dict[str, Any]:
        """The presence of ``topic`` (``{connection id: data}``), whether
        this client subscribes to it or not.

        Raises:
            GatewayCallError: refused (``not_found``, ``forbidden``), or the
                topic's entity failed.
            GatewayDisconnectedError, GatewayRefusedError: as `call`.

        Cancellation: as `call`.
        """
        value = await self._exchange({"t": "presence", "topic": topic})
        return value if isinstance(value, dict) else {}

    async def _resubscribe_all(self) -> None:
        """Subscribe every subscription again on a new socket (a task of
        the socket's nursery); a refusal that may pass (``unavailable``:
        the topic's entity is moving, say) is retried with the reconnect
        backoff for as long as the socket is up."""
        number = self._opened
        for subscription in list(self._subscriptions.values()):
            attempt = 0
            while (
                # Not one being made: `subscribe` does its first itself.
                subscription.connection not in (0, number)
                and self._subscriptions.get(subscription.topic) is subscription
            ):
                try:
                    await self._subscribe(subscription)
                except GatewayCallError as exc:
                    if not exc.retryable:
                        log.warning(
                            "resubscribing to %s failed: %s", subscription.topic, exc
                        )
                        break
                    delay = self._config.reconnect.delay(attempt, self._rng.random())
                    attempt += 1
                    await trio.sleep(delay)
                except GatewayError as exc:  # the socket closed: the next resubscribes
                    log.debug("resubscribing to %s: %s", subscription.topic, exc)
                    return
