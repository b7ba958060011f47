"""Coalesced history reads (`HistoryReads`, `narrow_history`): sockets that
resume one topic at once share reads, each read starts after every request
it answers arrived, and each socket gets what the topic would have answered
its own position."""

from __future__ import annotations

from collections import deque

import pytest
import trio
import trio.testing
from hypothesis import given, strategies as st

from trio_cluster.gateway import Position, Publication
from trio_cluster.gateway._history import HistoryReads, narrow_history
from trio_cluster.gateway._topics import History, Topic

EPOCH = "e"


def topic_state(epoch: str, offset: int, kept: int) -> Topic:
    """A `Topic`'s sequencer state: ``offset`` publications made, the last
    ``kept`` of them in its history."""
    topic = Topic.__new__(Topic)
    topic.epoch = epoch
    topic.offset = offset
    first = max(1, offset - kept + 1)
    topic.kept = deque(
        (Publication(epoch, n, n) for n in range(first, offset + 1)), maxlen=None
    )
    return topic


def answer(topic: Topic, since: Position | None) -> History:
    recovered, items = topic._since(since)
    return History(topic.epoch, topic.offset, recovered, items)


@given(
    offset=st.integers(0, 30),
    kept=st.integers(0, 30),
    older=st.integers(0, 40),
    newer=st.integers(0, 40),
    same_epoch=st.booleans(),
)
def test_a_narrowed_page_is_the_topics_answer_for_the_position(
    offset: int, kept: int, older: int, newer: int, same_epoch: bool
) -> None:
    topic = topic_state(EPOCH, offset, kept)
    epoch = EPOCH if same_epoch else "old"
    asked = Position(epoch, min(older, newer))
    since = Position(epoch, max(older, newer))
    assert narrow_history(answer(topic, asked), asked, since) == answer(topic, since)
    assert narrow_history(answer(topic, None), None, None) == answer(topic, None)


class Reads:
    """A topic's history calls, each taking a second."""

    def __init__(self, topic: Topic) -> None:
        self.topic = topic
        self.asked: list[Position | None] = []
        self.fail = False

    async def __call__(self, name: str, since: Position | None) -> History:
        assert name == "room"
        self.asked.append(since)
        await trio.sleep(1)
        if self.fail:
            raise RuntimeError("the topic's runner is gone")
        return answer(self.topic, since)


async def test_concurrent_resumes_share_reads_and_get_their_own_answer(
    autojump_clock: trio.testing.MockClock,
) -> None:
    topic = topic_state(EPOCH, 50, 20)
    reads = Reads(topic)
    got: dict[int, History] = {}
    async with trio.open_nursery() as nursery:
        history = HistoryReads(reads, nursery)

        async def resume(offset: int) -> None:
            got[offset] = await history.history("room", Position(EPOCH, offset))

        async with trio.open_nursery() as sockets:
            for offset in range(25, 50):
                sockets.start_soon(resume, offset)
    assert reads.asked == [Position(EPOCH, 25)]
    assert history.reads == 1
    for offset in range(25, 50):
        assert got[offset] == answer(topic, Position(EPOCH, offset))
    assert not got[25].recovered
    assert got[40].recovered


async def test_a_read_starts_after_the_requests_it_answers(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A request made while a read is in flight waits for the next one (the
    one in flight may have been made before its socket was registered)."""
    topic = topic_state(EPOCH, 10, 100)
    reads = Reads(topic)
    got: dict[str, tuple[float, History]] = {}
    async with trio.open_nursery() as nursery:
        history = HistoryReads(reads, nursery)

        async def resume(name: str, delay: float, offset: int) -> None:
            await trio.sleep(delay)
            page = await history.history("room", Position(EPOCH, offset))
            got[name] = (trio.current_time(), page)

        start = trio.current_time()
        async with trio.open_nursery() as sockets:
            sockets.start_soon(resume, "first", 0, 5)
            sockets.start_soon(resume, "during", 0.5, 3)
            sockets.start_soon(resume, "also during", 0.7, 8)
        assert history.reads == 2
    assert reads.asked == [Position(EPOCH, 5), Position(EPOCH, 3)]
    assert got["first"][0] - start == pytest.approx(1)
    assert got["during"][0] - start == pytest.approx(2)
    assert got["also during"][0] - start == pytest.approx(2)
    for name, offset in [("first", 5), ("during", 3), ("also during", 8)]:
        assert got[name][1] == answer(topic, Position(EPOCH, offset))


async def test_epochs_and_fresh_subscribes_read_apart(
    autojump_clock: trio.testing.MockClock,
) -> None:
    topic = topic_state(EPOCH, 10, 100)
    reads = Reads(topic)
    async with trio.open_nursery() as nursery:
        history = HistoryReads(reads, nursery)
        async with trio.open_nursery() as sockets:
            for since in [None, Position("old", 4), Position(EPOCH, 2), None]:
                sockets.start_soon(history.history, "room", since)
    assert sorted(map(str, reads.asked)) == sorted(
        map(str, [None, Position("old", 4), Position(EPOCH, 2)])
    )


async def test_a_socket_gone_does_not_cancel_the_read_and_errors_reach_all(
    autojump_clock: trio.testing.MockClock,
) -> None:
    topic = topic_state(EPOCH, 10, 100)
    reads = Reads(topic)
    errors: list[str] = []
    async with trio.open_nursery() as nursery:
        history = HistoryReads(reads, nursery)

        async def resume(offset: int, patience: float) -> None:
            with trio.move_on_after(patience):
                try:
                    await history.history("room", Position(EPOCH, offset))
                except RuntimeError as exc:
                    errors.append(str(exc))

        reads.fail = True
        async with trio.open_nursery() as sockets:
            sockets.start_soon(resume, 1, 0.5)  # gone before the answer
            sockets.start_soon(resume, 2, 10)
            sockets.start_soon(resume, 3, 10)
    assert reads.asked == [Position(EPOCH, 1)]
    assert errors == ["the topic's runner is gone"] * 2
