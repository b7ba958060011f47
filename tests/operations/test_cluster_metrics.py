"""Errors by type, redeliveries, healthy runners and readiness
(`RunnerStatistics`, `trio_cluster._operations._metrics`)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, AsyncExitStack
from typing import ClassVar

import attrs
import pytest
import trio
import trio.testing

import trio_cluster as tc
from trio_cluster._engine._error_counts import ERROR_LABELS
from trio_cluster._operations._metrics import _respond, render_metrics, serve_metrics
from trio_cluster.storage import MemoryStorage

from ..helpers import (
    Add,
    Boom,
    Count,
    Counter,
    Elsewhere,
    Get,
    Sleep,
    TooBig,
    config,
    http_get,
    runner_config,
)
from ..memory_cluster import Nap, Refused, Tally, open_cluster

# ----------------------------------------------------------------------
# Errors raised to callers, by type


class Tiny(Counter):
    type_name = "metrics.Tiny"
    mailbox_capacity = 1


@attrs.frozen
class Keyed:
    key: str


class Picky(tc.Entity):
    type_name = "metrics.Picky"

    @tc.rpc(persisted=True, primary_key=lambda msg: msg.key)
    async def keyed(self, msg: Keyed) -> None:
        pass


async def read_all(
    opened: AbstractAsyncContextManager[AsyncIterator[int]],
    each: Callable[[int], object] = lambda item: None,
) -> None:
    """Read a stream to its end, calling ``each`` on every item."""
    async with opened as items:
        async for item in items:
            each(item)


async def test_errors_raised_to_callers_are_counted_by_type(autojump_clock):
    cfg = config(max_message_size=64 * 1024)
    async with tc.open_runner(
        entities=[Counter, Tiny, Tally, Picky], config=cfg
    ) as runner:
        counter = runner.client(Counter)("c")
        with pytest.raises(tc.RemoteError):
            await counter.boom(Boom("x"))
        with pytest.raises(TooBig):  # declared
            await counter.add(Add(5000))
        with pytest.raises(tc.MessageTooLargeError):
            await counter.boom.discard(Boom("x" * 100_000))
        with pytest.raises(tc.EntityNotAssignedError):
            await runner.client(Elsewhere)("nobody hosts it").ping(Get())
        with pytest.raises(tc.EntityDefinitionError):  # a bad primary_key
            await runner.client(Picky)("p").keyed(Keyed(""))
        tiny = runner.client(Tiny)("t")
        async with trio.open_nursery() as nursery:
            nursery.start_soon(tiny.sleep, Sleep(10))
            await trio.testing.wait_all_tasks_blocked()
            with pytest.raises(tc.MailboxFullError):
                await tiny.get(Get())
            nursery.cancel_scope.cancel()
        # A stream: its declared error is counted where it is read; what the
        # caller's own block raises is not.
        tally = runner.client(Tally)("s")
        with pytest.raises(Refused):
            await read_all(tally.count_then_refuse(Count(2)))
        with pytest.raises(ZeroDivisionError):
            await read_all(tally.count(Count(2)), each=lambda item: 1 / 0)
        # Cancelled calls are not errors.
        with trio.move_on_after(1):
            await counter.sleep(Sleep(5))
        stats = runner.statistics()
    assert stats.errors_by_type == {
        "RemoteError": 1,
        "declared": 2,
        "MessageTooLargeError": 1,
        "EntityNotAssignedError": 1,
        "other": 1,
        "MailboxFullError": 1,
    }
    assert set(stats.errors_by_type) <= set(ERROR_LABELS)
    text = render_metrics(stats)
    runner_label = f'runner="{stats.address}"'
    assert "# TYPE trio_cluster_errors_total counter" in text
    assert (
        f'trio_cluster_errors_total{{{runner_label},type="MailboxFullError"}} 1' in text
    )
    assert f'trio_cluster_errors_total{{{runner_label},type="declared"}} 2' in text


async def test_remote_callers_errors_are_counted_on_the_callers_runner(
    autojump_clock,
):
    async with AsyncExitStack() as stack:
        cluster = await open_cluster(stack, [1, 2])
        caller = cluster.runners[1]
        entity = cluster.remote_id(caller)
        with pytest.raises(Refused):
            await read_all(caller.client(Tally)(entity).count_then_refuse(Count(1)))

        async def cut() -> None:
            await trio.sleep(1)
            cluster.network.partition(caller.address, cluster.runners[2].address)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(cut)
            with pytest.raises(tc.RunnerUnavailableError):  # lost on its way
                await caller.client(Tally)(entity).nap(Nap(10))
        assert caller.statistics().errors_by_type == {
            "declared": 1,
            "RunnerUnavailableError": 1,
        }
        assert cluster.runners[2].statistics().errors_by_type == {}


# ----------------------------------------------------------------------
# Redeliveries


@attrs.frozen
class Job:
    name: str


class Worker(tc.Entity):
    type_name = "metrics.Worker"
    runs: ClassVar[list[str]] = []
    start_failures: ClassVar[int] = 0

    async def on_start(self) -> None:
        if Worker.start_failures:
            Worker.start_failures -= 1
            raise RuntimeError("not today")

    @tc.rpc(persisted=True)
    async def work(self, msg: Job) -> None:
        Worker.runs.append(msg.name)
        if len(Worker.runs) == 1 and msg.name == "hang once":
            await trio.sleep_forever()


@pytest.fixture(autouse=True)
def _reset_worker() -> None:
    Worker.runs.clear()
    Worker.start_failures = 0


async def test_a_request_claimed_again_after_a_crash_is_a_redelivery(
    autojump_clock,
):
    storage = MemoryStorage()
    async with tc.open_runner(
        entities=[Worker], config=runner_config(1), storage=storage
    ) as first:
        await first.client(Worker)("w").work.discard(Job("hang once"))
        await first.client(Worker)("w2").work.discard(Job("fine"))
        await trio.testing.wait_all_tasks_blocked()
        assert Worker.runs == ["hang once", "fine"]
        assert first.statistics().redeliveries == 0
        first.abort()  # as if killed: the request stays claimed, unfinished
    async with tc.open_runner(
        entities=[Worker], config=runner_config(2), storage=storage
    ) as second:
        with trio.fail_after(60):
            while len(Worker.runs) < 3:  # noqa: ASYNC110
                await trio.sleep(0.1)
        await trio.testing.wait_all_tasks_blocked()
        assert Worker.runs == ["hang once", "fine", "hang once"]
        stats = second.statistics()
    assert stats.redeliveries == 1
    assert stats.persisted_delivered == 1
    assert "trio_cluster_redeliveries_total{" in render_metrics(stats)


async def test_a_request_requeued_after_a_crashed_start_is_a_redelivery(
    autojump_clock,
):
    Worker.start_failures = 2
    async with tc.open_runner(entities=[Worker], config=config()) as runner:
        with trio.fail_after(60):
            await runner.client(Worker)("w").work(Job("after two crashes"))
        assert Worker.runs == ["after two crashes"]
        assert runner.statistics().redeliveries == 2


# ----------------------------------------------------------------------
# Healthy runners


async def test_runners_healthy_leaves_out_peers_the_transport_lost(autojump_clock):
    async with AsyncExitStack() as stack:
        cluster = await open_cluster(stack, [1, 2, 3])
        first, second = cluster.runners[1], cluster.runners[2]
        assert [r.statistics().runners_healthy for r in (first, second)] == [3, 3]
        entity = next(f"e{n}" for n in range(100) if cluster.owner(f"e{n}") is second)
        await first.client(Tally)(entity).add(Add(1))  # connected
        cluster.network.partition(first.address, second.address)
        stats = first.statistics()
        assert (stats.runners, stats.runners_healthy) == (3, 2)
        assert second.statistics().runners_healthy == 2
        assert cluster.runners[3].statistics().runners_healthy == 3
        # Connected again: healthy again.
        cluster.network.heal(first.address, second.address)
        await first.client(Tally)(entity).add(Add(1))
        assert first.statistics().runners_healthy == 3
        # A killed peer: unreachable at once, gone once membership drops it.
        cluster.kill(2)
        assert first.statistics().runners_healthy == 2
        await cluster.settled()
        assert (first.statistics().runners, first.statistics().runners_healthy) == (
            2,
            2,
        )
        assert "trio_cluster_runners_healthy{" in render_metrics(first.statistics())


async def test_without_a_transport_only_itself_is_healthy(autojump_clock):
    storage = MemoryStorage()
    async with (
        tc.open_runner(config=runner_config(1), storage=storage) as first,
        tc.open_runner(config=runner_config(2), storage=storage),
    ):
        with trio.fail_after(5):
            while first.statistics().runners < 2:  # noqa: ASYNC110
                await trio.sleep(0.1)
        assert first.statistics().runners_healthy == 1


# ----------------------------------------------------------------------
# Readiness


async def test_a_client_only_runner_is_ready_once_registered():
    storage = MemoryStorage()
    with trio.fail_after(20):
        async with (
            tc.open_runner(
                config=runner_config(1, shard_groups=()), storage=storage
            ) as client,
            trio.open_nursery() as nursery,
        ):
            port = await nursery.start(serve_metrics, client, "127.0.0.1", 0)
            await client.wait_shards_acquired()  # returns: nothing to wait for
            stats = client.statistics()
            assert (stats.shards_assigned, stats.ready) == (0, True)
            assert await http_get(port, "/readyz") == (200, "ready\n")
            nursery.cancel_scope.cancel()


async def test_a_hosting_runner_is_not_ready_until_it_serves_its_shards(
    autojump_clock,
):
    """The second runner is assigned shards that the first (crashed, its
    session still open) holds until its lease lapses: 503 until then."""
    storage = MemoryStorage()
    frozen = False

    async def freeze(session: str, operation: str) -> None:
        if frozen and session == "127.0.0.1:1":
            await trio.sleep_forever()

    storage.fault_hook = freeze
    cfg = {"lease_duration": 2.0, "lease_refresh_interval": 0.5}
    async with tc.open_runner(config=runner_config(1, **cfg), storage=storage) as first:
        await first.wait_shards_acquired()
        frozen = True  # its locks stay held until its lease lapses in storage
        async with tc.open_runner(
            config=runner_config(2, **cfg), storage=storage
        ) as second:
            status, body, _ = _respond(second, "/readyz")
            assert status.startswith("503")
            assert body.startswith(b"serving 0 of ")
            started = trio.current_time()
            await second.wait_shards_acquired()
            assert 1.0 < trio.current_time() - started < 3.0
            frozen = False
            assert _respond(second, "/readyz")[:2] == ("200 OK", b"ready\n")


async def test_not_ready_while_the_storage_session_is_down(autojump_clock):
    storage = MemoryStorage()
    cfg = runner_config(1, shard_groups=(), lease_duration=3.0)
    async with tc.open_runner(config=cfg, storage=storage) as client:
        assert client.statistics().ready
        client._parts.sharding.heartbeat_at = None  # as after a lost session
        stats = client.statistics()
        assert not stats.ready
        assert stats.not_ready_reason == "the storage session is down"
        await trio.sleep(1.5)  # past the next lease refresh: up again
        assert client.statistics().ready
    stats = client.statistics()
    assert (stats.ready, stats.not_ready_reason) == (
        False,
        "the runner is shutting down",
    )


async def test_a_client_only_runner_can_still_call_entities(autojump_clock):
    """A client-only runner reaches the hosting runners' entities (sanity:
    readiness does not cost it anything)."""
    storage = MemoryStorage()
    async with (
        tc.open_runner(
            entities=[Counter], config=runner_config(1), storage=storage
        ) as host,
        tc.open_runner(
            config=runner_config(2, shard_groups=()), storage=storage
        ) as client,
    ):
        await host.wait_shards_acquired()
        assert client.statistics().ready
        assert host.statistics().ready
        assert client.owner_of(client.client(Counter)("c")) == host.address
        assert not client.is_local(client.client(Counter)("c"))


async def test_a_hosting_runner_assigned_no_shard_is_ready(autojump_clock):
    """More runners than shards: the one the assignment gives none is ready."""
    storage = MemoryStorage()
    cfg = {"shards_per_group": 1}
    async with (
        tc.open_runner(config=runner_config(1, **cfg), storage=storage) as first,
        tc.open_runner(config=runner_config(2, **cfg), storage=storage) as second,
    ):
        with trio.fail_after(5):
            while first.statistics().runners < 2 or second.statistics().runners < 2:  # noqa: ASYNC110
                await trio.sleep(0.1)
            await first.wait_shards_acquired()
            await second.wait_shards_acquired()
        stats = [first.statistics(), second.statistics()]
        assert sorted(s.shards_assigned for s in stats) == [0, 1]
        assert [s.ready for s in stats] == [True, True]
