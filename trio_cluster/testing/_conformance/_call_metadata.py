"""Conformance tests of the call metadata of persisted requests (test support).

Part of `StorageConformance`: what `PersistedRequest.metadata` holds is
handed back by `MessageStorage.claim`, by the first owner and by the next
one after a new epoch; a request saved without any comes back with an empty
mapping; a backend refuses metadata that cannot travel.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import attrs
import pytest
import trio

from ._base import (
    BASE_TIME,
    SHARD,
    TIMEOUT,
    ConformanceBase,
    acquire_shard,
    claim_batch,
    persisted_request,
)

if TYPE_CHECKING:
    from trio_cluster._storage_abc import StorageSession

__all__ = ["CallMetadataTests"]

METADATA = {
    "tenant": "acme",
    "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
    "unicode": "z\u00fcrich \u2603 \U0001f600",
    "quotes": "\"'\\ {}[]",
    "empty": "",
}


class CallMetadataTests(ConformanceBase):
    """Call metadata round-trips through save and claim."""

    async def test_metadata_round_trips_through_save_and_claim(
        self, session: StorageSession, other: StorageSession
    ) -> None:
        with trio.fail_after(TIMEOUT):
            epoch = await acquire_shard(session)
            with_metadata = attrs.evolve(persisted_request(1), metadata=METADATA)
            without = persisted_request(2)
            await session.messages.save_requests(
                [with_metadata, without], now=BASE_TIME
            )
            batch = await claim_batch(session, epoch)
            assert [(c.request_id, dict(c.metadata)) for c in batch.requests] == [
                (1, METADATA),
                (2, {}),
            ]
            # Redelivered by the next owner (a failover): the same metadata.
            await session.runners.release([SHARD])
            second = await acquire_shard(other)
            batch = await claim_batch(other, second)
            assert [(c.request_id, dict(c.metadata)) for c in batch.requests] == [
                (1, METADATA),
                (2, {}),
            ]

    async def test_metadata_saved_claimed_by_its_sender(
        self, session: StorageSession
    ) -> None:
        with trio.fail_after(TIMEOUT):
            epoch = await acquire_shard(session)
            request = attrs.evolve(
                persisted_request(3, claim_epoch=epoch), metadata={"k": "v"}
            )
            [result] = await session.messages.save_requests([request], now=BASE_TIME)
            assert result.claimed
            # The sender's epoch ends: the next one claims it, metadata and all.
            await session.runners.release([SHARD])
            second = await acquire_shard(session)
            batch = await claim_batch(session, second)
            assert [dict(c.metadata) for c in batch.requests] == [{"k": "v"}]

    async def test_metadata_that_cannot_travel_is_refused(
        self, session: StorageSession
    ) -> None:
        bad_values: list[Any] = [
            {"k": 1},
            {"": "v"},
            {"k": "a\x00b"},
            {f"k{i}": "v" for i in range(35)},
        ]
        with trio.fail_after(TIMEOUT):
            for number, metadata in enumerate(bad_values, start=10):
                request = attrs.evolve(persisted_request(number), metadata=metadata)
                with pytest.raises(ValueError, match=r"PersistedRequest\.metadata"):
                    await session.messages.save_requests([request], now=BASE_TIME)
            epoch = await acquire_shard(session)
            assert (await claim_batch(session, epoch)).requests == []
