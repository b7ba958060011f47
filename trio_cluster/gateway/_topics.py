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
from ._client_info import ClientInfo
from ._presence import (
    ListPresence,
    PresenceDiff,
    PresenceMirror,
    PresenceTable,
    Track,
    Untrack,
    presence_frame,
)
from ._protocol import encode_frame

if TYPE_CHECKING:
    from .._client import EntityClient
    from .._runner import Runner
    from ._connection import ClientConnection

__all__ = [
    "Follow",
    "Followed",
    "History",
    "Position",
    "Publication",
    "Publish",
    "Topic",
    "TopicAccess",
    "TopicHub",
    "presence",
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
    runner: str | None = None
    """The following runner: its present sockets are ``present``."""
    present: dict[str, Any] = attrs.field(factory=dict)
    """``{connection id: data}`` of the runner's sockets in the topic's
    presence (they replace its entries)."""


@attrs.frozen
class Followed:
    """One item of `Topic.follow`: a publication, or a presence change (the
    first item is the whole presence, ``snapshot``)."""

    publication: Publication | None = None
    presence: PresenceDiff | None = None
    snapshot: dict[str, Any] | None = None


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
        self.followers: list[trio.MemorySendChannel[Followed]] = []
        self.present = PresenceTable()

    def _emit(self, item: Followed) -> None:
        for follower in list(self.followers):
            try:
                follower.send_nowait(item)
            except (trio.WouldBlock, trio.BrokenResourceError):
                self.followers.remove(follower)  # too slow, or gone
                follower.close()

    def _changed(self, diff: PresenceDiff) -> None:
        if diff:
            self._emit(Followed(presence=diff))

    @rpc
    async def publish(self, msg: Publish) -> Position:
        self.offset += 1
        publication = Publication(self.epoch, self.offset, msg.data)
        self.kept.append(publication)
        self._emit(Followed(publication))
        return Position(self.epoch, self.offset)

    @rpc
    async def track(self, msg: Track) -> None:
        """A socket joins the presence (or changes its data)."""
        self._changed(self.present.track(msg.runner, msg.connection, msg.data))

    @rpc
    async def untrack(self, msg: Untrack) -> None:
        """A socket leaves the presence."""
        self._changed(self.present.untrack(msg.connection))

    @rpc
    async def presence(self, msg: ListPresence) -> dict[str, Any]:
        """``{connection id: data}`` of the sockets present."""
        return self.present.snapshot()

    @rpc
    async def history(self, msg: Follow) -> History:
        recovered, items = self._since(msg.since)
        return History(self.epoch, self.offset, recovered, items)

    @stream
    async def follow(self, msg: Follow) -> AsyncIterator[Followed]:
        """The whole presence, the publications after ``msg.since`` in the
        history, then every publication and presence change as they come.
        While it runs, the sockets of ``msg.runner`` in ``msg.present`` are
        present; when the runner's last stream ends (cancelled because its
        connection was lost, say), its entries leave."""
        send, receive = trio.open_memory_channel[Followed](self.follower_buffer)
        _, missed = self._since(msg.since)
        runner = msg.runner
        if runner is not None:
            self._changed(self.present.stream_opened(runner, msg.present))
        self.followers.append(send)
        self.keep_alive(True)
        try:
            yield Followed(snapshot=self.present.snapshot())
            for publication in missed:
                yield Followed(publication)
            async with receive:
                async for item in receive:
                    yield item
        finally:
            if send in self.followers:
                self.followers.remove(send)
            if runner is not None:
                self._changed(self.present.stream_closed(runner))
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
        self.presence = False
        """Whether it gets presence diffs (from its subscribe answer on)."""


class _Follower:
    """One topic followed by this gateway, and its local subscribers."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.subscribers: dict[ClientConnection, _Subscriber] = {}
        self.scope = trio.CancelScope()
        self.position: Position | None = None
        self.present: dict[str, Any] = {}
        """``{connection id: data}`` of the local sockets in its presence."""
        self.mirror = PresenceMirror()
        self.synced = trio.Event()
        """Set when the stream's first item (the presence) arrived."""
        self.changed = trio.Event()
        """Set (and replaced) when the mirror changes."""

    def mirror_changed(self) -> None:
        self.changed.set()
        self.changed = trio.Event()


class TopicHub:
    """A gateway's subscriptions (see the module docstring)."""

    def __init__(
        self, topics: EntityClient[Topic], nursery: trio.Nursery, runner: str
    ) -> None:
        self._topics = topics
        self._nursery = nursery
        self._runner = runner
        self._followers: dict[str, _Follower] = {}
        self._backoff = Backoff(0.05, 2.0, jitter=0.5)

    async def subscribe(
        self,
        connection: ClientConnection,
        topic: str,
        since: Position | None,
        data: Any = None,
        *,
        with_presence: bool = False,
    ) -> dict[str, Any]:
        """Add ``connection`` to ``topic``'s subscribers and send it what it
        missed after ``since``; the subscribe reply's value. With ``data``
        (not None), the socket joins the topic's presence; with
        ``with_presence``, the reply has the presence and the socket gets
        its diffs."""
        follower = self._followers.get(topic)
        new = follower is None
        if follower is None:
            follower = self._followers[topic] = _Follower(topic)
        subscriber = _Subscriber(connection)
        follower.subscribers[connection] = subscriber
        key = connection.info.id
        if data is not None:
            follower.present[key] = data
        try:
            page = await self._topics(topic).history(Follow(since))
            if new and follower.subscribers:
                # Follow from the position just read: nothing published
                # after it can be missed, whenever the stream opens.
                follower.position = Position(page.epoch, page.offset)
                self._nursery.start_soon(self._follow, follower)
            if data is not None:
                await self._topics(topic).track(Track(self._runner, key, data))
            if with_presence:
                await follower.synced.wait()
                while data is not None and key not in follower.mirror.entries:
                    await follower.changed.wait()  # its own join, on its way
        except BaseException:
            self._drop(follower, connection)
            raise
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
        value = {"epoch": page.epoch, "offset": subscriber.last, "recovered": recovered}
        if with_presence:
            subscriber.presence = True
            value["presence"] = dict(follower.mirror.entries)
        return value

    async def presence(self, topic: str) -> dict[str, Any]:
        """The presence of ``topic`` (from this gateway's mirror when it
        follows the topic)."""
        follower = self._followers.get(topic)
        if follower is not None and follower.mirror.synced:
            await trio.lowlevel.checkpoint()
            return dict(follower.mirror.entries)
        entries: dict[str, Any] = await self._topics(topic).presence(ListPresence())
        return entries

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
        key = connection.info.id
        if follower.present.pop(key, None) is not None:
            self._nursery.start_soon(self._untrack, follower.name, key)
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

    async def _untrack(self, topic: str, key: str) -> None:
        try:
            await self._topics(topic).untrack(Untrack(key))
        except Exception as exc:  # its runner's stream ending drops it too
            log.debug("untracking %s in topic %s: %r", key, topic, exc)

    def _changed(self, follower: _Follower, diff: PresenceDiff) -> None:
        """Send a presence diff to the subscribers that get them."""
        if not diff:
            return
        cache: dict[str, bytes | str] = {}
        for subscriber in list(follower.subscribers.values()):
            if not subscriber.presence:
                continue
            connection = subscriber.connection
            subprotocol = connection.info.subprotocol
            data = cache.get(subprotocol)
            if data is None:
                try:
                    data = presence_frame(follower.name, diff, subprotocol)
                except ValueError as exc:
                    log.warning("presence of %s: %s", follower.name, exc)
                    return
                cache[subprotocol] = data
            connection.send_encoded(data)

    def _followed(self, follower: _Follower, item: Followed) -> None:
        if item.snapshot is not None:
            self._changed(follower, follower.mirror.reset(item.snapshot))
            follower.synced.set()
            follower.mirror_changed()
        if item.presence is not None:
            follower.mirror.apply(item.presence)
            self._changed(follower, item.presence)
            follower.mirror_changed()
        publication = item.publication
        if publication is not None:
            follower.position = Position(publication.epoch, publication.offset)
            cache: dict[str, bytes | str] = {}
            for subscriber in list(follower.subscribers.values()):
                self._deliver(follower, subscriber, publication, cache)

    async def _follow(self, follower: _Follower) -> None:
        failures = 0
        with follower.scope:
            while True:
                try:
                    handle = self._topics(follower.name)
                    request = Follow(
                        follower.position, self._runner, dict(follower.present)
                    )
                    async with handle.follow(request) as items:
                        async for item in items:
                            failures = 0
                            self._followed(follower, item)
                except Exception as exc:
                    log.debug("following topic %s: %r", follower.name, exc)
                # Until the topic answers again, this gateway knows its own
                # sockets only: the others leave (and come back with the
                # snapshot of the next stream).
                self._changed(follower, follower.mirror.reset(follower.present))
                follower.mirror_changed()
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


async def presence(runner: Runner, topic: str) -> dict[str, Any]:
    """The presence of ``topic``: ``{connection id: data}`` of the sockets
    in it, on every gateway of the cluster.

    Raises:
        ValueError: ``topic`` is not a valid name (an entity id).
        RunnerUnavailableError, EntityNotAssignedError...: as any call to
            an entity (no runner hosts `Topic`, say).

    Cancellation: as a call; nothing changes.
    """
    entries: dict[str, Any] = await runner.client(Topic)(topic).presence(ListPresence())
    return entries


@attrs.frozen
class TopicAccess:
    """What a socket needs of topics: the hub, and which names it may use."""

    hub: TopicHub
    allowed: Callable[[str], bool]
    presence: Callable[[ClientInfo, str], Any] | None = None
    """The gateway's ``presence`` hook."""


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
