"""Conformance tests of the durable event log (test support).

What every backend with `StorageSession.events` must do: gap-free offsets
per partition in publication order, publications in a transaction visible
(and waking readers) only at commit, reads from an offset, cursors advanced
compare-and-set and fenced by the shard's epoch (also inside a
transaction), replays (which wake the subscription's waiting readers),
positions and lag, and retention that spares what a cursor has not passed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest
import trio

from trio_cluster._storage_events import (
    CursorAdvance,
    CursorOutcome,
    EventRecord,
    EventStorage,
)

from ._base import BASE_TIME, SHARD, TIMEOUT, acquire_shards

if TYPE_CHECKING:
    from trio_cluster._storage_abc import StorageSession

__all__ = ["EventTests"]


class _Abort(Exception):
    pass


def _event(
    n: int, *, topic: str = "orders", partition: int = 0, at: float = BASE_TIME
) -> EventRecord:
    return EventRecord(topic, partition, f"k{n}", f"e{n}".encode(), at)


def _log(session: StorageSession) -> EventStorage:
    assert session.events is not None, "this backend has no event log"
    return session.events


def _advance(
    epoch: int, expected: int | None, offset: int, *, skipped: int = 0
) -> CursorAdvance:
    return CursorAdvance(
        "billing", "orders", 0, expected, offset, SHARD, epoch, skipped
    )


class EventTests:
    """Mixed into `StorageConformance`."""

    async def test_offsets_are_gap_free_per_partition_in_publication_order(
        self, session: StorageSession, other: StorageSession
    ) -> None:
        with trio.fail_after(TIMEOUT):
            log, log2 = _log(session), _log(other)
            await log.publish([_event(1), _event(2, partition=1), _event(3)])
            await log2.publish([_event(4), _event(5, topic="other")])
            read = await log.read("orders", 0, offset=0, limit=10)
            assert [(e.offset, e.key, e.payload) for e in read] == [
                (0, "k1", b"e1"),
                (1, "k3", b"e3"),
                (2, "k4", b"e4"),
            ]
            assert read[0].published_at == BASE_TIME
            assert [
                e.offset for e in await log.read("orders", 1, offset=0, limit=10)
            ] == [0]
            assert [e.key for e in await log.read("other", 0, offset=0, limit=10)] == [
                "k5"
            ]
            assert [
                e.offset for e in await log.read("orders", 0, offset=1, limit=1)
            ] == [1]
            assert await log.read("orders", 0, offset=3, limit=10) == []
            assert await log.read("nothing", 0, offset=0, limit=10) == []

    async def test_concurrent_publishers_never_leave_a_gap(
        self, session: StorageSession, other: StorageSession
    ) -> None:
        with trio.fail_after(TIMEOUT):
            logs = [_log(session), _log(other)]
            async with trio.open_nursery() as nursery:
                for i in range(20):
                    nursery.start_soon(
                        logs[i % 2].publish, [_event(2 * i), _event(2 * i + 1)]
                    )
            read = await logs[0].read("orders", 0, offset=0, limit=100)
            assert [e.offset for e in read] == list(range(40))
            # Each call's events are consecutive.
            keys = [e.key for e in read]
            for i in range(20):
                at = keys.index(f"k{2 * i}")
                assert keys[at + 1] == f"k{2 * i + 1}"

    async def test_publications_in_a_transaction_appear_and_wake_at_commit(
        self, session: StorageSession, other: StorageSession
    ) -> None:
        with trio.fail_after(TIMEOUT):
            log, reader = _log(session), _log(other)
            woken = trio.Event()

            async def wait() -> None:
                # As a reader does: read, and wait while there is nothing
                # (a wake-up may come early: it is a hint).
                while not await reader.read("orders", 0, offset=0, limit=1):
                    await reader.wait_published("orders", 0, end=0)
                woken.set()

            async with trio.open_nursery() as nursery:
                nursery.start_soon(wait)
                async with session.messages.open_transaction() as transaction:
                    await log.publish([_event(1), _event(2)], transaction=transaction)
                    assert await reader.read("orders", 0, offset=0, limit=10) == []
                    await trio.sleep(0.05)
                    assert not woken.is_set()
                # Woken by the commit (no poll here).
                await woken.wait()
            read = await reader.read("orders", 0, offset=0, limit=10)
            assert [e.key for e in read] == ["k1", "k2"]

    async def test_publications_in_a_rolled_back_transaction_never_appear(
        self, session: StorageSession
    ) -> None:
        with trio.fail_after(TIMEOUT):
            log = _log(session)

            async def publish_then_fail() -> None:
                async with session.messages.open_transaction() as transaction:
                    await log.publish([_event(1)], transaction=transaction)
                    raise _Abort

            with pytest.raises(_Abort):
                await publish_then_fail()
            await log.publish([_event(2)])
            read = await log.read("orders", 0, offset=0, limit=10)
            assert [(e.offset, e.key) for e in read] == [(0, "k2")]

    async def test_wait_published_returns_for_events_beyond_end(
        self, session: StorageSession, other: StorageSession
    ) -> None:
        with trio.fail_after(TIMEOUT):
            log, reader = _log(session), _log(other)
            await log.publish([_event(1)])
            woken = trio.Event()

            async def wait() -> None:
                # Offset 0 exists: this waits for offset 1 on.
                while not await reader.read("orders", 0, offset=1, limit=1):
                    with trio.move_on_after(0.5):
                        await reader.wait_published("orders", 0, end=1)
                woken.set()

            async with trio.open_nursery() as nursery:
                nursery.start_soon(wait)
                await trio.sleep(0.05)
                await log.publish([_event(2)])
                await woken.wait()

    async def test_a_cursor_set_wakes_its_waiter_and_says_it_moved(
        self, session: StorageSession, other: StorageSession
    ) -> None:
        with trio.fail_after(TIMEOUT):
            log, reader = _log(session), _log(other)
            assert log.wakeups_lossless, "the built-in backends promise it"
            await log.set_cursors("billing", "orders", [(0, 0)])
            answers: list[bool] = []

            async def wait() -> None:
                # Early returns are allowed (a hint): as a consumer does, it
                # reads its cursor after each, until it moved.
                while True:
                    moved = await reader.wait_published(
                        "orders", 0, end=0, subscription="billing"
                    )
                    [position] = await reader.positions("billing", "orders", [0])
                    if position.cursor != 0:
                        answers.append(moved)
                        return

            async with trio.open_nursery() as nursery:
                nursery.start_soon(wait)
                await trio.sleep(0.2)
                assert answers == []  # nothing happened: it still waits
                await log.set_cursors("billing", "orders", [(0, 5)])
            assert answers == [True]
            # A cursor already set elsewhere: it returns at once.
            assert await reader.wait_published(
                "orders", 0, end=0, subscription="billing"
            )

    async def test_a_publication_wakes_a_subscriptions_waiter_unmoved(
        self, session: StorageSession, other: StorageSession
    ) -> None:
        with trio.fail_after(TIMEOUT):
            log, reader = _log(session), _log(other)
            await log.set_cursors("billing", "orders", [(0, 0)])
            answers: list[bool] = []

            async def wait() -> None:
                # Early returns are allowed (a hint): wait for the event.
                while not await reader.read("orders", 0, offset=0, limit=1):
                    answers.append(
                        await reader.wait_published(
                            "orders", 0, end=0, subscription="billing"
                        )
                    )

            async with trio.open_nursery() as nursery:
                nursery.start_soon(wait)
                await trio.sleep(0.2)
                await log.publish([_event(1)])
            assert answers[-1:] == [False]

    async def test_cursors_are_created_advanced_compare_and_set_and_fenced(
        self, session: StorageSession
    ) -> None:
        with trio.fail_after(TIMEOUT):
            log = _log(session)
            epoch = (await acquire_shards(session.runners, SHARD))[SHARD]
            await log.publish([_event(1), _event(2), _event(3)])
            [position] = await log.positions("billing", "orders", [0])
            assert (position.cursor, position.end, position.lag) == (None, 3, 3)
            advance = log.advance_cursor
            assert await advance(_advance(epoch, None, 1)) is CursorOutcome.ADVANCED
            assert await advance(_advance(epoch, None, 2)) is CursorOutcome.MOVED
            assert await advance(_advance(epoch, 0, 2)) is CursorOutcome.MOVED
            assert await advance(_advance(epoch + 1, 1, 2)) is CursorOutcome.STALE_EPOCH
            assert (
                await advance(_advance(epoch, 1, 3, skipped=1))
                is CursorOutcome.ADVANCED
            )
            [position] = await log.positions("billing", "orders", [0])
            assert (position.cursor, position.lag, position.skipped) == (3, 0, 1)
            positions = await log.positions("billing", "orders", [2, 0])
            assert [(p.partition, p.cursor, p.end) for p in positions] == [
                (2, None, 0),
                (0, 3, 3),
            ]
            [everything] = await log.all_positions()
            assert (everything.subscription, everything.cursor) == ("billing", 3)

    async def test_a_new_epoch_refuses_the_old_owner(
        self, session: StorageSession, other: StorageSession
    ) -> None:
        with trio.fail_after(TIMEOUT):
            log = _log(session)
            epoch = (await acquire_shards(session.runners, SHARD))[SHARD]
            assert await log.advance_cursor(_advance(epoch, None, 0)) is (
                CursorOutcome.ADVANCED
            )
            await session.runners.release([SHARD])
            newer = (await acquire_shards(other.runners, SHARD))[SHARD]
            assert newer > epoch
            assert await log.advance_cursor(_advance(epoch, 0, 1)) is (
                CursorOutcome.STALE_EPOCH
            )
            assert await _log(other).advance_cursor(_advance(newer, 0, 1)) is (
                CursorOutcome.ADVANCED
            )

    async def test_a_cursor_advanced_in_a_transaction_moves_only_at_commit(
        self, session: StorageSession
    ) -> None:
        with trio.fail_after(TIMEOUT):
            log = _log(session)
            epoch = (await acquire_shards(session.runners, SHARD))[SHARD]
            await log.advance_cursor(_advance(epoch, None, 0))

            async def advance_then_fail() -> None:
                async with session.messages.open_transaction() as transaction:
                    outcome = await log.advance_cursor(
                        _advance(epoch, 0, 5), transaction=transaction
                    )
                    assert outcome is CursorOutcome.ADVANCED
                    raise _Abort

            with pytest.raises(_Abort):
                await advance_then_fail()
            [position] = await log.positions("billing", "orders", [0])
            assert position.cursor == 0
            async with session.messages.open_transaction() as transaction:
                await log.advance_cursor(_advance(epoch, 0, 2), transaction=transaction)
                [position] = await log.positions("billing", "orders", [0])
                assert position.cursor == 0
            [position] = await log.positions("billing", "orders", [0])
            assert position.cursor == 2

    async def test_set_cursors_replays_and_the_owner_sees_moved(
        self, session: StorageSession
    ) -> None:
        with trio.fail_after(TIMEOUT):
            log = _log(session)
            epoch = (await acquire_shards(session.runners, SHARD))[SHARD]
            await log.advance_cursor(_advance(epoch, None, 7))
            await log.set_cursors("billing", "orders", [(0, 2), (3, 0)])
            positions = await log.positions("billing", "orders", [0, 3])
            assert [p.cursor for p in positions] == [2, 0]
            assert (
                await log.advance_cursor(_advance(epoch, 7, 8)) is CursorOutcome.MOVED
            )
            assert await log.advance_cursor(_advance(epoch, 2, 3)) is (
                CursorOutcome.ADVANCED
            )

    async def test_retention_spares_what_a_cursor_has_not_passed(
        self, session: StorageSession
    ) -> None:
        with trio.fail_after(TIMEOUT):
            log = _log(session)
            epoch = (await acquire_shards(session.runners, SHARD))[SHARD]
            await log.publish([_event(n, at=BASE_TIME + n) for n in range(4)])
            await log.publish([_event(9, partition=1, at=BASE_TIME)])
            await log.advance_cursor(_advance(epoch, None, 2))
            deleted = await log.delete_events(
                older_than=BASE_TIME + 10, hard_older_than=BASE_TIME - 1, limit=100
            )
            # Offsets 0 and 1 (passed) of partition 0, and partition 1's
            # event (no cursor there).
            assert deleted == 3
            read = await log.read("orders", 0, offset=0, limit=10)
            assert [e.offset for e in read] == [2, 3]
            # The hard limit deletes whatever the cursors say.
            deleted = await log.delete_events(
                older_than=BASE_TIME, hard_older_than=BASE_TIME + 3, limit=100
            )
            assert deleted == 1
            assert [
                e.offset for e in await log.read("orders", 0, offset=0, limit=9)
            ] == [3]
            # Offsets are never reused.
            await log.publish([_event(5)])
            read = await log.read("orders", 0, offset=0, limit=10)
            assert [e.offset for e in read] == [3, 4]

    async def test_malformed_input_is_refused_before_anything_is_done(
        self, session: StorageSession
    ) -> None:
        with trio.fail_after(TIMEOUT):
            log = _log(session)
            with pytest.raises(TypeError):
                await log.publish([_event(1), "nope"])  # type: ignore[list-item]
            with pytest.raises(ValueError, match="partition"):
                await log.publish([_event(1), _event(2, partition=-1)])
            with pytest.raises(ValueError, match="topic"):
                await log.read("", 0, offset=0, limit=1)
            with pytest.raises(TypeError):
                await log.advance_cursor("x")  # type: ignore[arg-type]
            assert await log.read("orders", 0, offset=0, limit=10) == []
