"""Conformance tests of storage transactions (test support).

What every backend must do with `MessageStorage.open_transaction` and
``save_replies(..., transaction=...)``: replies saved in a transaction take
effect at commit, vanish on rollback (by exception or cancellation), and are
reported with the outcomes they will have; and while a transaction that saved
a reply is open, no acquisition moves that shard's epoch (so its reply never
commits after a successor's acquisition). SQL itself is backend-specific and
is tested by each SQL backend's own tests.
"""

from __future__ import annotations

import pytest
import trio

from trio_cluster._storage_abc import ReplyOutcome, StorageSession, StoredReplies

from ._base import (
    BASE_TIME,
    SHARD,
    SHARD2,
    TIMEOUT,
    acquire_shards,
    final_reply,
    persisted_request,
    replies_of,
    saved_and_claimed,
)

__all__ = ["TransactionTests"]


class _Abort(Exception):
    pass


class TransactionTests:
    """Mixed into `StorageConformance`."""

    async def test_transaction_commit_records_replies(
        self, session: StorageSession
    ) -> None:
        with trio.fail_after(TIMEOUT):
            epoch = await saved_and_claimed(session, persisted_request(1), claim=False)
            async with session.messages.open_transaction() as transaction:
                outcomes = await session.messages.save_replies(
                    [final_reply(1, epoch, b"committed")],
                    now=BASE_TIME,
                    transaction=transaction,
                )
                assert outcomes == [ReplyOutcome.RECORDED]
            assert await replies_of(session.messages, 1) == StoredReplies(
                1, known=True, final=b"committed"
            )

    async def test_transaction_rollback_records_nothing(
        self, session: StorageSession
    ) -> None:
        with trio.fail_after(TIMEOUT):
            epoch = await saved_and_claimed(session, persisted_request(1), claim=False)

            async def save_then_fail() -> None:
                async with session.messages.open_transaction() as transaction:
                    await session.messages.save_replies(
                        [final_reply(1, epoch)], now=BASE_TIME, transaction=transaction
                    )
                    raise _Abort

            with pytest.raises(_Abort):
                await save_then_fail()

            with trio.CancelScope() as scope:  # cancellation rolls back too
                async with session.messages.open_transaction() as transaction:
                    await session.messages.save_replies(
                        [final_reply(1, epoch)], now=BASE_TIME, transaction=transaction
                    )
                    scope.cancel()
                    await trio.sleep_forever()
            assert (await replies_of(session.messages, 1)).final is None
            # The request is still open: a reply outside any transaction lands.
            assert await session.messages.save_replies(
                [final_reply(1, epoch, b"later")], now=BASE_TIME
            ) == [ReplyOutcome.RECORDED]

    async def test_transaction_reports_duplicates_and_stale_epochs(
        self, session: StorageSession, other: StorageSession
    ) -> None:
        with trio.fail_after(TIMEOUT):
            epoch = await saved_and_claimed(
                session, persisted_request(1), persisted_request(2), claim=False
            )
            await session.messages.save_replies([final_reply(2, epoch)], now=BASE_TIME)
            async with session.messages.open_transaction() as transaction:
                outcomes = await session.messages.save_replies(
                    [
                        final_reply(1, epoch),
                        final_reply(1, epoch),
                        final_reply(2, epoch),
                        final_reply(9, epoch),
                    ],
                    now=BASE_TIME,
                    transaction=transaction,
                )
            assert outcomes == [
                ReplyOutcome.RECORDED,
                ReplyOutcome.DUPLICATE,
                ReplyOutcome.DUPLICATE,
                ReplyOutcome.UNKNOWN_REQUEST,
            ]
            await session.messages.save_requests([persisted_request(3)], now=BASE_TIME)
            await session.runners.release([SHARD])
            await acquire_shards(other.runners, SHARD)  # the epoch moves on
            async with session.messages.open_transaction() as transaction:
                assert await session.messages.save_replies(
                    [final_reply(3, epoch)], now=BASE_TIME, transaction=transaction
                ) == [ReplyOutcome.STALE_EPOCH]
            assert (await replies_of(session.messages, 3)).final is None

    async def test_open_transaction_with_a_reply_holds_off_acquisitions(
        self, session: StorageSession, other: StorageSession
    ) -> None:
        # The epoch a reply was saved under in a transaction stays current
        # until the transaction ends: an acquisition meanwhile (the old owner
        # released the shard, e.g. its lease lapsed) leaves the shard out,
        # without waiting, so the reply never commits after a successor's
        # acquisition. Once the transaction is over, the shard is acquired.
        with trio.fail_after(TIMEOUT):
            epoch = await saved_and_claimed(session, persisted_request(1), claim=False)
            async with session.messages.open_transaction() as transaction:
                assert await session.messages.save_replies(
                    [final_reply(1, epoch, b"in time")],
                    now=BASE_TIME,
                    transaction=transaction,
                ) == [ReplyOutcome.RECORDED]
                await session.runners.release([SHARD])
                assert await other.runners.acquire([SHARD, SHARD2]) == {SHARD2: 1}
            assert (await replies_of(other.messages, 1)).final == b"in time"
            assert await acquire_shards(other.runners, SHARD) == {SHARD: epoch + 1}
            # A rolled-back transaction lets go of the shard as well.
            await other.messages.save_requests([persisted_request(2)], now=BASE_TIME)

            async def reply_then_fail() -> None:
                async with other.messages.open_transaction() as transaction:
                    await other.messages.save_replies(
                        [final_reply(2, epoch + 1)],
                        now=BASE_TIME,
                        transaction=transaction,
                    )
                    await other.runners.release([SHARD])
                    assert await session.runners.acquire([SHARD]) == {}
                    raise _Abort

            with pytest.raises(_Abort):
                await reply_then_fail()
            assert await acquire_shards(session.runners, SHARD) == {SHARD: epoch + 2}
            assert (await replies_of(session.messages, 2)).final is None
