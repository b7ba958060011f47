"""Conformance tests of `MessageStorage`: saving, claiming, replies (test support).

Part of `StorageConformance`; see `trio_cluster.testing._conformance._storage`.
"""

from __future__ import annotations

import trio

from trio_cluster._storage_abc import (
    ClaimBatch,
    ClaimedRequest,
    ReplyOutcome,
    ReplyQuery,
    ReplyRecord,
    SaveResult,
    StorageSession,
    StoredChunk,
    StoredReplies,
)

from ._base import (
    BASE_TIME,
    SHARD,
    SHARD2,
    TIMEOUT,
    ConformanceBase,
    acquire_shard,
    acquire_shards,
    claim_batch,
    entity_address,
    final_reply,
    persisted_request,
    replies_of,
    saved_and_claimed,
)

__all__ = ["MessageStorageTests"]

RECORDED = ReplyOutcome.RECORDED
DUPLICATE = ReplyOutcome.DUPLICATE
STALE = ReplyOutcome.STALE_EPOCH


def chunk(
    request_id: int, epoch: int, sequence: int, payload: bytes | None = None
) -> ReplyRecord:
    data = f"chunk-{sequence}".encode() if payload is None else payload
    return ReplyRecord(
        request_id=request_id, shard=SHARD, epoch=epoch, payload=data, sequence=sequence
    )


async def claim_ids(
    session: StorageSession, epoch: int, *, now: float = BASE_TIME, limit: int = 100
) -> list[int]:
    batch = await claim_batch(session, epoch, now=now, limit=limit)
    return [claimed.request_id for claimed in batch.requests]


async def new_epoch(session: StorageSession) -> int:
    """Release and re-acquire `SHARD` (a new owner, as far as epochs go)."""
    await session.runners.release([SHARD])
    return await acquire_shard(session)


class MessageStorageTests(ConformanceBase):
    """The `MessageStorage` half of `StorageConformance`."""

    # ------------------------------------------------------------------
    # Saving and deduplication

    async def test_save_returns_one_result_per_request_in_order(
        self, session: StorageSession
    ) -> None:
        with trio.fail_after(TIMEOUT):
            batch = [
                persisted_request(1),
                persisted_request(2, entity="e2"),
                persisted_request(3, shard_id=SHARD2),
            ]
            results = await session.messages.save_requests(batch, now=BASE_TIME)
            assert results == [SaveResult(i, duplicate=False) for i in (1, 2, 3)]
            assert await session.messages.save_requests([], now=BASE_TIME) == []

    async def test_save_duplicate_primary_key_returns_original(
        self, session: StorageSession
    ) -> None:
        with trio.fail_after(TIMEOUT):
            await session.messages.save_requests(
                [persisted_request(1, primary_key="k")], now=BASE_TIME
            )
            again = persisted_request(2, primary_key="k", payload=b"other")
            assert await session.messages.save_requests([again], now=BASE_TIME + 1) == [
                SaveResult(1, duplicate=True)
            ]
            epoch = await acquire_shard(session)
            batch = await claim_batch(session, epoch)
            assert [(c.request_id, c.payload) for c in batch.requests] == [
                (1, b"payload-1")
            ]
            assert (await replies_of(session.messages, 2)).known is False

    async def test_save_duplicate_within_batch(self, session: StorageSession) -> None:
        with trio.fail_after(TIMEOUT):
            batch = [
                persisted_request(1, primary_key="k"),
                persisted_request(2, primary_key="k"),
                persisted_request(3),
                persisted_request(3),
            ]
            assert await session.messages.save_requests(batch, now=BASE_TIME) == [
                SaveResult(1, duplicate=False),
                SaveResult(1, duplicate=True),
                SaveResult(3, duplicate=False),
                SaveResult(3, duplicate=True),
            ]
            assert await claim_ids(session, await acquire_shard(session)) == [1, 3]

    async def test_save_retry_with_same_request_id_is_idempotent(
        self, session: StorageSession
    ) -> None:
        with trio.fail_after(TIMEOUT):
            first = await session.messages.save_requests(
                [persisted_request(1), persisted_request(2, primary_key="k")],
                now=BASE_TIME,
            )
            assert first == [
                SaveResult(1, duplicate=False),
                SaveResult(2, duplicate=False),
            ]
            retried = await session.messages.save_requests(
                [persisted_request(1), persisted_request(2, primary_key="k")],
                now=BASE_TIME,
            )
            assert retried == [
                SaveResult(1, duplicate=True),
                SaveResult(2, duplicate=True),
            ]
            assert await claim_ids(session, await acquire_shard(session)) == [1, 2]

    async def test_save_same_key_elsewhere_is_not_duplicate(
        self, session: StorageSession
    ) -> None:
        with trio.fail_after(TIMEOUT):
            batch = [
                persisted_request(1, primary_key="k"),
                persisted_request(2, primary_key="k", tag="other-handler"),
                persisted_request(3, primary_key="k", entity="e2"),
                persisted_request(4, primary_key="k", entity_type="Other"),
                persisted_request(5),
                persisted_request(6),
            ]
            results = await session.messages.save_requests(batch, now=BASE_TIME)
            assert results == [SaveResult(i, duplicate=False) for i in range(1, 7)]

    async def test_save_duplicate_of_finished_request_returns_final_reply(
        self, session: StorageSession
    ) -> None:
        with trio.fail_after(TIMEOUT):
            epoch = await saved_and_claimed(
                session, persisted_request(1, primary_key="k"), claim=False
            )
            await session.messages.save_replies(
                [final_reply(1, epoch, b"result")], now=BASE_TIME + 1
            )
            assert await session.messages.save_requests(
                [persisted_request(2, primary_key="k")], now=BASE_TIME + 2
            ) == [SaveResult(1, duplicate=True, final_reply=b"result")]
            assert await session.messages.save_requests(
                [persisted_request(1, primary_key="k")], now=BASE_TIME + 2
            ) == [SaveResult(1, duplicate=True, final_reply=b"result")]

    async def test_save_after_clear_address_is_not_duplicate(
        self, session: StorageSession
    ) -> None:
        with trio.fail_after(TIMEOUT):
            await session.messages.save_requests(
                [persisted_request(1, primary_key="k")], now=BASE_TIME
            )
            assert await session.messages.clear_address(entity_address()) == 1
            result = await session.messages.save_requests(
                [persisted_request(2, primary_key="k")], now=BASE_TIME
            )
            assert result == [SaveResult(2, duplicate=False)]

    # ------------------------------------------------------------------
    # Claiming

    async def test_claim_returns_only_given_shards(
        self, session: StorageSession
    ) -> None:
        with trio.fail_after(TIMEOUT):
            epochs = await acquire_shards(session.runners, SHARD, SHARD2)
            await session.messages.save_requests(
                [persisted_request(1), persisted_request(2, shard_id=SHARD2)],
                now=BASE_TIME,
            )
            assert await claim_ids(session, epochs[SHARD]) == [1]
            batch = await claim_batch(session, epochs[SHARD2], shard=SHARD2)
            assert [c.request_id for c in batch.requests] == [2]

    async def test_claim_keeps_save_order_per_entity(
        self, session: StorageSession
    ) -> None:
        with trio.fail_after(TIMEOUT):
            save = session.messages.save_requests
            await save(
                [
                    persisted_request(1),
                    persisted_request(2, entity="e2"),
                    persisted_request(3),
                ],
                now=BASE_TIME,
            )
            await save(
                [persisted_request(4, entity="e2"), persisted_request(5)], now=BASE_TIME
            )
            await save([persisted_request(6)], now=BASE_TIME)
            epoch = await acquire_shard(session)
            batch = await claim_batch(session, epoch)
            by_entity: dict[str, list[int]] = {}
            for claimed in batch.requests:
                by_entity.setdefault(str(claimed.address.entity_id), []).append(
                    claimed.request_id
                )
            assert by_entity == {"e1": [1, 3, 5, 6], "e2": [2, 4]}

    async def test_claimed_request_carries_fields_and_epoch(
        self, session: StorageSession
    ) -> None:
        with trio.fail_after(TIMEOUT):
            epoch = await acquire_shard(session)
            saved = persisted_request(
                7,
                tag="watch",
                primary_key="pk",
                deliver_at=BASE_TIME - 5,
                stream=True,
                payload=b"\x00\xff",
            )
            await session.messages.save_requests([saved], now=BASE_TIME)
            batch = await claim_batch(session, epoch)
            assert batch == ClaimBatch(
                requests=[
                    ClaimedRequest(
                        request_id=7,
                        address=entity_address(),
                        tag="watch",
                        payload=b"\x00\xff",
                        primary_key="pk",
                        deliver_at=BASE_TIME - 5,
                        stream=True,
                        interrupted=False,
                        next_sequence=0,
                        epoch=epoch,
                    )
                ],
                next_deliver_at=None,
            )

    async def test_claim_without_requests(self, session: StorageSession) -> None:
        with trio.fail_after(TIMEOUT):
            epoch = await acquire_shard(session)
            batch = await claim_batch(session, epoch)
            assert batch == ClaimBatch(requests=[], next_deliver_at=None)

    async def test_claim_limit_and_more(self, session: StorageSession) -> None:
        with trio.fail_after(TIMEOUT):
            await session.messages.save_requests(
                [persisted_request(i) for i in range(1, 6)], now=BASE_TIME
            )
            epoch = await acquire_shard(session)
            seen = []
            for expected_more in (True, True, False):
                batch = await claim_batch(session, epoch, limit=2)
                assert batch.more is expected_more
                seen += [c.request_id for c in batch.requests]
            assert seen == [1, 2, 3, 4, 5]
            assert await claim_ids(session, epoch) == []

    async def test_claim_respects_deliver_at(self, session: StorageSession) -> None:
        with trio.fail_after(TIMEOUT):
            epochs = await acquire_shards(session.runners, SHARD, SHARD2)
            batch = [
                persisted_request(1, deliver_at=BASE_TIME + 30),
                persisted_request(2, deliver_at=BASE_TIME + 10),
                persisted_request(3),
                persisted_request(4, deliver_at=BASE_TIME),
                persisted_request(5, shard_id=SHARD2, deliver_at=BASE_TIME + 5),
            ]
            await session.messages.save_requests(batch, now=BASE_TIME - 100)
            steps: list[tuple[float, list[int], float | None]]
            steps = [
                (BASE_TIME, [3, 4], BASE_TIME + 10),
                (BASE_TIME + 9, [], BASE_TIME + 10),
            ]
            steps += [
                (BASE_TIME + 10, [2], BASE_TIME + 30),
                (BASE_TIME + 31, [1], None),
            ]
            for now, ids, next_at in steps:
                claimed = await claim_batch(session, epochs[SHARD], now=now)
                assert [c.request_id for c in claimed.requests] == ids
                assert claimed.next_deliver_at == next_at

    async def test_claim_does_not_return_claimed_requests_again(
        self, session: StorageSession
    ) -> None:
        with trio.fail_after(TIMEOUT):
            epoch = await saved_and_claimed(session, persisted_request(1))
            assert await claim_ids(session, epoch) == []
            await session.messages.save_requests([persisted_request(2)], now=BASE_TIME)
            assert await claim_ids(session, epoch) == [2]

    async def test_new_epoch_reclaims_unfinished_requests(
        self, session: StorageSession, other: StorageSession
    ) -> None:
        with trio.fail_after(TIMEOUT):
            first = await acquire_shard(session)
            await session.messages.save_requests(
                [persisted_request(1), persisted_request(2)], now=BASE_TIME
            )
            assert await claim_ids(session, first) == [1, 2]
            await session.messages.save_replies([final_reply(1, first)], now=BASE_TIME)
            await session.runners.release([SHARD])
            second = await acquire_shard(other)
            assert second == first + 1
            batch = await claim_batch(other, second)
            assert [(c.request_id, c.epoch) for c in batch.requests] == [(2, second)]

    async def test_claimed_before_tells_a_reclaimed_request(
        self, session: StorageSession
    ) -> None:
        with trio.fail_after(TIMEOUT):
            first = await acquire_shard(session)
            await session.messages.save_requests(
                [persisted_request(1), persisted_request(2, claim_epoch=first)],
                now=BASE_TIME,
            )
            batch = await claim_batch(session, first)
            assert [(c.request_id, c.claimed_before) for c in batch.requests] == [
                (1, False)
            ]
            await session.messages.save_requests([persisted_request(3)], now=BASE_TIME)
            second = await new_epoch(session)
            batch = await claim_batch(session, second)
            # 1 was claimed, 2 saved claimed: both were delivered before.
            assert [(c.request_id, c.claimed_before) for c in batch.requests] == [
                (1, True),
                (2, True),
                (3, False),
            ]

    async def test_claim_skips_and_reports_stale_epochs(
        self, session: StorageSession
    ) -> None:
        with trio.fail_after(TIMEOUT):
            epochs = await acquire_shards(session.runners, SHARD, SHARD2)
            await session.messages.save_requests(
                [persisted_request(1), persisted_request(2, shard_id=SHARD2)],
                now=BASE_TIME,
            )
            current = await new_epoch(session)
            batch = await session.messages.claim(epochs, now=BASE_TIME, limit=10)
            assert [c.request_id for c in batch.requests] == [2]
            assert batch.stale_shards == {SHARD}
            assert await claim_ids(session, current) == [1]

    # ------------------------------------------------------------------
    # The claim_epoch fast path

    async def test_save_with_current_claim_epoch_stores_claimed(
        self, session: StorageSession
    ) -> None:
        with trio.fail_after(TIMEOUT):
            epoch = await acquire_shard(session)
            batch = [
                persisted_request(1, claim_epoch=epoch),
                persisted_request(2, claim_epoch=epoch, deliver_at=BASE_TIME),
            ]
            assert await session.messages.save_requests(batch, now=BASE_TIME) == [
                SaveResult(1, duplicate=False, claimed=True),
                SaveResult(2, duplicate=False, claimed=True),
            ]
            assert await claim_ids(session, epoch) == []
            assert await claim_ids(session, await new_epoch(session)) == [1, 2]

    async def test_save_with_stale_claim_epoch_stores_unclaimed(
        self, session: StorageSession
    ) -> None:
        with trio.fail_after(TIMEOUT):
            old = await acquire_shard(session)
            current = await new_epoch(session)
            result = await session.messages.save_requests(
                [persisted_request(1, claim_epoch=old)], now=BASE_TIME
            )
            assert result == [SaveResult(1, duplicate=False, claimed=False)]
            assert await claim_ids(session, current) == [1]

    async def test_save_claim_epoch_ignored_for_future_deliver_at(
        self, session: StorageSession
    ) -> None:
        with trio.fail_after(TIMEOUT):
            epoch = await acquire_shard(session)
            saved = persisted_request(1, claim_epoch=epoch, deliver_at=BASE_TIME + 10)
            assert await session.messages.save_requests([saved], now=BASE_TIME) == [
                SaveResult(1, duplicate=False, claimed=False)
            ]
            batch = await claim_batch(session, epoch)
            assert (batch.requests, batch.next_deliver_at) == ([], BASE_TIME + 10)
            assert await claim_ids(session, epoch, now=BASE_TIME + 10) == [1]

    # ------------------------------------------------------------------
    # Replies

    async def test_final_reply_marks_request_processed(
        self, session: StorageSession
    ) -> None:
        with trio.fail_after(TIMEOUT):
            epoch = await saved_and_claimed(session, persisted_request(1))
            assert await session.messages.save_replies(
                [final_reply(1, epoch, b"result")], now=BASE_TIME + 1
            ) == [RECORDED]
            assert await replies_of(session.messages, 1) == StoredReplies(
                1, known=True, final=b"result"
            )
            assert await claim_ids(session, await new_epoch(session)) == []

    async def test_only_first_final_reply_is_recorded(
        self, session: StorageSession
    ) -> None:
        with trio.fail_after(TIMEOUT):
            epoch = await saved_and_claimed(session, persisted_request(1), claim=False)
            both = [final_reply(1, epoch, b"a"), final_reply(1, epoch, b"b")]
            assert await session.messages.save_replies(both, now=BASE_TIME) == [
                RECORDED,
                DUPLICATE,
            ]
            assert await session.messages.save_replies(
                [final_reply(1, epoch, b"c")], now=BASE_TIME
            ) == [DUPLICATE]
            assert (await replies_of(session.messages, 1)).final == b"a"

    async def test_reply_with_stale_epoch_is_refused(
        self, session: StorageSession
    ) -> None:
        with trio.fail_after(TIMEOUT):
            old = await acquire_shard(session)
            await session.messages.save_requests(
                [persisted_request(1), persisted_request(2, stream=True)], now=BASE_TIME
            )
            current = await new_epoch(session)
            batch = [final_reply(1, old), chunk(2, old, 0), chunk(2, current, 0)]
            assert await session.messages.save_replies(batch, now=BASE_TIME) == [
                STALE,
                STALE,
                RECORDED,
            ]
            assert await replies_of(session.messages, 1) == StoredReplies(1, known=True)
            assert (await replies_of(session.messages, 2)).chunks == [
                StoredChunk(0, b"chunk-0")
            ]
            assert await claim_ids(session, current) == [1, 2]

    async def test_reply_to_unknown_request(self, session: StorageSession) -> None:
        with trio.fail_after(TIMEOUT):
            epoch = await acquire_shard(session)
            outcomes = await session.messages.save_replies(
                [final_reply(404, epoch), chunk(405, epoch, 0)], now=BASE_TIME
            )
            assert outcomes == [ReplyOutcome.UNKNOWN_REQUEST] * 2

    async def test_stream_chunks_resume_on_reclaim(
        self, session: StorageSession
    ) -> None:
        with trio.fail_after(TIMEOUT):
            epoch = await saved_and_claimed(
                session, persisted_request(1, stream=True), claim=False
            )
            [claimed] = (await claim_batch(session, epoch, limit=1)).requests
            assert (claimed.stream, claimed.next_sequence) == (True, 0)
            chunks = [chunk(1, epoch, seq) for seq in range(3)]
            assert (
                await session.messages.save_replies(chunks, now=BASE_TIME)
                == [RECORDED] * 3
            )
            epoch = await new_epoch(session)
            [claimed] = (await claim_batch(session, epoch, limit=1)).requests
            assert claimed.next_sequence == 3
            assert await session.messages.save_replies(
                [final_reply(1, epoch)], now=BASE_TIME
            ) == [RECORDED]
            stored = await replies_of(session.messages, 1)
            assert stored.chunks == [
                StoredChunk(i, f"chunk-{i}".encode()) for i in range(3)
            ]
            assert stored.final == b"done"

    async def test_chunk_sequence_is_recorded_once(
        self, session: StorageSession
    ) -> None:
        with trio.fail_after(TIMEOUT):
            epoch = await saved_and_claimed(
                session, persisted_request(1, stream=True), claim=False
            )
            batch = [chunk(1, epoch, 0, b"a"), chunk(1, epoch, 0, b"b")]
            assert await session.messages.save_replies(batch, now=BASE_TIME) == [
                RECORDED,
                DUPLICATE,
            ]
            assert (await replies_of(session.messages, 1)).chunks == [
                StoredChunk(0, b"a")
            ]

    async def test_chunk_after_final_is_duplicate(
        self, session: StorageSession
    ) -> None:
        with trio.fail_after(TIMEOUT):
            epoch = await saved_and_claimed(
                session, persisted_request(1, stream=True), claim=False
            )
            batch = [chunk(1, epoch, 0), final_reply(1, epoch), chunk(1, epoch, 1)]
            assert await session.messages.save_replies(batch, now=BASE_TIME) == [
                RECORDED,
                RECORDED,
                DUPLICATE,
            ]
            assert await replies_of(session.messages, 1) == StoredReplies(
                1, known=True, chunks=[StoredChunk(0, b"chunk-0")], final=b"done"
            )

    async def test_replies_for_after_sequence(self, session: StorageSession) -> None:
        with trio.fail_after(TIMEOUT):
            epoch = await saved_and_claimed(
                session, persisted_request(1, stream=True), claim=False
            )
            batch = [chunk(1, epoch, seq) for seq in (2, 0, 3, 1)] + [
                final_reply(1, epoch)
            ]
            await session.messages.save_replies(batch, now=BASE_TIME)
            for after, expected in ((-1, [0, 1, 2, 3]), (1, [2, 3]), (3, [])):
                stored = await replies_of(session.messages, 1, after)
                assert [c.sequence for c in stored.chunks] == expected
                assert stored.final == b"done"

    async def test_replies_for_answers_each_query_in_order(
        self, session: StorageSession
    ) -> None:
        with trio.fail_after(TIMEOUT):
            epoch = await saved_and_claimed(
                session, persisted_request(1), persisted_request(2), claim=False
            )
            await session.messages.save_replies(
                [final_reply(2, epoch, b"two")], now=BASE_TIME
            )
            queries = [ReplyQuery(2), ReplyQuery(999), ReplyQuery(1)]
            assert await session.messages.replies_for(queries) == [
                StoredReplies(2, known=True, final=b"two"),
                StoredReplies(999, known=False),
                StoredReplies(1, known=True),
            ]
            assert await session.messages.replies_for([]) == []

    async def test_ack_chunks_is_visible_in_replies_for(
        self, session: StorageSession
    ) -> None:
        with trio.fail_after(TIMEOUT):
            epoch = await acquire_shard(session)
            await session.messages.save_requests(
                [persisted_request(1, stream=True), persisted_request(2, stream=True)],
                now=BASE_TIME,
            )
            await session.messages.save_replies(
                [chunk(1, epoch, seq) for seq in range(3)], now=BASE_TIME
            )
            assert (await replies_of(session.messages, 1)).acked_sequence == -1
            for acks, expected in (
                ([(1, 1)], 1),
                ([(1, 0)], 1),
                ([(1, 2), (999, 5)], 2),
            ):
                await session.messages.ack_chunks(acks)
                assert (
                    await replies_of(session.messages, 1)
                ).acked_sequence == expected
            assert (await replies_of(session.messages, 2)).acked_sequence == -1
            assert len((await replies_of(session.messages, 1)).chunks) == 3

    # ------------------------------------------------------------------
    # Interrupts and deletion

    async def test_interrupt_is_seen_by_claims(self, session: StorageSession) -> None:
        with trio.fail_after(TIMEOUT):
            epoch = await acquire_shard(session)
            await session.messages.save_requests(
                [persisted_request(1), persisted_request(2), persisted_request(3)],
                now=BASE_TIME,
            )
            assert await claim_ids(session, epoch, limit=1) == [1]
            await session.messages.interrupt([1, 2])
            batch = await claim_batch(session, epoch)
            assert [(c.request_id, c.interrupted) for c in batch.requests] == [
                (2, True),
                (3, False),
            ]
            epoch = await new_epoch(session)
            batch = await claim_batch(session, epoch)
            assert [(c.request_id, c.interrupted) for c in batch.requests] == [
                (1, True),
                (2, True),
                (3, False),
            ]

    async def test_interrupt_leaves_finished_and_unknown_requests_alone(
        self, session: StorageSession
    ) -> None:
        with trio.fail_after(TIMEOUT):
            epoch = await saved_and_claimed(session, persisted_request(1), claim=False)
            await session.messages.save_replies(
                [final_reply(1, epoch, b"x")], now=BASE_TIME
            )
            await session.messages.interrupt([1, 999])
            assert await replies_of(session.messages, 1) == StoredReplies(
                1, known=True, final=b"x"
            )
            assert (await replies_of(session.messages, 999)).known is False
            assert await claim_ids(session, await new_epoch(session)) == []

    async def test_clear_address_deletes_requests_and_replies(
        self, session: StorageSession
    ) -> None:
        with trio.fail_after(TIMEOUT):
            epoch = await acquire_shard(session)
            batch = [
                persisted_request(1),
                persisted_request(2, primary_key="k", stream=True),
                persisted_request(3, entity="e2"),
            ]
            await session.messages.save_requests(batch, now=BASE_TIME)
            await session.messages.save_replies(
                [final_reply(1, epoch), chunk(2, epoch, 0)], now=BASE_TIME
            )
            assert await session.messages.clear_address(entity_address("e1")) == 2
            known = [
                r.known
                for r in await session.messages.replies_for(
                    [ReplyQuery(i) for i in (1, 2, 3)]
                )
            ]
            assert known == [False, False, True]
            assert await session.messages.save_replies(
                [final_reply(2, epoch)], now=BASE_TIME
            ) == [ReplyOutcome.UNKNOWN_REQUEST]
            assert await claim_ids(session, epoch) == [3]
            assert await session.messages.clear_address(entity_address("e1")) == 0

    async def test_delete_processed_by_age(self, session: StorageSession) -> None:
        with trio.fail_after(TIMEOUT):
            epoch = await acquire_shard(session)
            batch = [
                persisted_request(1),
                persisted_request(2),
                persisted_request(3),
                persisted_request(4, stream=True),
            ]
            await session.messages.save_requests(batch, now=BASE_TIME)
            await session.messages.save_replies(
                [final_reply(1, epoch)], now=BASE_TIME + 10
            )
            await session.messages.save_replies(
                [final_reply(2, epoch), chunk(4, epoch, 0)], now=BASE_TIME + 20
            )
            delete = session.messages.delete_processed
            assert await delete(older_than=BASE_TIME + 10, limit=100) == 0
            assert await delete(older_than=BASE_TIME + 15, limit=100) == 1
            assert (await replies_of(session.messages, 1)).known is False
            assert (await replies_of(session.messages, 2)).final == b"done"
            assert await delete(older_than=BASE_TIME + 10_000, limit=100) == 1
            known = [
                r.known
                for r in await session.messages.replies_for(
                    [ReplyQuery(i) for i in (2, 3, 4)]
                )
            ]
            assert known == [False, True, True]
            assert await claim_ids(session, await new_epoch(session)) == [3, 4]

    async def test_delete_processed_respects_limit(
        self, session: StorageSession
    ) -> None:
        with trio.fail_after(TIMEOUT):
            epoch = await saved_and_claimed(
                session, *(persisted_request(i) for i in range(1, 6)), claim=False
            )
            await session.messages.save_replies(
                [final_reply(i, epoch) for i in range(1, 6)], now=BASE_TIME
            )
            counts = [
                await session.messages.delete_processed(
                    older_than=BASE_TIME + 1, limit=n
                )
                for n in (0, 2, 2, 2, 2)
            ]
            assert counts == [0, 2, 2, 1, 0]
