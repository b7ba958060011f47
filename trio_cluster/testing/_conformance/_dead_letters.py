"""Conformance tests of attempts, retries and dead letters (test support).

Part of `StorageConformance`; see `trio_cluster.testing._conformance._storage`
and the contract in `trio_cluster._storage_retries`.
"""

from __future__ import annotations

import attrs
import pytest
import trio

from trio_cluster._errors import StorageRefusedError
from trio_cluster._storage_abc import (
    MessagesAvailable,
    ReplyOutcome,
    ReplyRecord,
    StorageSession,
)
from trio_cluster._storage_retries import MAX_ERROR_TEXT, DeadLetter, RetryRecord

from ._base import (
    BASE_TIME,
    SHARD,
    TIMEOUT,
    ConformanceBase,
    acquire_shard,
    claim_batch,
    collect,
    entity_address,
    final_reply,
    persisted_request,
    replies_of,
    saved_and_claimed,
)

__all__ = ["DeadLetterTests"]


def retry(request_id: int, epoch: int, at: float, error: str = "boom") -> RetryRecord:
    return RetryRecord(
        request_id=request_id, shard=SHARD, epoch=epoch, deliver_at=at, error=error
    )


def dead_letter_reply(request_id: int, epoch: int, error: str = "boom") -> ReplyRecord:
    return attrs.evolve(final_reply(request_id, epoch, b"dead"), dead_letter=error)


class DeadLetterTests(ConformanceBase):
    """Attempts, `retry_later` and the dead letters, in `StorageConformance`."""

    # ------------------------------------------------------------------
    # Attempts

    async def test_every_claim_counts_an_attempt(self, session: StorageSession) -> None:
        with trio.fail_after(TIMEOUT):
            epoch = await saved_and_claimed(session, persisted_request(1), claim=False)
            [first] = (await claim_batch(session, epoch)).requests
            assert (first.attempts, first.last_error) == (1, None)
            await session.runners.release([SHARD])
            epoch = await acquire_shard(session)
            [second] = (await claim_batch(session, epoch)).requests
            assert (second.request_id, second.attempts) == (1, 2)

    async def test_a_request_saved_claimed_has_had_one_attempt(
        self, session: StorageSession
    ) -> None:
        with trio.fail_after(TIMEOUT):
            epoch = await acquire_shard(session)
            [saved] = await session.messages.save_requests(
                [persisted_request(1, claim_epoch=epoch)], now=BASE_TIME
            )
            assert saved.claimed
            await session.runners.release([SHARD])
            epoch = await acquire_shard(session)
            [again] = (await claim_batch(session, epoch)).requests
            assert again.attempts == 2

    # ------------------------------------------------------------------
    # retry_later

    async def test_retry_later_gives_the_request_back_when_due_with_its_error(
        self, session: StorageSession
    ) -> None:
        with trio.fail_after(TIMEOUT):
            epoch = await saved_and_claimed(session, persisted_request(1))
            outcomes = await session.messages.retry_later(
                [retry(1, epoch, BASE_TIME + 10, "KeyError: 'x'")], now=BASE_TIME
            )
            assert outcomes == [ReplyOutcome.RECORDED]
            early = await claim_batch(session, epoch, now=BASE_TIME + 5)
            assert early.requests == []
            assert early.next_deliver_at == BASE_TIME + 10
            [due] = (await claim_batch(session, epoch, now=BASE_TIME + 10)).requests
            assert (due.request_id, due.epoch) == (1, epoch)
            assert (due.attempts, due.last_error) == (2, "KeyError: 'x'")
            assert not due.claimed_before  # given back: unclaimed
            # Claimed again: not returned twice at this epoch.
            later = await claim_batch(session, epoch, now=BASE_TIME + 20)
            assert later.requests == []

    async def test_a_request_given_back_unstarted_keeps_its_attempts_count(
        self, session: StorageSession
    ) -> None:
        with trio.fail_after(TIMEOUT):
            epoch = await saved_and_claimed(session, persisted_request(1))
            await session.messages.retry_later(
                [retry(1, epoch, BASE_TIME + 1, "KeyError: 'x'")], now=BASE_TIME
            )
            [second] = (await claim_batch(session, epoch, now=BASE_TIME + 1)).requests
            assert second.attempts == 2
            unstarted = attrs.evolve(
                retry(1, epoch, BASE_TIME + 2), error=None, started=False
            )
            outcomes = await session.messages.retry_later([unstarted], now=BASE_TIME)
            assert outcomes == [ReplyOutcome.RECORDED]
            [again] = (await claim_batch(session, epoch, now=BASE_TIME + 2)).requests
            # The unstarted claim is taken back; the last error is kept.
            assert (again.attempts, again.last_error) == (2, "KeyError: 'x'")
            # Without a deliver_at, it is due as its own deliver_at allows.
            back = attrs.evolve(unstarted, deliver_at=None)
            await session.messages.retry_later([back], now=BASE_TIME)
            [due] = (await claim_batch(session, epoch, now=BASE_TIME + 2)).requests
            assert (due.request_id, due.deliver_at) == (1, BASE_TIME + 2)

    async def test_retry_later_notifies_the_shards_owner(
        self, session: StorageSession, other: StorageSession
    ) -> None:
        with trio.fail_after(TIMEOUT):
            epoch = await saved_and_claimed(session, persisted_request(1))
            await session.messages.retry_later(
                [retry(1, epoch, BASE_TIME + 3)], now=BASE_TIME
            )

            def noticed(seen: object) -> bool:
                return any(
                    isinstance(n, MessagesAvailable)
                    and SHARD in n.shards
                    and n.deliver_at == BASE_TIME + 3
                    for n in getattr(seen, "notifications", ())
                )

            for reader in (session, other):
                await collect(reader.messages, noticed)

    async def test_retry_later_is_fenced_and_leaves_answered_requests_alone(
        self, session: StorageSession
    ) -> None:
        with trio.fail_after(TIMEOUT):
            epoch = await saved_and_claimed(
                session, persisted_request(1), persisted_request(2)
            )
            await session.messages.save_replies([final_reply(2, epoch)], now=BASE_TIME)
            outcomes = await session.messages.retry_later(
                [
                    retry(1, epoch + 1, BASE_TIME),
                    retry(2, epoch, BASE_TIME),
                    retry(99, epoch, BASE_TIME),
                ],
                now=BASE_TIME,
            )
            assert outcomes == [
                ReplyOutcome.STALE_EPOCH,
                ReplyOutcome.DUPLICATE,
                ReplyOutcome.UNKNOWN_REQUEST,
            ]
            # Nothing was given back: still claimed at this epoch.
            batch = await claim_batch(session, epoch, now=BASE_TIME + 100)
            assert batch.requests == []
            assert (await replies_of(session.messages, 2)).final == b"done"

    # ------------------------------------------------------------------
    # Dead letters

    async def test_a_dead_letter_reply_keeps_a_copy_of_the_request(
        self, session: StorageSession
    ) -> None:
        with trio.fail_after(TIMEOUT):
            request = attrs.evolve(
                persisted_request(1, primary_key="order-1", payload=b"msg"),
                metadata={"tenant": "t1"},
            )
            epoch = await saved_and_claimed(session, request)
            outcomes = await session.messages.save_replies(
                [dead_letter_reply(1, epoch, "ValueError: bad")], now=BASE_TIME + 1
            )
            assert outcomes == [ReplyOutcome.RECORDED]
            assert (await replies_of(session.messages, 1)).final == b"dead"
            [letter] = await session.messages.dead_letters(limit=10)
            address = entity_address()
            assert letter == DeadLetter(
                request_id=1,
                shard=SHARD,
                entity_type=address.entity_type,
                entity_id=address.entity_id.value,
                tag=request.tag,
                payload=b"msg",
                primary_key="order-1",
                attempts=1,
                error="ValueError: bad",
                dead_at=BASE_TIME + 1,
                metadata={"tenant": "t1"},
            )
            assert dict(letter.metadata) == {"tenant": "t1"}

    async def test_a_refused_dead_letter_reply_keeps_no_copy(
        self, session: StorageSession
    ) -> None:
        with trio.fail_after(TIMEOUT):
            epoch = await saved_and_claimed(
                session, persisted_request(1), persisted_request(2)
            )
            await session.messages.save_replies([final_reply(2, epoch)], now=BASE_TIME)
            outcomes = await session.messages.save_replies(
                [dead_letter_reply(1, epoch + 1), dead_letter_reply(2, epoch)],
                now=BASE_TIME,
            )
            assert outcomes == [ReplyOutcome.STALE_EPOCH, ReplyOutcome.DUPLICATE]
            assert await session.messages.dead_letters(limit=10) == []

    async def test_dead_letters_page_by_id_and_outlive_retention(
        self, session: StorageSession
    ) -> None:
        with trio.fail_after(TIMEOUT):
            ids = [3, 1, 2]
            epoch = await saved_and_claimed(
                session, *(persisted_request(i, entity=f"e{i}") for i in ids)
            )
            await session.messages.save_replies(
                [dead_letter_reply(i, epoch, f"error {i}") for i in ids], now=BASE_TIME
            )
            deleted = await session.messages.delete_processed(
                older_than=BASE_TIME + 1, limit=10
            )
            assert deleted == 3
            letters = session.messages.dead_letters
            assert [x.request_id for x in await letters(limit=10)] == [1, 2, 3]
            assert [x.request_id for x in await letters(limit=2)] == [1, 2]
            page = await letters(after_id=2, limit=10)
            assert [(x.request_id, x.error) for x in page] == [(3, "error 3")]
            assert await letters(after_id=3, limit=10) == []
            assert await letters(limit=0) == []

    async def test_replay_saves_the_dead_letter_again_as_a_new_request(
        self, session: StorageSession, other: StorageSession
    ) -> None:
        with trio.fail_after(TIMEOUT):
            request = attrs.evolve(
                persisted_request(1, primary_key="k", payload=b"msg"),
                metadata={"trace": "x"},
            )
            epoch = await saved_and_claimed(session, request)
            await session.messages.save_replies(
                [dead_letter_reply(1, epoch)], now=BASE_TIME
            )
            replay = session.messages.replay_dead_letter
            assert await replay(1, new_request_id=50, now=BASE_TIME + 2)
            await collect(other.messages, lambda seen: SHARD in seen.message_shards)
            [again] = (await claim_batch(session, epoch, now=BASE_TIME + 2)).requests
            assert (again.request_id, again.address) == (50, request.address)
            assert (again.tag, again.payload, again.primary_key) == (
                request.tag,
                b"msg",
                None,
            )
            assert (again.attempts, again.last_error) == (1, None)
            assert dict(again.metadata) == {"trace": "x"}
            [letter] = await session.messages.dead_letters(limit=10)
            assert letter.replayed_as == 50
            # Once only; an unknown dead letter is no error.
            assert not await replay(1, new_request_id=51, now=BASE_TIME)
            assert not await replay(77, new_request_id=52, now=BASE_TIME)

    async def test_replay_refuses_a_request_id_that_is_taken(
        self, session: StorageSession
    ) -> None:
        with trio.fail_after(TIMEOUT):
            epoch = await saved_and_claimed(
                session, persisted_request(1), persisted_request(2, entity="e2")
            )
            await session.messages.save_replies(
                [dead_letter_reply(1, epoch)], now=BASE_TIME
            )
            with pytest.raises(StorageRefusedError):
                await session.messages.replay_dead_letter(
                    1, new_request_id=2, now=BASE_TIME
                )
            [letter] = await session.messages.dead_letters(limit=10)
            assert letter.replayed_as is None

    async def test_purge_deletes_dead_letters(self, session: StorageSession) -> None:
        with trio.fail_after(TIMEOUT):
            epoch = await saved_and_claimed(
                session, persisted_request(1), persisted_request(2, entity="e2")
            )
            await session.messages.save_replies(
                [dead_letter_reply(1, epoch), dead_letter_reply(2, epoch)],
                now=BASE_TIME,
            )
            purge = session.messages.purge_dead_letters
            assert await purge([1, 1, 99]) == 1
            assert [
                x.request_id for x in await session.messages.dead_letters(limit=5)
            ] == [2]
            assert await purge([]) == 0

    # ------------------------------------------------------------------
    # Arguments

    async def test_retry_and_dead_letter_arguments_are_checked(
        self, session: StorageSession
    ) -> None:
        with trio.fail_after(TIMEOUT):
            messages = session.messages
            epoch = await saved_and_claimed(session, persisted_request(1))
            chunk = ReplyRecord(1, SHARD, epoch, b"c", sequence=0, dead_letter="x")
            with pytest.raises(ValueError, match="final reply"):
                await messages.save_replies([chunk], now=BASE_TIME)
            long = "x" * (MAX_ERROR_TEXT + 1)
            with pytest.raises(ValueError, match="at most"):
                await messages.save_replies(
                    [dead_letter_reply(1, epoch, long)], now=BASE_TIME
                )
            with pytest.raises(ValueError, match="at most"):
                await messages.retry_later([retry(1, epoch, BASE_TIME, long)], now=0)
            with pytest.raises(TypeError):
                await messages.retry_later(
                    [attrs.evolve(retry(1, epoch, BASE_TIME), error=b"x")],  # type: ignore[arg-type]
                    now=0,
                )
            with pytest.raises(TypeError):
                await messages.dead_letters(limit="10")  # type: ignore[arg-type]
            with pytest.raises(TypeError):
                await messages.replay_dead_letter(
                    "1",  # type: ignore[arg-type]
                    new_request_id=2,
                    now=BASE_TIME,
                )
            with pytest.raises(TypeError):
                await messages.purge_dead_letters(["1"])  # type: ignore[list-item]
            # Nothing of it was stored.
            assert await messages.dead_letters(limit=10) == []
            batch = await claim_batch(session, epoch, now=BASE_TIME + 100)
            assert batch.requests == []
