"""Conformance tests of the transactional outbox (test support).

What every backend must do with ``save_requests(..., transaction=...)``:
requests saved in a transaction exist, and are notified, when it commits,
together with the replies saved in it; nothing of them remains when it
rolls back (by exception or cancellation); their results are those they
will have; and they are never saved claimed.
"""

from __future__ import annotations

import pytest
import trio

from trio_cluster._storage_abc import ReplyOutcome, StorageSession, StorageTransaction

from ._base import (
    BASE_TIME,
    SHARD,
    SHARD2,
    TIMEOUT,
    acquire_shards,
    claim_batch,
    collect,
    final_reply,
    persisted_request,
    replies_of,
    saved_and_claimed,
)

__all__ = ["OutboxTests"]


class _Abort(Exception):
    pass


class OutboxTests:
    """Mixed into `StorageConformance`."""

    async def test_requests_saved_in_a_transaction_exist_at_commit(
        self, session: StorageSession, other: StorageSession
    ) -> None:
        with trio.fail_after(TIMEOUT):
            epochs = await acquire_shards(session.runners, SHARD, SHARD2)
            await session.messages.save_requests([persisted_request(1)], now=BASE_TIME)
            [claimed] = (await claim_batch(session, epochs[SHARD])).requests
            messages = session.messages
            async with messages.open_transaction() as transaction:
                results = await messages.save_requests(
                    [
                        persisted_request(2, shard_id=SHARD2),
                        persisted_request(3, shard_id=SHARD2, primary_key="k"),
                        persisted_request(4, shard_id=SHARD2, primary_key="k"),
                    ],
                    now=BASE_TIME,
                    transaction=transaction,
                )
                assert [(r.request_id, r.duplicate, r.claimed) for r in results] == [
                    (2, False, False),
                    (3, False, False),
                    (3, True, False),
                ]
                await messages.save_replies(
                    [final_reply(claimed.request_id, epochs[SHARD])],
                    now=BASE_TIME,
                    transaction=transaction,
                )
                # Nothing of it is visible before the commit.
                assert (
                    await claim_batch(session, epochs[SHARD2], shard=SHARD2)
                ).requests == []
                assert (await replies_of(messages, 1)).final is None
            # Committed: the reply and the requests at once, and notified.
            await collect(other.messages, lambda seen: SHARD2 in seen.message_shards)
            batch = await claim_batch(session, epochs[SHARD2], shard=SHARD2)
            assert [r.request_id for r in batch.requests] == [2, 3], batch
            assert (await replies_of(messages, 1)).final == b"done"

    async def test_requests_saved_in_a_rolled_back_transaction_never_exist(
        self, session: StorageSession
    ) -> None:
        with trio.fail_after(TIMEOUT):
            epochs = await acquire_shards(session.runners, SHARD2)
            messages = session.messages

            async def save_then_fail() -> None:
                async with messages.open_transaction() as transaction:
                    await messages.save_requests(
                        [persisted_request(2, shard_id=SHARD2, primary_key="k")],
                        now=BASE_TIME,
                        transaction=transaction,
                    )
                    raise _Abort

            with pytest.raises(_Abort):
                await save_then_fail()
            with trio.CancelScope() as scope:  # cancellation rolls back too
                async with messages.open_transaction() as transaction:
                    await messages.save_requests(
                        [persisted_request(3, shard_id=SHARD2)],
                        now=BASE_TIME,
                        transaction=transaction,
                    )
                    scope.cancel()
                    await trio.sleep_forever()
            assert (
                await claim_batch(session, epochs[SHARD2], shard=SHARD2)
            ).requests == []
            # The primary key is free: a later save is no duplicate.
            [result] = await messages.save_requests(
                [persisted_request(4, shard_id=SHARD2, primary_key="k")], now=BASE_TIME
            )
            assert (result.request_id, result.duplicate) == (4, False)

    async def test_a_savepoint_undoes_only_what_its_block_saved(
        self, session: StorageSession
    ) -> None:
        with trio.fail_after(TIMEOUT):
            epochs = await acquire_shards(session.runners, SHARD, SHARD2)
            await session.messages.save_requests([persisted_request(1)], now=BASE_TIME)
            [claimed] = (await claim_batch(session, epochs[SHARD])).requests
            messages = session.messages

            async def save(transaction: StorageTransaction, *ids: int) -> list[int]:
                results = await messages.save_requests(
                    [
                        persisted_request(
                            i, shard_id=SHARD2, primary_key=f"k{3 if i == 6 else i}"
                        )
                        for i in ids
                    ],
                    now=BASE_TIME,
                    transaction=transaction,
                )
                return [r.request_id for r in results]

            async def save_then_fail(transaction: StorageTransaction) -> None:
                async with transaction.savepoint():
                    assert await save(transaction, 3) == [3]
                    await messages.save_replies(
                        [final_reply(claimed.request_id, epochs[SHARD])],
                        now=BASE_TIME,
                        transaction=transaction,
                    )
                    raise _Abort

            async with messages.open_transaction() as transaction:
                assert await save(transaction, 2) == [2]
                with pytest.raises(_Abort):
                    await save_then_fail(transaction)
                async with transaction.savepoint():
                    # 6 has 3's key: 3 is gone, so it is no duplicate.
                    assert await save(transaction, 6) == [6]
                    with trio.CancelScope() as scope:  # nested, cancelled
                        async with transaction.savepoint():
                            assert await save(transaction, 4, 5) == [4, 5]
                            scope.cancel()
                            await trio.sleep_forever()
                    assert await save(transaction, 7) == [7]
            batch = await claim_batch(session, epochs[SHARD2], shard=SHARD2)
            assert sorted(r.request_id for r in batch.requests) == [2, 6, 7], batch
            assert (await replies_of(messages, 1)).final is None

    async def test_a_transaction_reports_duplicates_of_stored_requests(
        self, session: StorageSession
    ) -> None:
        with trio.fail_after(TIMEOUT):
            epoch = await saved_and_claimed(
                session, persisted_request(1, primary_key="k")
            )
            await session.messages.save_replies([final_reply(1, epoch)], now=BASE_TIME)
            async with session.messages.open_transaction() as transaction:
                [again] = await session.messages.save_requests(
                    [persisted_request(2, primary_key="k")],
                    now=BASE_TIME,
                    transaction=transaction,
                )
            assert (again.request_id, again.duplicate, again.final_reply) == (
                1,
                True,
                b"done",
            )
            outcomes = await session.messages.save_replies(
                [final_reply(2, epoch)], now=BASE_TIME
            )
            assert outcomes == [ReplyOutcome.UNKNOWN_REQUEST]  # never stored

    async def test_a_transaction_cannot_save_requests_claimed(
        self, session: StorageSession
    ) -> None:
        with trio.fail_after(TIMEOUT):
            epochs = await acquire_shards(session.runners, SHARD)
            async with session.messages.open_transaction() as transaction:
                with pytest.raises(ValueError, match="claimed"):
                    await session.messages.save_requests(
                        [persisted_request(1, claim_epoch=epochs[SHARD])],
                        now=BASE_TIME,
                        transaction=transaction,
                    )
            batch = await claim_batch(session, epochs[SHARD])
            assert batch.requests == []
