"""Conformance tests of `MessageStorage.scan_unprocessed`: read-only paging (test support).

Part of `StorageConformance`; see `trio_cluster.testing._conformance._storage`.
"""

from __future__ import annotations

import pytest
import trio

from trio_cluster._storage_abc import StorageSession, StoredRequest

from ._base import (
    BASE_TIME,
    SHARD,
    SHARD2,
    TIMEOUT,
    ConformanceBase,
    acquire_shard,
    claim_batch,
    final_reply,
    persisted_request,
)

__all__ = ["InspectionTests"]


async def scan_ids(
    session: StorageSession, *, after_id: int | None = None, limit: int = 100
) -> list[int]:
    page = await session.messages.scan_unprocessed(after_id=after_id, limit=limit)
    return [request.request_id for request in page]


class InspectionTests(ConformanceBase):
    """The inspection part of `StorageConformance`."""

    async def test_scan_unprocessed_reads_every_unfinished_request(
        self, session: StorageSession
    ) -> None:
        with trio.fail_after(TIMEOUT):
            assert await scan_ids(session) == []
            await session.messages.save_requests(
                [
                    persisted_request(30),
                    persisted_request(10, shard_id=SHARD2),
                    persisted_request(20, deliver_at=BASE_TIME + 3600),
                    persisted_request(40, stream=True, tag="watch"),
                ],
                now=BASE_TIME,
            )
            epoch = await acquire_shard(session)
            batch = await claim_batch(session, epoch)
            assert [c.request_id for c in batch.requests] == [30, 40]
            await session.messages.save_replies([final_reply(40, epoch)], now=BASE_TIME)
            page = await session.messages.scan_unprocessed(limit=10)
            assert [r.request_id for r in page] == [10, 20, 30]
            first, delayed, claimed = page
            assert first.shard == SHARD2
            assert first.claimed_epoch is None
            assert delayed.deliver_at == BASE_TIME + 3600
            assert claimed == StoredRequest(
                request_id=30,
                shard=SHARD,
                entity_type="Counter",
                entity_id="e1",
                tag="increment",
                payload=b"payload-30",
                deliver_at=None,
                stream=False,
                claimed_epoch=epoch,
                interrupted=False,
            )

    async def test_scan_unprocessed_pages_by_request_id(
        self, session: StorageSession
    ) -> None:
        with trio.fail_after(TIMEOUT):
            ids = [5, 1, 4, 2, 3]
            await session.messages.save_requests(
                [persisted_request(i, entity=f"e{i}") for i in ids], now=BASE_TIME
            )
            assert await scan_ids(session, limit=2) == [1, 2]
            assert await scan_ids(session, after_id=2, limit=2) == [3, 4]
            assert await scan_ids(session, after_id=4, limit=2) == [5]
            assert await scan_ids(session, after_id=5, limit=2) == []
            assert await scan_ids(session, limit=0) == []

    async def test_scan_unprocessed_claims_nothing(
        self, session: StorageSession
    ) -> None:
        with trio.fail_after(TIMEOUT):
            await session.messages.save_requests(
                [persisted_request(1), persisted_request(2)], now=BASE_TIME
            )
            interrupted = persisted_request(3)
            await session.messages.save_requests([interrupted], now=BASE_TIME)
            await session.messages.interrupt([3])
            page = await session.messages.scan_unprocessed(limit=10)
            assert [r.interrupted for r in page] == [False, False, True]
            epoch = await acquire_shard(session)
            batch = await claim_batch(session, epoch)
            assert [c.request_id for c in batch.requests] == [1, 2, 3]

    async def test_scan_unprocessed_checks_its_arguments(
        self, session: StorageSession
    ) -> None:
        with trio.fail_after(TIMEOUT):
            with pytest.raises(TypeError):
                await session.messages.scan_unprocessed(after_id="1", limit=1)  # type: ignore[arg-type]
            with pytest.raises(ValueError, match="limit"):
                await session.messages.scan_unprocessed(limit=-1)
