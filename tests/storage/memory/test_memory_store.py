"""Tests of the memory message store (``storage/_memory/_store.py``): details
the storage contract leaves open, and the cost of claiming."""

from __future__ import annotations

from typing import TYPE_CHECKING

from trio_cluster.abc import (
    MessagesAvailable,
    RepliesAvailable,
    ReplyOutcome,
    RequestsInterrupted,
    SaveResult,
)
from trio_cluster.storage._memory._store import MessageStore, _ShardQueue
from trio_cluster.testing import (
    BASE_TIME,
    SHARD,
    SHARD2,
    acquire_shards,
    conformance_shard,
    entity_address,
    final_reply,
    persisted_request,
    replies_of,
)

if TYPE_CHECKING:
    pass


# ----------------------------------------------------------------------
# Messages: details the contract leaves open


async def test_retry_of_fast_path_save_reports_claimed(a):
    epoch = (await acquire_shards(a.runners, SHARD))[SHARD]
    saved = persisted_request(1, claim_epoch=epoch, primary_key="k")
    assert await a.messages.save_requests([saved], now=BASE_TIME) == [
        SaveResult(1, False, claimed=True)
    ]
    assert await a.messages.save_requests([saved], now=BASE_TIME) == [
        SaveResult(1, True, claimed=True)
    ]
    # Another request with the same key is delivered by whoever claimed it.
    same_key = persisted_request(2, claim_epoch=epoch, primary_key="k")
    assert await a.messages.save_requests([same_key], now=BASE_TIME) == [
        SaveResult(1, True)
    ]


async def test_reply_naming_another_shard_is_refused(a):
    epochs = await acquire_shards(a.runners, SHARD, SHARD2)
    await a.messages.save_requests([persisted_request(1)], now=BASE_TIME)
    wrong = final_reply(1, epochs[SHARD2], shard_id=SHARD2)
    assert await a.messages.save_replies([wrong], now=BASE_TIME) == [
        ReplyOutcome.STALE_EPOCH
    ]


async def test_claim_with_a_clock_behind_the_saver(a):
    epoch = (await acquire_shards(a.runners, SHARD))[SHARD]
    await a.messages.save_requests(
        [persisted_request(1, deliver_at=BASE_TIME + 10)], now=BASE_TIME + 20
    )
    batch = await a.messages.claim({SHARD: epoch}, now=BASE_TIME, limit=10)
    assert (batch.requests, batch.next_deliver_at) == ([], BASE_TIME + 10)
    assert [
        c.request_id
        for c in (
            await a.messages.claim({SHARD: epoch}, now=BASE_TIME + 10, limit=10)
        ).requests
    ] == [1]


async def test_claim_skips_deleted_requests(a):
    epoch = (await acquire_shards(a.runners, SHARD))[SHARD]
    batch = [
        persisted_request(1, deliver_at=BASE_TIME + 5),
        persisted_request(2, entity="e2"),
        persisted_request(3, entity="e2", deliver_at=BASE_TIME + 5),
        persisted_request(4, entity="e2", deliver_at=BASE_TIME + 9),
    ]
    await a.messages.save_requests(batch, now=BASE_TIME)
    await a.messages.save_requests([persisted_request(5)], now=BASE_TIME)
    assert await a.messages.clear_address(entity_address("e2")) == 3
    batch = await a.messages.claim({SHARD: epoch}, now=BASE_TIME + 5, limit=10)
    assert ([c.request_id for c in batch.requests], batch.next_deliver_at) == (
        [1, 5],
        None,
    )


async def test_claim_merges_shards_by_save_order(a):
    epochs = await acquire_shards(a.runners, SHARD, SHARD2)
    await a.messages.save_requests(
        [
            persisted_request(1),
            persisted_request(2, shard_id=SHARD2),
            persisted_request(3),
            persisted_request(4, shard_id=SHARD2),
        ],
        now=BASE_TIME,
    )
    batch = await a.messages.claim(epochs, now=BASE_TIME, limit=3)
    assert ([c.request_id for c in batch.requests], batch.more) == ([1, 2, 3], True)


async def test_notifications_are_coalesced(a, b):
    epoch = (await acquire_shards(a.runners, SHARD))[SHARD]
    await a.messages.save_requests(
        [persisted_request(1), persisted_request(2, deliver_at=BASE_TIME + 7)],
        now=BASE_TIME,
    )
    await a.messages.save_requests(
        [persisted_request(3, shard_id=SHARD2, deliver_at=BASE_TIME + 3)], now=BASE_TIME
    )
    await a.messages.save_requests(
        [persisted_request(4, shard_id=SHARD2, deliver_at=BASE_TIME + 9)], now=BASE_TIME
    )
    await a.messages.save_replies([final_reply(1, epoch)], now=BASE_TIME)
    await a.messages.interrupt([2, 404])
    await a.messages.save_replies([final_reply(2, epoch)], now=BASE_TIME)
    await a.messages.interrupt([2])  # finished: no notification
    expected = [
        MessagesAvailable(frozenset({SHARD, SHARD2}), BASE_TIME + 3),
        RepliesAvailable(frozenset({1, 2})),
        RequestsInterrupted(frozenset({2}), frozenset({SHARD})),
    ]
    assert await b.messages.wait_notifications() == expected
    assert await a.messages.wait_notifications() == expected
    await a.messages.interrupt([1])  # finished: no notification
    await a.messages.save_requests(
        [persisted_request(1)], now=BASE_TIME
    )  # duplicate: nothing saved
    await a.messages.save_requests([persisted_request(5)], now=BASE_TIME)
    assert await b.messages.wait_notifications() == [
        MessagesAvailable(frozenset({SHARD}))
    ]


async def test_retention_heap_drops_garbage(storage, a, monkeypatch):
    monkeypatch.setattr(MessageStore, "COMPACT_AFTER", 3)
    epoch = (await acquire_shards(a.runners, SHARD))[SHARD]
    ids = range(1, 21)  # odd ids for entity e1, even ones for e0
    await a.messages.save_requests(
        [persisted_request(i, entity=f"e{i % 2}") for i in ids], now=BASE_TIME
    )
    await a.messages.save_replies([final_reply(i, epoch) for i in ids], now=BASE_TIME)
    assert await a.messages.clear_address(entity_address("e0")) == 10  # garbage stays
    assert len(storage._messages._processed) == 20
    # Skips the garbage entries of 2, 4 and 6 while deleting 1, 3, 5 and 7.
    assert await a.messages.delete_processed(older_than=BASE_TIME + 1, limit=4) == 4
    assert await a.messages.clear_address(entity_address("e1")) == 6  # compacts
    assert storage._messages._processed == []
    await a.messages.save_requests([persisted_request(21)], now=BASE_TIME)
    await a.messages.save_replies([final_reply(21, epoch)], now=BASE_TIME + 1)
    assert await a.messages.delete_processed(older_than=BASE_TIME + 2, limit=10) == 1
    assert (await replies_of(a.messages, 21)).known is False


async def test_claim_touches_only_nonempty_requested_shards(a, monkeypatch):
    """A runner holding 300 shards claims often: empty shards must cost one
    lookup, and requests claimed at this epoch must not be looked at."""
    shards = [conformance_shard(n) for n in range(1, 301)]
    epochs = await a.runners.acquire(shards)
    await a.messages.save_requests(
        [persisted_request(i, claim_epoch=epochs[SHARD]) for i in range(1, 5001)],
        now=BASE_TIME,
    )
    await a.messages.save_requests(
        [persisted_request(9001, shard_id=conformance_shard(300))], now=BASE_TIME
    )
    heads = []
    original = _ShardQueue.head

    def head(queue: _ShardQueue, now: float) -> int | None:
        heads.append(len(queue.ready))
        return original(queue, now)

    monkeypatch.setattr(_ShardQueue, "head", head)
    batch = await a.messages.claim(epochs, now=BASE_TIME, limit=100)
    assert [c.request_id for c in batch.requests] == [9001]
    # shard 1 (5000 in flight, nothing ready) and shard 300 once before and
    # once after claiming its request; never a scan of the in-flight ones.
    assert heads == [0, 1, 0]
    heads.clear()
    assert (await a.messages.claim(epochs, now=BASE_TIME, limit=100)).requests == []
    assert heads == [0, 0]
