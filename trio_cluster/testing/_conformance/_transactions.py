"""Conformance tests of storage transactions (test support).

What every backend must do with `MessageStorage.open_transaction` and
``save_replies(..., transaction=...)``: replies saved in a transaction take
effect at commit, vanish on rollback (by exception or cancellation), and are
reported with the outcomes they will have. SQL itself is backend-specific and
is tested by each SQL backend's own tests.
"""

from __future__ import annotations

import pytest
import trio

from trio_cluster._storage_abc import ReplyOutcome, StorageSession, StoredReplies

from ._base import BASE, SHARD, TIMEOUT, acquire, final, replies, request

__all__ = ["TransactionTests"]


class _Abort(Exception):
    pass


class TransactionTests:
    """Mixed into `StorageConformance`."""

    async def test_transaction_commit_records_replies(
        self, session: StorageSession
    ) -> None:
        with trio.fail_after(TIMEOUT):
            epoch = (await acquire(session.runners, SHARD))[SHARD]
            await session.messages.save_requests([request(1)], now=BASE)
            async with session.messages.open_transaction() as transaction:
                outcomes = await session.messages.save_replies(
                    [final(1, epoch, b"committed")], now=BASE, transaction=transaction
                )
                assert outcomes == [ReplyOutcome.RECORDED]
            assert await replies(session.messages, 1) == StoredReplies(
                1, known=True, final=b"committed"
            )

    async def test_transaction_rollback_records_nothing(
        self, session: StorageSession
    ) -> None:
        with trio.fail_after(TIMEOUT):
            epoch = (await acquire(session.runners, SHARD))[SHARD]
            await session.messages.save_requests([request(1)], now=BASE)

            async def save_then_fail() -> None:
                async with session.messages.open_transaction() as transaction:
                    await session.messages.save_replies(
                        [final(1, epoch)], now=BASE, transaction=transaction
                    )
                    raise _Abort

            with pytest.raises(_Abort):
                await save_then_fail()

            with trio.CancelScope() as scope:  # cancellation rolls back too
                async with session.messages.open_transaction() as transaction:
                    await session.messages.save_replies(
                        [final(1, epoch)], now=BASE, transaction=transaction
                    )
                    scope.cancel()
                    await trio.sleep_forever()
            assert (await replies(session.messages, 1)).final is None
            # The request is still open: a reply outside any transaction lands.
            assert await session.messages.save_replies(
                [final(1, epoch, b"later")], now=BASE
            ) == [ReplyOutcome.RECORDED]

    async def test_transaction_reports_duplicates_and_stale_epochs(
        self, session: StorageSession, other: StorageSession
    ) -> None:
        with trio.fail_after(TIMEOUT):
            epoch = (await acquire(session.runners, SHARD))[SHARD]
            await session.messages.save_requests([request(1), request(2)], now=BASE)
            await session.messages.save_replies([final(2, epoch)], now=BASE)
            async with session.messages.open_transaction() as transaction:
                outcomes = await session.messages.save_replies(
                    [
                        final(1, epoch),
                        final(1, epoch),
                        final(2, epoch),
                        final(9, epoch),
                    ],
                    now=BASE,
                    transaction=transaction,
                )
            assert outcomes == [
                ReplyOutcome.RECORDED,
                ReplyOutcome.DUPLICATE,
                ReplyOutcome.DUPLICATE,
                ReplyOutcome.UNKNOWN_REQUEST,
            ]
            await session.messages.save_requests([request(3)], now=BASE)
            await session.runners.release([SHARD])
            await acquire(other.runners, SHARD)  # the epoch moves on
            async with session.messages.open_transaction() as transaction:
                assert await session.messages.save_replies(
                    [final(3, epoch)], now=BASE, transaction=transaction
                ) == [ReplyOutcome.STALE_EPOCH]
            assert (await replies(session.messages, 3)).final is None
