"""The checker's invariants, fed directly (each must be able to fail)."""

from __future__ import annotations

import pytest
import trio

from trio_cluster import EntityAddress, EntityId, RunnerAddress, ShardId
from trio_cluster.abc import (
    ClaimBatch,
    ClaimedRequest,
    PersistedRequest,
    ReplyOutcome,
    ReplyRecord,
    SaveResult,
)
from trio_cluster.storage import MemoryStorage
from trio_cluster.testing import SimulationTrace
from trio_cluster.testing._simulation._invariants import Checker, Incarnation

pytestmark = pytest.mark.simulation

SHARD = ShardId("default", 1)
ADDRESS = EntityAddress("E", EntityId("e"), SHARD)
R0 = RunnerAddress("r0", 1)


def make() -> tuple[Checker, list[str], MemoryStorage]:
    storage = MemoryStorage()
    failures: list[str] = []
    checker = Checker(storage=storage, trace=SimulationTrace(), fail=failures.append)
    return checker, failures, storage


def request(request_id: int, key: str | None = "k") -> PersistedRequest:
    return PersistedRequest(request_id, ADDRESS, "go", b"", primary_key=key)


async def test_single_owner_fails_when_another_runner_still_serves(autojump_clock):
    checker, failures, _ = make()
    r0, r1 = Incarnation("r0"), Incarnation("r1")
    checker.incarnations = {"r0": r0, "r1": r1}
    r0.shard_acquired(R0, SHARD, 1)
    checker.acquired(r1, {SHARD: 2})
    assert failures == [
        "single owner: r1 acquired shard default:1 at epoch 2 while r0 still"
        " serves it at epoch 1"
    ]
    # Not when that runner is dead, or its session was lost this instant.
    r0.dead = True
    checker.acquired(r1, {SHARD: 3})
    r0.dead = False
    r0.session_lost_at = trio.current_time()
    checker.acquired(r1, {SHARD: 4})
    assert len(failures) == 1
    assert checker.overlaps == 1
    # Nor once it said it stops serving the shard (at that epoch).
    r0.session_lost_at = None
    r0.shard_stopping(R0, SHARD, 0, graceful=True)  # another epoch's host
    checker.acquired(r1, {SHARD: 5})
    assert len(failures) == 2
    r0.shard_stopping(R0, SHARD, 1, graceful=False)
    checker.acquired(r1, {SHARD: 6})
    assert len(failures) == 2
    await trio.lowlevel.checkpoint()


async def test_dedup_catches_keys_stored_twice_and_id_collisions(autojump_clock):
    checker, failures, storage = make()
    by = Incarnation("r0")
    checker.saved(by, [request(1)], [SaveResult(1, duplicate=False)])
    async with storage.open_session(name="s", lease_duration=5.0) as session:
        await session.messages.save_requests([request(1)], now=0.0)
    assert storage.has_request(1)
    checker.saved(by, [request(2)], [SaveResult(2, duplicate=False)])
    assert failures[-1].startswith("dedup: r0 stored key 'k'")
    checker.saved(by, [request(3, "other")], [SaveResult(1, duplicate=True)])
    assert "collision" in failures[-1]
    checker.saved(by, [request(4)], [SaveResult(99, duplicate=True)])
    assert "never stored" in failures[-1]
    checker.saved(by, [request(5, None)], [SaveResult(6, duplicate=False)])
    assert "without saying it is a duplicate" in failures[-1]
    count = len(failures)
    checker.saved(by, [request(7)], [SaveResult(1, duplicate=True)])  # fine
    assert len(failures) == count
    checker.saved(by, [request(1, None)], [SaveResult(1, duplicate=False)])
    assert failures[-1] == "dedup: request id 1 stored twice"
    await trio.lowlevel.checkpoint()


async def test_fencing_and_one_reply(autojump_clock):
    checker, failures, storage = make()
    by = Incarnation("r0")
    session = storage.open_session(name="s", lease_duration=5.0)
    async with session as opened:
        await opened.runners.acquire([SHARD])  # epoch 1
        checker.saved(by, [request(1)], [SaveResult(1, duplicate=False)])
        final = ReplyRecord(1, SHARD, 1, b"")
        checker.replies_saved(by, [final], [ReplyOutcome.RECORDED])
        assert failures == []
        assert checker.unanswered() == []
        checker.replies_saved(by, [final], [ReplyOutcome.RECORDED])
        assert failures[-1].startswith("one reply: r0 recorded a second final")
        stale = ReplyRecord(1, SHARD, 0, b"", sequence=0)
        checker.replies_saved(by, [stale], [ReplyOutcome.RECORDED])
        assert failures[-1].startswith("fencing: r0 recorded the chunk 0")
        checker.replies_saved(by, [stale], [ReplyOutcome.STALE_EPOCH])
        checker.replies_saved(by, [stale], [ReplyOutcome.DUPLICATE])
        assert checker.stale_refused == 1
        claimed = ClaimedRequest(1, ADDRESS, "go", b"", None, None, False, False, 0, 0)
        checker.claimed(by, {SHARD: 0}, ClaimBatch([claimed], None))
        assert failures[-1].startswith("fencing: r0 claimed #1 at epoch 0")
        checker.cleared(ADDRESS)
