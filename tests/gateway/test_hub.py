"""`TopicHub` against a scripted topic: a resubscribe whose history answer
comes after newer live publications (the stream and the answer travel on
different connections between runners) still hands out each publication
once, in order, none skipped; a run of publications with one a JSON socket
cannot take loses that one only; a socket that subscribed while the first
history read failed still gets the gateway's stream."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any, cast

import msgpack
import trio
import trio.testing

import trio_cluster as tc
from trio_cluster.gateway import JSON, MSGPACK, ClientInfo, Position, Publication
from trio_cluster.gateway._hub import TopicHub, _Follower
from trio_cluster.gateway._statistics import GatewayCounters
from trio_cluster.gateway._topics import Follow, Followed, History, new_epoch

if TYPE_CHECKING:
    from trio_cluster.gateway import ClientConnection

EPOCH = "e"


class FakeConnection:
    def __init__(self, name: str, subprotocol: str = MSGPACK) -> None:
        self.info = ClientInfo(
            id=name, principal=None, remote=name, subprotocol=subprotocol
        )
        self.offsets: list[int] = []

    def send_encoded(self, data: bytes | str, framed: bytes | None = None) -> None:
        frame = json.loads(data) if isinstance(data, str) else msgpack.unpackb(data)
        self.offsets.append(frame["offset"])

    def send_run(self, frames: list[bytes | str], framed: bytes) -> None:
        for data in frames:
            self.send_encoded(data)


class ScriptedTopic:
    """What the hub calls on a `Topic` handle, driven by the test."""

    def __init__(self) -> None:
        self.live_send, self.live = trio.open_memory_channel[Followed](100)
        self.answer_send, self.answers = trio.open_memory_channel[History | Exception](
            10
        )
        self.follows = 0
        """Streams opened."""

    def __call__(self, name: str) -> ScriptedTopic:
        return self

    async def history(self, msg: Follow) -> History:
        answer = await self.answers.receive()
        if isinstance(answer, Exception):
            raise answer
        return answer

    @asynccontextmanager
    async def follow(self, msg: Follow) -> AsyncIterator[AsyncIterator[Followed]]:
        self.follows += 1
        await trio.lowlevel.checkpoint()
        yield self._items()

    async def _items(self) -> AsyncIterator[Followed]:
        yield Followed(snapshot={})
        async for item in self.live:
            yield item


def counting_history(topic: ScriptedTopic) -> list[Position | None]:
    """The positions each history call on ``topic`` asks for, from now on."""
    asked: list[Position | None] = []
    history = topic.history

    async def counted(msg: Follow) -> History:
        asked.append(msg.since)
        return await history(msg)

    topic.history = counted  # type: ignore[method-assign]
    return asked


def publication(offset: int) -> Followed:
    return Followed(Publication(EPOCH, offset, offset))


def page(since: int, upto: int) -> History:
    items = [Publication(EPOCH, n, n) for n in range(since + 1, upto + 1)]
    return History(EPOCH, upto, True, items)


async def test_a_history_answered_after_newer_live_publications(
    autojump_clock: trio.testing.MockClock,
) -> None:
    topic = ScriptedTopic()
    async with trio.open_nursery() as nursery:
        hub = TopicHub(topic, nursery, "r1")  # type: ignore[arg-type]
        first, second = FakeConnection("a"), FakeConnection("b")
        # (Duck-typed: the hub uses a connection's info and send_encoded.)
        a, b = cast("ClientConnection", first), cast("ClientConnection", second)
        async with trio.open_nursery() as subscribing:
            subscribing.start_soon(hub.subscribe, a, "t", None)
            await trio.testing.wait_all_tasks_blocked()
            await topic.answer_send.send(page(0, 19))  # "a" starts at 19
        for offset in (20, 21):
            await topic.live_send.send(publication(offset))
        await trio.testing.wait_all_tasks_blocked()
        assert first.offsets == [20, 21]

        # "b" resumes from 19; 22 comes live before its history answer.
        value: dict[str, Any] = {}

        async def resubscribe() -> None:
            value.update(await hub.subscribe(b, "t", Position(EPOCH, 19)))

        async with trio.open_nursery() as subscribing:
            subscribing.start_soon(resubscribe)
            await trio.testing.wait_all_tasks_blocked()
            await topic.live_send.send(publication(22))
            await trio.testing.wait_all_tasks_blocked()
            await topic.answer_send.send(page(19, 22))
        assert second.offsets == [20, 21, 22]
        assert value == {"epoch": EPOCH, "offset": 22, "recovered": True}
        await topic.live_send.send(publication(23))
        await trio.testing.wait_all_tasks_blocked()
        assert first.offsets == [20, 21, 22, 23]
        assert second.offsets == [20, 21, 22, 23]
        nursery.cancel_scope.cancel()


async def test_a_run_with_a_publication_a_json_socket_cannot_take(
    autojump_clock: trio.testing.MockClock,
) -> None:
    topic = ScriptedTopic()
    counters = GatewayCounters()
    async with trio.open_nursery() as nursery:
        hub = TopicHub(topic, nursery, "r1", counters=counters)  # type: ignore[arg-type]
        text, binary = FakeConnection("t", JSON), FakeConnection("b")
        for connection in (text, binary):
            async with trio.open_nursery() as subscribing:
                subscribing.start_soon(
                    hub.subscribe, cast("ClientConnection", connection), "t", None
                )
                await trio.testing.wait_all_tasks_blocked()
                if connection is text:
                    await topic.answer_send.send(page(0, 19))
                else:
                    await topic.answer_send.send(page(19, 19))
        # One stream item with three publications: the middle one is bytes.
        run = [Publication(EPOCH, 20, {"n": 20}), Publication(EPOCH, 21, b"\x00")]
        run.append(Publication(EPOCH, 22, {"n": 22}))
        await topic.live_send.send(Followed(run[0], more=run[1:]))
        await trio.testing.wait_all_tasks_blocked()
        assert binary.offsets == [20, 21, 22]
        assert text.offsets == [20, 22]
        assert counters.drops == {"unencodable": 1}
        nursery.cancel_scope.cancel()


async def test_a_socket_that_joined_while_the_first_read_failed_gets_a_stream(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """The socket whose subscribe made the gateway follow the topic fails
    to read the history (the topic's runner unreachable) while another one
    waits for the next read: that read starts the stream (before, only the
    first subscribe did, and no socket of this gateway got a publication
    again). Found by the simulator (``subscribed_while_the_first_read_failed``)."""
    topic = ScriptedTopic()
    async with trio.open_nursery() as nursery:
        hub = TopicHub(topic, nursery, "r1")  # type: ignore[arg-type]
        first, second, third = (FakeConnection(name) for name in "abc")
        a, b = cast("ClientConnection", first), cast("ClientConnection", second)
        failed: list[Exception] = []

        async def subscribe_failing() -> None:
            try:
                await hub.subscribe(a, "t", Position(EPOCH, 5))
            except tc.RunnerUnavailableError as exc:
                failed.append(exc)

        async with trio.open_nursery() as subscribing:
            subscribing.start_soon(subscribe_failing)
            await trio.testing.wait_all_tasks_blocked()
            # "b" joins while "a"'s read is in flight: the next read is its.
            subscribing.start_soon(hub.subscribe, b, "t", Position(EPOCH, 5))
            await trio.testing.wait_all_tasks_blocked()
            await topic.answer_send.send(tc.RunnerUnavailableError(runner="r2"))
            await trio.testing.wait_all_tasks_blocked()
            assert len(failed) == 1
            assert topic.follows == 0
            await topic.answer_send.send(page(5, 7))
        assert second.offsets == [6, 7]
        for offset in (8, 9):
            await topic.live_send.send(publication(offset))
        await trio.testing.wait_all_tasks_blocked()
        assert second.offsets == [6, 7, 8, 9]
        assert first.offsets == []
        # A socket subscribing later joins the stream at once.
        value = hub.subscribe_now(cast("ClientConnection", third), "t")
        assert value == {"epoch": EPOCH, "offset": 9, "recovered": False}
        await topic.live_send.send(publication(10))
        await trio.testing.wait_all_tasks_blocked()
        assert second.offsets == [6, 7, 8, 9, 10]
        assert third.offsets == [10]
        assert topic.follows == 1
        nursery.cancel_scope.cancel()


async def test_sockets_resuming_at_once_share_one_history_read(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Ten sockets resume the topic at once from different offsets: one
    history call (from the oldest), and each gets exactly what it missed,
    then the live publications, once."""
    topic = ScriptedTopic()
    asked = counting_history(topic)
    async with trio.open_nursery() as nursery:
        hub = TopicHub(topic, nursery, "r1")  # type: ignore[arg-type]
        fakes = [FakeConnection(f"c{n}") for n in range(10)]
        values: dict[str, dict[str, Any]] = {}

        async def resume(fake: FakeConnection, since: int) -> None:
            connection = cast("ClientConnection", fake)
            value = await hub.subscribe(connection, "t", Position(EPOCH, since))
            values[fake.info.id] = value

        async with trio.open_nursery() as subscribing:
            for n, fake in enumerate(fakes):
                subscribing.start_soon(resume, fake, 10 + n)
            await trio.testing.wait_all_tasks_blocked()
            await topic.answer_send.send(page(10, 24))
        assert asked == [Position(EPOCH, 10)]
        for n, fake in enumerate(fakes):
            assert fake.offsets == list(range(11 + n, 25))
            assert values[fake.info.id] == {
                "epoch": EPOCH,
                "offset": 24,
                "recovered": True,
            }
        await topic.live_send.send(publication(25))
        await trio.testing.wait_all_tasks_blocked()
        for n, fake in enumerate(fakes):
            assert fake.offsets == list(range(11 + n, 26))
        nursery.cancel_scope.cancel()


async def test_a_resume_from_a_position_the_gateway_keeps_reads_nothing(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A gateway following the topic answers a resume from the publications
    it keeps, at once (no history call): the ones missed, then the live
    ones, once; a client ahead of the gateway gets nothing twice; one
    behind what it keeps (or in another epoch) reads the history."""
    topic = ScriptedTopic()
    asked = counting_history(topic)
    async with trio.open_nursery() as nursery:
        hub = TopicHub(topic, nursery, "r1")  # type: ignore[arg-type]
        first = FakeConnection("a")
        async with trio.open_nursery() as subscribing:
            subscribing.start_soon(
                hub.subscribe, cast("ClientConnection", first), "t", Position(EPOCH, 5)
            )
            await trio.testing.wait_all_tasks_blocked()
            await topic.answer_send.send(page(5, 9))
        assert first.offsets == [6, 7, 8, 9]
        for offset in (10, 11):
            await topic.live_send.send(publication(offset))
        await trio.testing.wait_all_tasks_blocked()
        assert asked == [Position(EPOCH, 5)]

        behind, ahead = FakeConnection("b"), FakeConnection("c")
        value = hub.resume_now(
            cast("ClientConnection", behind), "t", Position(EPOCH, 7)
        )
        assert value == {"epoch": EPOCH, "offset": 11, "recovered": True}
        assert behind.offsets == [8, 9, 10, 11]
        value = hub.resume_now(
            cast("ClientConnection", ahead), "t", Position(EPOCH, 13)
        )
        assert value == {"epoch": EPOCH, "offset": 13, "recovered": True}
        assert ahead.offsets == []
        # Older than what the gateway keeps, or another epoch: not now.
        other = cast("ClientConnection", FakeConnection("d"))
        assert hub.resume_now(other, "t", Position(EPOCH, 4)) is None
        assert hub.resume_now(other, "t", Position("old", 10)) is None
        assert asked == [Position(EPOCH, 5)]

        for offset in (12, 13, 14):
            await topic.live_send.send(publication(offset))
        await trio.testing.wait_all_tasks_blocked()
        assert first.offsets == list(range(6, 15))
        assert behind.offsets == list(range(8, 15))
        assert ahead.offsets == [14]
        nursery.cancel_scope.cancel()


def test_a_follower_keeps_consecutive_publications_only() -> None:
    follower = _Follower("t")
    follower.start_at(page(3, 6))
    assert [p.offset for p in follower.recent] == [4, 5, 6]
    assert follower.since_known(Position(EPOCH, 3))
    assert not follower.since_known(Position(EPOCH, 2))
    follower.advance([Publication(EPOCH, 7, 7), Publication(EPOCH, 8, 8)])
    assert follower.position == Position(EPOCH, 8)
    assert [p.offset for p in follower.recent] == [4, 5, 6, 7, 8]
    follower.advance([Publication(EPOCH, 10, 10)])  # a gap: start again
    assert [p.offset for p in follower.recent] == [10]
    assert not follower.since_known(Position(EPOCH, 8))
    assert follower.since_known(Position(EPOCH, 9))
    follower.advance([Publication("new", 1, 1)])  # another epoch
    assert [p.offset for p in follower.recent] == [1]
    assert follower.since_known(Position("new", 0))
    assert not follower.since_known(Position(EPOCH, 12))
    follower.start_at(History(EPOCH, 20, False, []))
    assert not follower.recent
    assert follower.since_known(Position(EPOCH, 20))
    assert not follower.since_known(Position(EPOCH, 19))


class EpochsConnection(FakeConnection):
    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.positions: list[tuple[str, int]] = []

    def send_encoded(self, data: bytes | str, framed: bytes | None = None) -> None:
        frame = msgpack.unpackb(data)
        self.positions.append((frame["epoch"], frame["offset"]))


async def test_a_late_publication_of_the_epoch_a_resume_left_is_not_sent(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """The topic moved (a new epoch) while a socket resumed: its history
    comes from the new epoch while the gateway's stream still brings the
    old one's end. That end is not sent after the new epoch's history
    (the socket's position would go back, and the new epoch's replay be
    sent again): each publication once, epochs never going back."""
    old, new = new_epoch(1, 0.0), new_epoch(2, 0.0)  # in the order they began
    topic = ScriptedTopic()
    async with trio.open_nursery() as nursery:
        hub = TopicHub(topic, nursery, "r1")  # type: ignore[arg-type]
        first, second = EpochsConnection("a"), EpochsConnection("b")
        a, b = cast("ClientConnection", first), cast("ClientConnection", second)
        async with trio.open_nursery() as subscribing:
            subscribing.start_soon(hub.subscribe, a, "t", None)
            await trio.testing.wait_all_tasks_blocked()
            await topic.answer_send.send(History(old, 5, True, []))
        value: dict[str, Any] = {}

        async def resubscribe() -> None:
            value.update(await hub.subscribe(b, "t", Position(old, 3)))

        async with trio.open_nursery() as subscribing:
            subscribing.start_soon(resubscribe)
            await trio.testing.wait_all_tasks_blocked()
            await topic.live_send.send(Followed(Publication(old, 6, 6)))  # its end
            await trio.testing.wait_all_tasks_blocked()
            page = [Publication(new, n, n) for n in (1, 2)]
            await topic.answer_send.send(History(new, 2, False, page))
        assert value == {"epoch": new, "offset": 2, "recovered": False}
        # The gateway follows the new epoch: its history replayed, then live.
        run = [Publication(new, n, n) for n in (1, 2, 3)]
        await topic.live_send.send(Followed(run[0], more=run[1:]))
        await topic.live_send.send(Followed(Publication(new, 4, 4)))
        await trio.testing.wait_all_tasks_blocked()
        assert second.positions == [(new, 1), (new, 2), (new, 3), (new, 4)]
        assert first.positions == [
            (old, 6),
            (new, 1),
            (new, 2),
            (new, 3),
            (new, 4),
        ]
        nursery.cancel_scope.cancel()


class TopicByPosition(ScriptedTopic):
    """A scripted topic whose history calls are answered by the position
    they ask for (one channel per position), in any order the test likes."""

    def __init__(self) -> None:
        super().__init__()
        self.by_since: dict[Position | None, trio.MemorySendChannel[History]] = {}
        self._receivers: dict[Position | None, trio.MemoryReceiveChannel[History]] = {}
        self.asked: list[Position | None] = []

    def answers_for(self, since: Position | None) -> trio.MemorySendChannel[History]:
        if since not in self.by_since:
            self.by_since[since], self._receivers[since] = trio.open_memory_channel[
                History
            ](10)
        return self.by_since[since]

    async def history(self, msg: Follow) -> History:
        self.asked.append(msg.since)
        self.answers_for(msg.since)
        return await self._receivers[msg.since].receive()


async def test_first_reads_answered_out_of_order_leave_no_gap(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Two sockets subscribe to a topic the gateway does not follow yet, with
    different positions (two history reads at once). The read made first
    (up to 20) is answered after the later one (up to 30), which starts the
    gateway's stream at 30: the first socket still gets 21-30 (from what
    the gateway keeps), then the live ones, each once."""
    topic = TopicByPosition()
    async with trio.open_nursery() as nursery:
        hub = TopicHub(topic, nursery, "r1")  # type: ignore[arg-type]
        first, second = FakeConnection("a"), FakeConnection("b")
        a, b = cast("ClientConnection", first), cast("ClientConnection", second)
        values: dict[str, dict[str, Any]] = {}

        async def subscribe(
            connection: ClientConnection, since: Position | None
        ) -> None:
            values[connection.info.id] = await hub.subscribe(connection, "t", since)

        async with trio.open_nursery() as subscribing:
            subscribing.start_soon(subscribe, a, None)
            subscribing.start_soon(subscribe, b, Position(EPOCH, 5))
            await trio.testing.wait_all_tasks_blocked()
            await topic.answers_for(Position(EPOCH, 5)).send(page(5, 30))
            await trio.testing.wait_all_tasks_blocked()
            await topic.answers_for(None).send(History(EPOCH, 20, False, []))
        assert values["a"] == {"epoch": EPOCH, "offset": 30, "recovered": False}
        assert values["b"] == {"epoch": EPOCH, "offset": 30, "recovered": True}
        assert first.offsets == list(range(21, 31))
        assert second.offsets == list(range(6, 31))
        await topic.live_send.send(publication(31))
        await trio.testing.wait_all_tasks_blocked()
        assert first.offsets == list(range(21, 32))
        assert second.offsets == list(range(6, 32))
        # Nothing read again (the two reads were made in either order).
        assert sorted(topic.asked, key=repr) == [None, Position(EPOCH, 5)]
        nursery.cancel_scope.cancel()


async def test_first_reads_out_of_order_read_the_gap_the_gateway_lacks(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """As above, but the stream started from a read with no publications (a
    subscribe without a position, up to 30): the gateway keeps nothing
    before 30, so the socket whose read ended at 20 reads 21-30 again."""
    topic = TopicByPosition()
    async with trio.open_nursery() as nursery:
        hub = TopicHub(topic, nursery, "r1")  # type: ignore[arg-type]
        first, second = FakeConnection("a"), FakeConnection("b")
        a, b = cast("ClientConnection", first), cast("ClientConnection", second)
        async with trio.open_nursery() as subscribing:
            subscribing.start_soon(hub.subscribe, a, "t", Position(EPOCH, 10))
            subscribing.start_soon(hub.subscribe, b, "t", None)
            await trio.testing.wait_all_tasks_blocked()
            await topic.answers_for(None).send(History(EPOCH, 30, False, []))
            await trio.testing.wait_all_tasks_blocked()
            await topic.live_send.send(publication(31))  # held for "a"
            await trio.testing.wait_all_tasks_blocked()
            await topic.answers_for(Position(EPOCH, 10)).send(page(10, 20))
            await trio.testing.wait_all_tasks_blocked()
            assert topic.asked[-1] == Position(EPOCH, 20)
            await topic.answers_for(Position(EPOCH, 20)).send(page(20, 31))
        assert first.offsets == list(range(11, 32))
        assert second.offsets == [31]
        await topic.live_send.send(publication(32))
        await trio.testing.wait_all_tasks_blocked()
        assert first.offsets == list(range(11, 33))
        assert second.offsets == [31, 32]
        nursery.cancel_scope.cancel()
