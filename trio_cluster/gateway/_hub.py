"""Each gateway's side of topics: one entity stream per followed topic,
the fan-out of its publications and presence changes to the subscribed
sockets, and resume (Trio driver).

Theory of operation: see `trio_cluster.gateway._topics` (the sequencer,
one stream per runner, resume) and `trio_cluster.gateway._presence`. A
`TopicHub` keeps, per topic this gateway follows, its local subscribers,
the stream's last position, the tracked sockets of this gateway, and its
mirror of the topic's presence.

The stream of a topic starts from the end of the first history read of a
subscribe that succeeds. Reads made at once for different positions can
be answered out of order: a subscriber whose read ends before the stream's
start gets the publications between from what the gateway keeps, or from
one more read (`TopicHub._gap`), so it misses none.
"""

from __future__ import annotations

import logging
import random
from collections import deque
from collections.abc import Callable
from itertools import islice
from typing import TYPE_CHECKING, Any, Final

import attrs
import trio

from .._core._retry import Backoff
from ._client_info import ClientInfo
from ._frames import data_frame
from ._history import HistoryReads
from ._presence import (
    ListPresence,
    PresenceDiff,
    PresenceMirror,
    Track,
    Untrack,
    presence_frame,
)
from ._protocol import encode_frame
from ._statistics import GatewayCounters
from ._topics import Follow, Followed, History, Position, Publication, Topic, older

if TYPE_CHECKING:
    from .. import Clock
    from .._client import EntityClient
    from ._connection import ClientConnection

__all__ = ["TopicAccess", "TopicHub", "publication_frame"]

log = logging.getLogger("trio_cluster.gateway")

RECENT: Final = 256
"""Publications each followed topic keeps on its gateway: a socket that
resumes from a position among them is answered from here at once."""


class _Subscriber:
    """One socket subscribed to a topic."""

    __slots__ = ("buffer", "connection", "epoch", "last", "presence")

    def __init__(
        self,
        connection: ClientConnection,
        position: Position | None = None,
    ) -> None:
        self.connection = connection
        self.last = 0 if position is None else position.offset
        """The last offset sent to it (in ``epoch``)."""
        self.epoch: str | None = None if position is None else position.epoch
        self.buffer: list[Publication] | None = [] if position is None else None
        """Publications held while its history is fetched (None: none
        are)."""
        self.presence = False
        """Whether it gets presence diffs (from its subscribe answer on)."""

    def wants(self, item: Publication) -> bool:
        """Whether ``item`` is new to this socket: after its position in
        its epoch, or of a newer epoch. A publication of an older epoch
        than the socket's (the stream of an older entity, held while the
        history came from the new one) is not: the socket's position would
        go back to it, and the new epoch's history be sent again."""
        epoch = self.epoch
        if item.epoch == epoch:
            return item.offset > self.last
        return epoch is None or not older(item.epoch, epoch)

    def moves(self, item: Publication) -> bool:
        """Whether ``item`` is new to this socket (`wants`); if so, its
        position moves to it."""
        if not self.wants(item):
            return False
        self.epoch = item.epoch
        self.last = item.offset
        return True


class _Follower:
    """One topic followed by this gateway, and its local subscribers."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.subscribers: dict[ClientConnection, _Subscriber] = {}
        self.scope = trio.CancelScope()
        self.following = False
        """Whether its stream was started (by the first subscribe whose
        history read succeeded)."""
        self.position: Position | None = None
        self.started_at: Position | None = None
        """Where its stream started (the end of the read that started it)."""
        self.recent: deque[Publication] = deque(maxlen=min(RECENT, Topic.history_size))
        """The last publications up to ``position``, consecutive (every
        publication after ``recent[0].offset - 1`` up to ``position``); no
        more than the topic keeps, so that a position the topic no longer
        holds is not recovered here either (as far as this gateway has
        seen)."""
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

    def advance(self, run: list[Publication]) -> None:
        """``run`` (in order) was sent to every subscriber: the position
        moves to its end, and ``recent`` keeps it (from the first
        publication that does not follow the one before: an epoch change
        or a gap starts it again)."""
        recent = self.recent
        for publication in run:
            if recent:
                last = recent[-1]
                if (
                    publication.epoch != last.epoch
                    or publication.offset != last.offset + 1
                ):
                    recent.clear()
            recent.append(publication)
        last = run[-1]
        self.position = Position(last.epoch, last.offset)

    def start_at(self, page: History) -> None:
        """Follow from the end of ``page`` (a history answer), keeping its
        publications if they end there consecutively."""
        self.position = self.started_at = Position(page.epoch, page.offset)
        self.recent.clear()
        items = page.items
        if items and items[-1].epoch == page.epoch and items[-1].offset == page.offset:
            self.advance(items)

    def known_after(self, since: Position) -> list[Publication] | None:
        """The publications after ``since`` up to ``position`` if ``recent``
        holds them all (`since_known`), else None."""
        if not self.since_known(since):
            return None
        recent = self.recent
        if not recent:
            return []
        return list(islice(recent, max(0, since.offset + 1 - recent[0].offset), None))

    def since_known(self, since: Position) -> bool:
        """Whether ``recent`` holds every publication after ``since`` up to
        ``position`` (or ``since`` is at or after it, in its epoch)."""
        position = self.position
        if position is None or since.epoch != position.epoch:
            return False
        recent = self.recent
        oldest = recent[0].offset - 1 if recent else position.offset
        return since.offset >= oldest


class TopicHub:
    """A gateway's subscriptions (see the module docstring)."""

    def __init__(
        self,
        topics: EntityClient[Topic],
        nursery: trio.Nursery,
        runner: str,
        *,
        clock: Clock | None = None,
        counters: GatewayCounters | None = None,
    ) -> None:
        self._topics = topics
        self._nursery = nursery
        self._runner = runner
        self._clock = clock
        """This runner's wall clock (for the fan-out latency)."""
        self._counters = counters if counters is not None else GatewayCounters()
        self._followers: dict[str, _Follower] = {}
        self._joined: dict[ClientConnection, str | set[str]] = {}
        """The topics of each subscribed socket (one name, or a set of
        several)."""
        self._backoff = Backoff(0.05, 2.0, jitter=0.5)
        self.reads = HistoryReads(self._read_history, nursery)
        """The history reads of resuming sockets, one per topic at a time."""

    async def _read_history(self, topic: str, since: Position | None) -> History:
        page: History = await self._topics(topic).history(Follow(since))
        return page

    def subscribe_now(
        self, connection: ClientConnection, topic: str
    ) -> dict[str, Any] | None:
        """Subscribe ``connection`` to ``topic`` from now on, without
        waiting, if this gateway follows the topic already (and the socket
        does not join its presence nor resume): the subscribe reply's value,
        or None (then use `subscribe`).

        Its position is the follower's: the last publication the topic's
        stream brought, which every subscriber has been sent; the stream
        brings the next ones, which the socket gets too.
        """
        follower = self._followers.get(topic)
        if follower is None or follower.position is None:
            return None
        position = follower.position
        follower.subscribers[connection] = _Subscriber(connection, position)
        self._join(connection, topic)
        return {"epoch": position.epoch, "offset": position.offset, "recovered": False}

    def resume_now(
        self, connection: ClientConnection, topic: str, since: Position
    ) -> dict[str, Any] | None:
        """Subscribe ``connection`` to ``topic`` from ``since`` without
        waiting, if this gateway follows the topic and keeps every
        publication after ``since`` (`RECENT`): they are sent now (the
        socket does not join its presence); the subscribe reply's value,
        or None (then use `subscribe`, which reads the history).

        The socket is then where the follower is (or at ``since``, if the
        client saw more than this gateway yet): the stream brings the next
        publications, which it gets too, none twice.
        """
        follower = self._followers.get(topic)
        if follower is None or not follower.since_known(since):
            return None
        subscriber = _Subscriber(connection, since)
        follower.subscribers[connection] = subscriber
        self._join(connection, topic)
        missed = follower.known_after(since)
        if missed:
            self._deliver_missed(follower, subscriber, missed)
        return {"epoch": since.epoch, "offset": subscriber.last, "recovered": True}

    def _join(self, connection: ClientConnection, topic: str) -> None:
        joined = self._joined.get(connection)
        if joined is None:
            self._joined[connection] = topic
        elif isinstance(joined, str):
            if joined != topic:
                self._joined[connection] = {joined, topic}
        else:
            joined.add(topic)

    def _leave(self, connection: ClientConnection, topic: str) -> None:
        joined = self._joined.get(connection)
        if joined == topic:
            del self._joined[connection]
        elif isinstance(joined, set):
            joined.discard(topic)

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
        if follower is None:
            follower = self._followers[topic] = _Follower(topic)
        subscriber = _Subscriber(connection)
        follower.subscribers[connection] = subscriber
        self._join(connection, topic)
        key = connection.info.id
        if data is not None:
            follower.present[key] = data
        try:
            page = await self.reads.history(topic, since)
            if not follower.following and follower.subscribers:
                # Follow from the position just read: nothing published
                # after it can be missed, whenever the stream opens. Not
                # only the subscribe that made the follower: if its read
                # failed (the topic's runner unreachable) or its socket
                # left, the sockets that joined meanwhile would get no
                # stream, nor would any later one on this gateway.
                follower.following = True
                follower.start_at(page)
                self._nursery.start_soon(self._follow, follower)
                gap: list[Publication] = []
            else:
                gap = await self._gap(follower, page)
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
        # A position in an older epoch: that epoch's end may be lost
        # (``recovered`` is false), but the new epoch's history is all after
        # it: send it from its start, as a following gateway does.
        new_epoch = since is not None and since.epoch != page.epoch
        subscriber.epoch = page.epoch
        if recovered and since is not None:
            subscriber.last = since.offset
        else:
            subscriber.last = 0 if new_epoch else page.offset
        # The history first, then the live publications held meanwhile
        # (those it has too are dropped as sent), in one write. NOTE: the
        # held ones may be newer than the history's end: the stream and the
        # history's answer come on different connections between runners.
        held, subscriber.buffer = subscriber.buffer or [], None
        self._deliver_missed(
            follower,
            subscriber,
            [*(page.items if recovered or new_epoch else ()), *gap, *held],
        )
        value = {"epoch": page.epoch, "offset": subscriber.last, "recovered": recovered}
        if with_presence:
            subscriber.presence = True
            value["presence"] = dict(follower.mirror.entries)
        return value

    async def _gap(self, follower: _Follower, page: History) -> list[Publication]:
        """What a subscriber whose history read ended at ``page`` would miss
        between it and where the stream started: nothing, unless two first
        reads were answered out of order (the later one started the stream
        from further on). Then the publications between, from what the
        gateway keeps if it does, else read from the topic.

        Raises:
            what the read raises (`RunnerUnavailableError`...).
        """
        started = follower.started_at
        if (
            started is None
            or started.epoch != page.epoch
            or page.offset >= started.offset
        ):
            return []
        since = Position(page.epoch, page.offset)
        kept = follower.known_after(since)
        if kept is not None:
            return kept
        missed = await self.reads.history(follower.name, since)
        return list(missed.items) if missed.epoch == page.epoch else []

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
        joined = self._joined.pop(connection, None)
        for topic in (joined,) if isinstance(joined, str) else joined or ():
            follower = self._followers.get(topic)
            if follower is not None and connection in follower.subscribers:
                self._drop(follower, connection)

    def _drop(self, follower: _Follower, connection: ClientConnection) -> None:
        follower.subscribers.pop(connection, None)
        self._leave(connection, follower.name)
        key = connection.info.id
        if follower.present.pop(key, None) is not None:
            try:
                self._nursery.start_soon(self._untrack, follower.name, key)
            except RuntimeError:  # the gateway stopped: its streams' end untracks
                log.debug("not untracking %s: the gateway stopped", key)
        if not follower.subscribers:
            follower.scope.cancel()
            if self._followers.get(follower.name) is follower:
                del self._followers[follower.name]

    def _deliver(
        self,
        follower: _Follower,
        subscriber: _Subscriber,
        item: Publication,
        cache: dict[str, tuple[bytes | str, bytes]],
    ) -> bool:
        """Send ``item`` to ``subscriber`` unless it had it (whether it was
        queued to its socket now); ``cache`` holds the item's frame encoded
        and framed once per subprotocol."""
        if subscriber.buffer is not None:
            subscriber.buffer.append(item)
            return False
        if not subscriber.moves(item):
            return False  # sent already (history, or a replay after a re-follow)
        connection = subscriber.connection
        subprotocol = connection.info.subprotocol
        encoded = cache.get(subprotocol)
        if encoded is None:
            data = self._encode(follower, item, subprotocol)
            if data is None:
                return False
            encoded = cache[subprotocol] = (data, data_frame(data))
        connection.send_encoded(*encoded)
        self._counters.publication_deliveries += 1
        return True

    def _encode(
        self, follower: _Follower, item: Publication, subprotocol: str
    ) -> bytes | str | None:
        """The ``pub`` frame of ``item`` for ``subprotocol``; None (logged
        and counted as dropped) if it cannot be encoded for it (bytes or
        NaN for a JSON socket)."""
        try:
            return publication_frame(follower.name, item, subprotocol)
        except ValueError as exc:
            log.warning("publication %s/%d: %s", follower.name, item.offset, exc)
            self._counters.dropped("unencodable")
            return None

    def _deliver_missed(
        self, follower: _Follower, subscriber: _Subscriber, items: list[Publication]
    ) -> None:
        """Send ``subscriber`` the publications of ``items`` (in order) it
        did not have, in one write (`_deliver`'s rules, one by one)."""
        connection = subscriber.connection
        subprotocol = connection.info.subprotocol
        frames: list[bytes | str] = []
        for item in items:
            if not subscriber.moves(item):
                continue  # sent already
            data = self._encode(follower, item, subprotocol)
            if data is not None:
                frames.append(data)
        if not frames:
            return
        if len(frames) == 1:
            connection.send_encoded(frames[0])
        else:
            connection.send_run(frames, b"".join(map(data_frame, frames)))
        self._counters.publication_deliveries += len(frames)

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
            run = [publication, *item.more] if item.more else [publication]
            self._deliver_run(follower, run)
            # Only once every subscriber had them: if a delivery failed, the
            # stream follows again from before them (the others drop the
            # copies).
            follower.advance(run)
            self._fanned_out(item, len(run))

    def _fanned_out(self, item: Followed, count: int) -> None:
        """Count the ``count`` publications of ``item`` fanned out to this
        gateway's sockets, and the first one's latency if it was live
        (clocks of two runners: a skew between them shows; a negative one
        counts as 0)."""
        self._counters.publications += count
        if item.published_at is not None and self._clock is not None:
            latency = self._clock.now() - item.published_at
            self._counters.fanout.observe(max(latency, 0.0))

    def _deliver_run(self, follower: _Follower, run: list[Publication]) -> None:
        """Send the publications of ``run`` (one epoch, in offset order) to
        every subscriber: each socket that had none of them gets them all
        in one write, framed once per subprotocol."""
        first, last = run[0], run[-1]
        same_epoch = first.epoch == last.epoch
        frames: dict[str, tuple[list[bytes | str], bytes] | None] = {}
        cache: dict[str, tuple[bytes | str, bytes]] = {}
        for subscriber in list(follower.subscribers.values()):
            connection = subscriber.connection
            subprotocol = connection.info.subprotocol
            encoded = None
            if same_epoch and subscriber.buffer is None and subscriber.wants(first):
                if subprotocol not in frames:
                    frames[subprotocol] = self._run_frames(follower, run, subprotocol)
                encoded = frames[subprotocol]
            if encoded is None:
                # The general case, one by one: an unencodable publication
                # (bytes for a JSON socket) is dropped alone, not its run.
                for publication in run:
                    cache.clear()
                    self._deliver(follower, subscriber, publication, cache)
                continue
            subscriber.epoch = last.epoch
            subscriber.last = last.offset
            connection.send_run(encoded[0], encoded[1])
            self._counters.publication_deliveries += len(run)

    def _run_frames(
        self, follower: _Follower, run: list[Publication], subprotocol: str
    ) -> tuple[list[bytes | str], bytes] | None:
        """The ``pub`` frames of ``run`` encoded, and all of them framed
        together (None: one cannot be encoded for ``subprotocol``; the
        caller sends them one by one, and drops that one)."""
        try:
            encoded = [
                publication_frame(follower.name, item, subprotocol) for item in run
            ]
        except ValueError:  # bytes or NaN for a JSON socket
            return None
        return encoded, b"".join(data_frame(data) for data in encoded)

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
                # NOTE: the jitter is a function of who retries what, not of
                # a global random source, so a simulated run replays.
                unit = random.Random(f"{self._runner}/{follower.name}/{failures}")
                await trio.sleep(self._backoff.delay(failures - 1, unit.random()))


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
