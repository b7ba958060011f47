"""Topics: ordered publications with offsets, bounded history and resume
(an entity, and each gateway's fan-out to its sockets; Trio driver).

Theory of operation.

* **The sequencer.** Each topic is a `Topic` entity (one per topic name,
  anywhere in the cluster): `Topic.publish` gives a publication the next
  offset of the topic's *epoch* and keeps it in a bounded history; the
  epoch is a new random string per incarnation of the entity (its history
  lives in memory: after a failover or a passivation, offsets start again
  in a new epoch).
* **One stream per runner.** A gateway whose sockets subscribe to a topic
  follows it with one entity stream (`Topic.follow`), whatever the number
  of its subscribers: a publication travels once to each runner with
  subscribers, is encoded once per subprotocol there, and the same bytes
  are queued to every subscribed socket (`TopicHub`). If the stream
  breaks (the entity moved), the hub follows again from the last offset it
  saw; the entity replays what it missed from its history.
* **Resume.** A client subscribes with the last position it saw (epoch and
  offset). The hub registers the socket first (buffering live
  publications), fetches the history after that position, sends it, then
  the buffered publications it did not already send: no loss, no
  duplicate. If the epoch changed or the position left the history, the
  answer says ``recovered: false`` and the client gets the publications
  from now on.
"""

from __future__ import annotations

import logging
import secrets
from collections import deque
from collections.abc import (
    AsyncIterator,
    Callable,
)
from typing import TYPE_CHECKING, Any, ClassVar

import attrs
import trio

from .._core._retry import Backoff
from .._entity import Entity
from .._handlers import rpc, stream
from ._protocol import encode_frame

if TYPE_CHECKING:
    from .._client import EntityClient
    from .._runner import Runner
    from ._connection import ClientConnection

__all__ = [
    "Follow",
    "History",
    "Position",
    "Publication",
    "Publish",
    "Topic",
    "TopicAccess",
    "TopicHub",
    "publication_frame",
    "publish",
]

log = logging.getLogger("trio_cluster.gateway")


@attrs.frozen
class Position:
    """Where a subscriber is in a topic."""

    epoch: str
    offset: int


@attrs.frozen
class Publication:
    """One publication of a topic."""

    epoch: str
    offset: int
    data: Any


@attrs.frozen
class Publish:
    data: Any


@attrs.frozen
class Follow:
    since: Position | None = None
    """Replay the history after this position first (same epoch only)."""


@attrs.frozen
class History:
    """The answer to `Topic.history`."""

    epoch: str
    offset: int
    """The topic's last offset."""
    recovered: bool
    """Whether every publication after the position asked is in ``items``."""
    items: list[Publication]


class Topic(Entity):
    """The sequencer of one topic (see the module docstring). Runners that
    serve gateways with topics host it: add it to ``entities``."""

    type_name = "trio_cluster.gateway.Topic"
    history_size: ClassVar[int] = 1000
    """Publications kept for resume."""
    follower_buffer: ClassVar[int] = 1000
    """Publications a following runner may fall behind by before its
    stream is dropped (it follows again, from its last offset)."""

    def __init__(self) -> None:
        self.epoch = secrets.token_hex(8)
        self.offset = 0
        self.kept: deque[Publication] = deque(maxlen=self.history_size)
        self.followers: list[trio.MemorySendChannel[Publication]] = []

    @rpc
    async def publish(self, msg: Publish) -> Position:
        self.offset += 1
        publication = Publication(self.epoch, self.offset, msg.data)
        self.kept.append(publication)
        for follower in list(self.followers):
            try:
                follower.send_nowait(publication)
            except (trio.WouldBlock, trio.BrokenResourceError):
                self.followers.remove(follower)  # too slow, or gone
                follower.close()
        return Position(self.epoch, self.offset)

    @rpc
    async def history(self, msg: Follow) -> History:
        recovered, items = self._since(msg.since)
        return History(self.epoch, self.offset, recovered, items)

    @stream
    async def follow(self, msg: Follow) -> AsyncIterator[Publication]:
        send, receive = trio.open_memory_channel[Publication](self.follower_buffer)
        _, missed = self._since(msg.since)
        self.followers.append(send)
        self.keep_alive(True)
        try:
            for publication in missed:
                yield publication
            async with receive:
                async for publication in receive:
                    yield publication
        finally:
            if send in self.followers:
                self.followers.remove(send)
            if not self.followers:
                self.keep_alive(False)

    def _since(self, since: Position | None) -> tuple[bool, list[Publication]]:
        """Whether the history holds every publication after ``since``, and
        those it holds."""
        if since is None:
            return True, []
        kept = self.kept
        if since.epoch != self.epoch:
            return since.offset == 0 and not kept, list(kept)
        oldest = kept[0].offset if kept else self.offset + 1
        items = [item for item in kept if item.offset > since.offset]
        return since.offset >= oldest - 1, items


class _Subscriber:
    """One socket subscribed to a topic."""

    def __init__(self, connection: ClientConnection) -> None:
        self.connection = connection
        self.last = 0
        """The last offset sent to it (in ``epoch``)."""
        self.epoch: str | None = None
        self.buffer: list[Publication] | None = []
        """Publications held while its history is fetched."""


class _Follower:
    """One topic followed by this gateway, and its local subscribers."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.subscribers: dict[ClientConnection, _Subscriber] = {}
        self.scope = trio.CancelScope()
        self.position: Position | None = None


class TopicHub:
    """A gateway's subscriptions (see the module docstring)."""

    def __init__(self, topics: EntityClient[Topic], nursery: trio.Nursery) -> None:
        self._topics = topics
        self._nursery = nursery
        self._followers: dict[str, _Follower] = {}
        self._backoff = Backoff(0.05, 2.0, jitter=0.5)

    async def subscribe(
        self, connection: ClientConnection, topic: str, since: Position | None
    ) -> dict[str, Any]:
        """Add ``connection`` to ``topic``'s subscribers and send it what it
        missed after ``since``; the subscribe reply's value."""
        follower = self._followers.get(topic)
        new = follower is None
        if follower is None:
            follower = self._followers[topic] = _Follower(topic)
        subscriber = _Subscriber(connection)
        follower.subscribers[connection] = subscriber
        try:
            page = await self._topics(topic).history(Follow(since))
        except BaseException:
            self._drop(follower, connection)
            raise
        if new and follower.subscribers:
            # Follow from the position just read: nothing published after
            # it can be missed, whenever the stream opens.
            follower.position = Position(page.epoch, page.offset)
            self._nursery.start_soon(self._follow, follower)
        recovered = since is not None and page.recovered
        subscriber.epoch = page.epoch
        subscriber.last = (
            since.offset if since is not None and recovered else page.offset
        )
        cache: dict[str, bytes | str] = {}
        if recovered:
            for item in page.items:
                cache.clear()
                self._deliver(follower, subscriber, item, cache)
        held, subscriber.buffer = subscriber.buffer or [], None
        for item in held:
            cache.clear()
            self._deliver(follower, subscriber, item, cache)
        return {"epoch": page.epoch, "offset": subscriber.last, "recovered": recovered}

    def unsubscribe(self, connection: ClientConnection, topic: str) -> bool:
        follower = self._followers.get(topic)
        if follower is None or connection not in follower.subscribers:
            return False
        self._drop(follower, connection)
        return True

    def forget(self, connection: ClientConnection) -> None:
        """The socket closed: drop its subscriptions."""
        for follower in list(self._followers.values()):
            if connection in follower.subscribers:
                self._drop(follower, connection)

    def _drop(self, follower: _Follower, connection: ClientConnection) -> None:
        follower.subscribers.pop(connection, None)
        if not follower.subscribers:
            follower.scope.cancel()
            if self._followers.get(follower.name) is follower:
                del self._followers[follower.name]

    def _deliver(
        self,
        follower: _Follower,
        subscriber: _Subscriber,
        item: Publication,
        cache: dict[str, bytes | str],
    ) -> None:
        """Send ``item`` to ``subscriber`` unless it had it; ``cache`` holds
        the item's frame encoded once per subprotocol."""
        if subscriber.buffer is not None:
            subscriber.buffer.append(item)
            return
        if item.epoch == subscriber.epoch and item.offset <= subscriber.last:
            return  # sent already (history, or a replay after a re-follow)
        subscriber.epoch = item.epoch
        subscriber.last = item.offset
        connection = subscriber.connection
        subprotocol = connection.info.subprotocol
        data = cache.get(subprotocol)
        if data is None:
            try:
                data = publication_frame(follower.name, item, subprotocol)
            except ValueError as exc:  # bytes or NaN for a JSON socket
                log.warning("publication %s/%d: %s", follower.name, item.offset, exc)
                return
            cache[subprotocol] = data
        connection.send_encoded(data)

    async def _follow(self, follower: _Follower) -> None:
        failures = 0
        with follower.scope:
            while True:
                try:
                    handle = self._topics(follower.name)
                    async with handle.follow(Follow(follower.position)) as items:
                        async for item in items:
                            failures = 0
                            follower.position = Position(item.epoch, item.offset)
                            cache: dict[str, bytes | str] = {}
                            for subscriber in list(follower.subscribers.values()):
                                self._deliver(follower, subscriber, item, cache)
                except Exception as exc:
                    log.debug("following topic %s: %r", follower.name, exc)
                failures += 1
                await trio.sleep(
                    self._backoff.delay(failures - 1, secrets.randbelow(1000) / 1000)
                )


async def publish(runner: Runner, topic: str, data: Any) -> Position:
    """Publish ``data`` (plain data: what JSON or msgpack carries) on
    ``topic``, from any runner of the cluster; every socket subscribed to
    it, on any gateway, gets it once, in offset order.

    Returns:
        The publication's position (epoch and offset).

    Raises:
        ValueError: ``topic`` is not a valid name (an entity id).
        RunnerUnavailableError, EntityNotAssignedError...: as any call to
            an entity (no runner hosts `Topic`, say).

    Cancellation: as a call: the publication may or may not be made.
    """
    position: Position = await runner.client(Topic)(topic).publish(Publish(data))
    return position


@attrs.frozen
class TopicAccess:
    """What a socket needs of topics: the hub, and which names it may use."""

    hub: TopicHub
    allowed: Callable[[str], bool]


def publication_frame(topic: str, item: Publication, subprotocol: str) -> bytes | str:
    """The ``pub`` frame of a publication, encoded."""
    return encode_frame(
        {
            "t": "pub",
            "topic": topic,
            "epoch": item.epoch,
            "offset": item.offset,
            "data": item.data,
        },
        subprotocol,
    )
