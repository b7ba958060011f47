"""Topics: ordered publications with offsets, bounded history and resume
(the `Topic` entity; each gateway's fan-out to its sockets is
`trio_cluster.gateway._hub`; Trio driver).

Theory of operation.

* **The sequencer.** Each topic is a `Topic` entity (one per topic name,
  anywhere in the cluster): `Topic.publish` gives a publication the next
  offset of the topic's *epoch* and keeps it in a bounded history; the
  epoch is new per incarnation of the entity (its history lives in memory:
  after a failover or a passivation, offsets start again in a new epoch).
  Epochs are ordered: `new_epoch` makes strings of one length that compare
  in the order the incarnations began (the shard's fencing epoch first).
* **One stream per runner.** A gateway whose sockets subscribe to a topic
  follows it with one entity stream (`Topic.follow`), whatever the number
  of its subscribers: a publication travels once to each runner with
  subscribers, is encoded once per subprotocol there, and the same bytes
  are queued to every subscribed socket (`TopicHub`). Publications that
  wait for the stream travel together in one item (``Followed.more``, at
  most `MAX_RUN`), and reach each socket in one write. If the stream
  breaks (the entity moved), the hub follows again from the last offset it
  saw; the entity replays what it missed from its history.
* **Resume.** A client subscribes with the last position it saw (epoch and
  offset). The hub registers the socket first (buffering live
  publications), fetches the history after that position, sends it, then
  the buffered publications it did not already send: no loss, no
  duplicate. If the epoch changed or the position left the history, the
  answer says ``recovered: false`` and the client gets the publications
  from now on. A gateway never sends a socket a publication of an older
  epoch than the one it is in (`older`): after a failover, a gateway's
  stream may still bring the old epoch's end while a resubscribing socket
  already got the new epoch's history.
"""

from __future__ import annotations

import secrets
from collections import deque
from collections.abc import AsyncIterator  # noqa: TC003 - handler annotations resolve at runtime
from typing import TYPE_CHECKING, Any, ClassVar, Final

import attrs
import trio

from .. import current_runner
from .._entity import Entity
from .._handlers import rpc, stream
from ._presence import (
    ListPresence,
    PresenceDiff,
    PresenceTable,
    Track,
    Untrack,
)

if TYPE_CHECKING:
    from .._runner import Runner

__all__ = [
    "Follow",
    "Followed",
    "History",
    "Position",
    "Publication",
    "Publish",
    "Topic",
    "presence",
    "publish",
]


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
    """One item of `Topic.follow`: a publication (or several, in order), or
    a presence change (the first item is the whole presence,
    ``snapshot``)."""

    publication: Publication | None = None
    presence: PresenceDiff | None = None
    snapshot: dict[str, Any] | None = None
    published_at: float | None = None
    """The topic's runner's wall clock when a live publication was made
    (none for one replayed from the history): its fan-out latency."""
    more: list[Publication] = attrs.field(factory=list)
    """Publications right after ``publication``: the stream sends together
    those that wait when it gets to send (a runner that falls behind gets
    fewer, larger items)."""


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
        self.epoch = new_epoch(self.fencing_epoch, current_runner().clock.now())
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
        self._emit(Followed(publication, published_at=current_runner().clock.now()))
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
            for start in range(0, len(missed), MAX_RUN):
                yield Followed(missed[start], more=missed[start + 1 : start + MAX_RUN])
            async with receive:
                held: Followed | None = None
                while True:
                    if held is None:
                        try:
                            item = await receive.receive()
                        except trio.EndOfChannel:
                            break
                    else:
                        item = held
                    item, held = _with_run(item, receive)
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


def new_epoch(fencing_epoch: int, now: float) -> str:
    """A topic incarnation's epoch: its shard's fencing epoch (it grows with
    each new owner), then the owner's clock in microseconds (incarnations
    under one owner come one after another), then 32 random bits; in fixed
    width hex, so that epochs compare as strings in the order they began."""
    stamp = max(0, int(now * 1_000_000)) & 0xFFFF_FFFF_FFFF_FFFF
    return f"{fencing_epoch & 0xFFFF_FFFF_FFFF:012x}{stamp:016x}{secrets.token_hex(4)}"


def older(epoch: str, than: str) -> bool:
    """Whether ``epoch`` began before ``than`` (epochs of one topic, made by
    `new_epoch`; an epoch of another form is never older)."""
    return len(epoch) == len(than) == EPOCH_LENGTH and epoch < than


EPOCH_LENGTH: Final = 36


MAX_RUN: Final = 64
"""Most publications one `Followed` item carries."""


def _with_run(
    item: Followed, receive: trio.MemoryReceiveChannel[Followed]
) -> tuple[Followed, Followed | None]:
    """``item`` and, if it is a publication, those waiting right behind it
    in ``receive`` (up to `MAX_RUN` in all, in ``more``); and the item taken
    that is not a publication, to send next (None: none)."""
    if item.publication is None:
        return item, None
    more: list[Publication] = []
    held = None
    while len(more) < MAX_RUN - 1:
        try:
            following = receive.receive_nowait()
        except (trio.WouldBlock, trio.EndOfChannel):
            break
        if following.publication is None:
            held = following
            break
        more.append(following.publication)
    return (Followed(item.publication, more=more) if more else item), held


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
