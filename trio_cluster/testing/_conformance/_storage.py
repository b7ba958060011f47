"""`StorageConformance`: the test suite every storage backend must pass (test support).

The suite tests exactly what the storage contract (`trio_cluster.abc`)
promises, through its public methods only, so `MemoryStorage` and the
PostgreSQL backend are held to the same behaviour. The tests are split by
concept: `_conformance_messages` (saving, claiming, replies, deletion),
`_conformance_runners` (registry, locks, leases, fencing),
`_conformance_transactions` (transactions), `_inspection` (read-only
paging of unprocessed requests), `_dead_letters` (attempts, retries and
dead letters), `_outbox` (requests saved in a transaction), `_state`
(durable entity state), `_events` (the durable event log) and, here,
notifications.

Every test runs under a ``trio.fail_after`` guard, passes explicit ``now``
values (relative to a fixed `BASE_TIME` time), and waits for asynchronous effects
by polling or waiting under that deadline, so the suite works on a real clock
against a real database as well as on virtual time. Only the lease tests
sleep; they take the `clock` fixture, so a memory backend can run them on a
``MockClock``.
"""

from __future__ import annotations

import attrs
import trio

from trio_cluster._storage_abc import (
    MessagesAvailable,
    ReplyOutcome,
    ReplyQuery,
    StorageSession,
)

from ._base import (
    BASE_TIME,
    SHARD,
    SHARD2,
    TIMEOUT,
    Seen,
    acquire_shard,
    acquire_shards,
    collect,
    conformance_shard,
    final_reply,
    persisted_request,
    saved_and_claimed,
)
from ._call_metadata import CallMetadataTests
from ._dead_letters import DeadLetterTests
from ._events import EventTests
from ._inspection import InspectionTests
from ._messages import MessageStorageTests, chunk
from ._outbox import OutboxTests
from ._runners import RunnerStorageTests
from ._state import StateTests
from ._state_listing import StateListingTests
from ._transactions import TransactionTests

__all__ = ["StorageConformance"]


def _earliest_deliver_at(seen: Seen, shard: object) -> float | None:
    times = [
        n.deliver_at
        for n in seen.notifications
        if isinstance(n, MessagesAvailable)
        and shard in n.shards
        and n.deliver_at is not None
    ]
    return min(times, default=None)


class StorageConformance(
    MessageStorageTests,
    InspectionTests,
    RunnerStorageTests,
    TransactionTests,
    CallMetadataTests,
    DeadLetterTests,
    OutboxTests,
    StateTests,
    StateListingTests,
    EventTests,
):
    """Base class of a backend's conformance tests (pytest with pytest-trio).

    Subclass it in a test module whose name pytest collects (``Test...``) and
    provide a ``storage`` fixture that returns (or yields) a fresh, isolated
    `trio_cluster.abc.Storage` for each test. Optionally override:

    * ``lease_duration`` (float seconds, default 1.5): the lease of every
      session the suite opens; the lease tests sleep a few times this long;
    * ``clock``: None (real time, the default) or a `trio.abc.Clock` for the
      tests that sleep, e.g. pytest-trio's ``autojump_clock``.

    Example::

        class TestMemoryStorage(StorageConformance):
            @pytest.fixture
            def storage(self) -> Storage:
                return MemoryStorage()

            @pytest.fixture
            def clock(self, autojump_clock: MockClock) -> MockClock:
                return autojump_clock

    The suite opens sessions named ``conformance-*``.

    A backend that sends `RepliesAvailable` for replies recorded with
    ``ReplyRecord.notify`` False (allowed: a hint) sets the class attribute
    ``omits_unneeded_reply_notifications`` to False.
    """

    omits_unneeded_reply_notifications = True
    """Whether a reply recorded with ``notify=False`` goes unnotified."""

    # ------------------------------------------------------------------
    # Notifications

    async def test_saves_notify_every_session_including_the_writer(
        self, session: StorageSession, other: StorageSession
    ) -> None:
        with trio.fail_after(TIMEOUT):
            await session.messages.save_requests(
                [persisted_request(1, shard_id=SHARD2)], now=BASE_TIME
            )
            for reader in (session, other):
                await collect(
                    reader.messages, lambda seen: SHARD2 in seen.message_shards
                )

    async def test_saves_stored_claimed_or_duplicate_do_not_notify(
        self, session: StorageSession, other: StorageSession
    ) -> None:
        with trio.fail_after(TIMEOUT):
            epoch = await acquire_shard(session)
            save = session.messages.save_requests
            await save(
                [persisted_request(1, shard_id=SHARD2, primary_key="k")], now=BASE_TIME
            )
            for reader in (session, other):
                await collect(
                    reader.messages, lambda seen: SHARD2 in seen.message_shards
                )

            [claimed] = await save(
                [persisted_request(2, claim_epoch=epoch)], now=BASE_TIME
            )
            assert claimed.claimed
            [duplicate] = await save(
                [persisted_request(3, shard_id=SHARD2, primary_key="k")], now=BASE_TIME
            )
            assert duplicate.duplicate
            # A marker: notifications arrive in order, so once it is seen,
            # any notification of the two saves above would have been too.
            await save(
                [persisted_request(4, shard_id=conformance_shard(3))], now=BASE_TIME
            )
            for reader in (session, other):
                seen = await collect(
                    reader.messages,
                    lambda seen: conformance_shard(3) in seen.message_shards,
                )
                assert SHARD not in seen.message_shards
                assert SHARD2 not in seen.message_shards

    async def test_replies_notify_every_session(
        self, session: StorageSession, other: StorageSession
    ) -> None:
        with trio.fail_after(TIMEOUT):
            epoch = await saved_and_claimed(
                session,
                persisted_request(1),
                persisted_request(2, stream=True),
                claim=False,
            )
            await session.messages.save_replies(
                [final_reply(1, epoch), chunk(2, epoch, 0)], now=BASE_TIME
            )
            for reader in (session, other):
                await collect(reader.messages, lambda seen: {1, 2} <= seen.reply_ids)

    async def test_a_reply_nobody_else_waits_for_is_recorded_unnotified(
        self, session: StorageSession, other: StorageSession
    ) -> None:
        with trio.fail_after(TIMEOUT):
            epoch = await saved_and_claimed(
                session, persisted_request(1), persisted_request(2)
            )
            save = session.messages.save_replies
            quiet = attrs.evolve(final_reply(1, epoch, b"one"), notify=False)
            assert await save([quiet], now=BASE_TIME) == [ReplyOutcome.RECORDED]
            assert await save([quiet], now=BASE_TIME) == [ReplyOutcome.DUPLICATE]
            # A marker: notifications arrive in order.
            assert await save([final_reply(2, epoch)], now=BASE_TIME) == [
                ReplyOutcome.RECORDED
            ]
            for reader in (session, other):
                seen = await collect(reader.messages, lambda seen: 2 in seen.reply_ids)
                if self.omits_unneeded_reply_notifications:
                    assert 1 not in seen.reply_ids
            [stored] = await session.messages.replies_for([ReplyQuery(1)])
            assert stored.final == b"one"

    async def test_interrupt_notifies_every_session(
        self, session: StorageSession, other: StorageSession
    ) -> None:
        with trio.fail_after(TIMEOUT):
            await session.messages.save_requests(
                [persisted_request(1, shard_id=SHARD2), persisted_request(2)],
                now=BASE_TIME,
            )
            await other.messages.interrupt([1])
            for reader in (session, other):
                seen = await collect(
                    reader.messages, lambda seen: 1 in seen.interrupted_ids
                )
                assert SHARD2 in seen.interrupted_shards
                assert 2 not in seen.interrupted_ids

    async def test_wait_notifications_blocks_until_a_write(
        self,
        session: StorageSession,
        other: StorageSession,
        clock: trio.abc.Clock | None,
    ) -> None:
        with trio.fail_after(TIMEOUT):
            with trio.move_on_after(0.2) as scope:
                await other.messages.wait_notifications()
            assert scope.cancelled_caught, (
                "wait_notifications returned without any write"
            )
            seen: list[Seen] = []

            async def wait() -> None:
                seen.append(
                    await collect(other.messages, lambda s: SHARD in s.message_shards)
                )

            async with trio.open_nursery() as nursery:
                nursery.start_soon(wait)
                await session.messages.save_requests(
                    [persisted_request(1)], now=BASE_TIME
                )
            assert len(seen) == 1

    async def test_cancelled_wait_loses_nothing(
        self, session: StorageSession, other: StorageSession
    ) -> None:
        with trio.fail_after(TIMEOUT):
            await session.messages.save_requests([persisted_request(1)], now=BASE_TIME)
            await session.messages.save_requests(
                [persisted_request(2, shard_id=SHARD2)], now=BASE_TIME
            )
            with trio.CancelScope() as scope:
                scope.cancel()
                await other.messages.wait_notifications()
            assert scope.cancelled_caught
            await collect(
                other.messages, lambda seen: {SHARD, SHARD2} <= seen.message_shards
            )

    async def test_coalesced_notifications_lose_nothing(
        self, session: StorageSession, other: StorageSession
    ) -> None:
        with trio.fail_after(TIMEOUT):
            epochs = await acquire_shards(session.runners, SHARD, SHARD2)
            save = session.messages.save_requests
            await save([persisted_request(1)], now=BASE_TIME)
            await save([persisted_request(2, shard_id=SHARD2)], now=BASE_TIME)
            await session.messages.save_replies(
                [final_reply(1, epochs[SHARD])], now=BASE_TIME
            )
            await session.messages.save_replies(
                [final_reply(2, epochs[SHARD2], shard_id=SHARD2)], now=BASE_TIME
            )
            await collect(
                other.messages,
                lambda seen: (
                    {SHARD, SHARD2} <= seen.message_shards and {1, 2} <= seen.reply_ids
                ),
            )

    async def test_messages_available_carries_earliest_deliver_at(
        self, session: StorageSession, other: StorageSession
    ) -> None:
        with trio.fail_after(TIMEOUT):
            batch = [
                persisted_request(1, deliver_at=BASE_TIME + 50),
                persisted_request(2, entity="e2", deliver_at=BASE_TIME + 40),
                persisted_request(3, entity="e3", deliver_at=BASE_TIME + 60),
            ]
            await session.messages.save_requests(batch, now=BASE_TIME)
            await collect(
                other.messages,
                lambda seen: _earliest_deliver_at(seen, SHARD) == BASE_TIME + 40,
            )
