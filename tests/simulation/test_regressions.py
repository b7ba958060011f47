"""Runtime bugs the simulator found, each pinned by a deterministic test.

1. A persisted ``discard`` sent from a task outside the runner ran its handler
   without a current runner (``current_runner()`` failed, the entity crashed).
2. A transport that delivers a frame twice made a volatile request run twice.
3. A job that got its permit while its shard was being stopped still started
   its handler, on a runner that no longer served the shard.
4. After a failover, a sender's second persisted message took the fast path
   and ran before its first, which was still waiting in storage to be claimed.
5. A caller waiting for a persisted reply through a runner that shut down
   waited forever.
6. A volatile call to another runner, cancelled while its own runner shut
   down, raised `trio.ClosedResourceError` instead of `trio.Cancelled`.
7. A sender's message saved while its runner acquired the shard was not
   noted as waiting in storage (the shard was not served when the send
   began), so a claim that read storage before it was saved marked the shard
   caught up, and the sender's next message took the fast path past it.
"""

from __future__ import annotations

from contextlib import AbstractAsyncContextManager, AsyncExitStack
from typing import ClassVar

import attrs
import pytest
import trio
import trio.testing

import trio_cluster as tc
from trio_cluster._engine._slots import ShardState
from trio_cluster.storage import MemoryStorage
from trio_cluster.testing import Probe, ProbeTouch, open_simulated_cluster

from ..helpers import config

pytestmark = pytest.mark.simulation

ORIGIN = 1_767_225_600.0


@attrs.frozen
class Note:
    text: str


class Journal(tc.Entity):
    type_name = "Journal"
    log: ClassVar[list[str]] = []
    gate: ClassVar[trio.Event | None] = None

    @tc.rpc(persisted=True)
    async def append(self, msg: Note) -> str:
        runner = tc.current_runner()  # failed before fix 1
        Journal.log.append(msg.text)
        return str(runner.address)

    @tc.rpc
    async def wait(self, msg: Note) -> None:
        assert Journal.gate is not None
        await Journal.gate.wait()
        Journal.log.append(msg.text)

    @tc.rpc
    async def note(self, msg: Note) -> None:
        Journal.log.append(msg.text)

    @tc.rpc(persisted=True)
    async def slowly(self, msg: Note) -> str:
        await trio.sleep(100)
        return msg.text  # pragma: no cover - the runner stops first


@pytest.fixture(autouse=True)
def fresh_journal():
    Journal.log = []
    Journal.gate = None


def wall_clock() -> tc.TrioWallClock:
    return tc.TrioWallClock(origin=ORIGIN)


async def test_a_persisted_discard_from_outside_runs_with_its_runner(autojump_clock):
    async with trio.open_nursery() as nursery:
        # Started with nursery.start, the runner's context is not this task's.
        runner = await nursery.start(tc.serve_runner, [Journal], config(), None, None)
        client = runner.client(Journal)("j")
        await client.append(Note("a"))
        await client.append.discard(Note("b"))
        with trio.fail_after(5):
            while len(Journal.log) < 2:  # noqa: ASYNC110
                await trio.sleep(0.1)
        assert runner.statistics().entity_crashes == 0
        nursery.cancel_scope.cancel()
    assert Journal.log == ["a", "b"]


async def test_a_request_delivered_twice_runs_once(autojump_clock):
    async with open_simulated_cluster([Probe], runners=2) as cluster:
        entity = next(
            f"p{i}"
            for i in range(50)
            if cluster.owner_of(cluster.client(Probe)(f"p{i}").address) == 1
        )
        cluster.frame_faults(duplicate=1.0)
        client = cluster.client(Probe, via=0)(entity)
        for op in range(3):
            await client.touch(ProbeTouch(op=op))
        await trio.sleep(1)
        # The probe journal fails the simulation if a touch runs twice.
        assert cluster.probes.executions == 3


async def test_a_job_granted_after_its_shard_stopped_does_not_run(autojump_clock):
    Journal.gate = trio.Event()
    async with tc.open_runner(
        entities=[Journal], config=config(), clock=wall_clock()
    ) as runner:
        client = runner.client(Journal)("j")
        # White box: the engine's own host of the shard.
        host = runner._parts.sharding.table.hosts[client.address.shard]
        await client.wait.discard(Note("first"))
        await client.note.discard(Note("second"))  # queued behind "first"
        await trio.testing.wait_all_tasks_blocked()
        # What stopping a shard now does first: the host is not active.
        host.state = ShardState.STOPPING
        Journal.gate.set()
        await trio.testing.wait_all_tasks_blocked()
        assert Journal.log == ["first"]
        host.state = ShardState.ACTIVE  # let the runner shut down as usual


async def test_stopping_a_shard_deactivates_its_host_at_once(autojump_clock):
    from trio_cluster._core._ownership import StopShard

    async with tc.open_runner(
        entities=[Journal], config=config(), clock=wall_clock()
    ) as runner:
        shard = runner.client(Journal).address_of("j").shard
        sharding = runner._parts.sharding  # white box
        host = sharding.table.hosts[shard]
        sharding._stop_shard(StopShard(shard, graceful=False))
        assert not host.active  # before the manager gets to stop it


def journal_runner(
    storage: MemoryStorage, port: int
) -> AbstractAsyncContextManager[tc.Runner]:
    """A runner of `Journal` at ``r:<port>`` on ``storage``."""
    return tc.open_runner(
        entities=[Journal],
        config=config(runner_address=tc.RunnerAddress("r", port)),
        storage=storage,
        clock=wall_clock(),
    )


async def an_entity_served_by(owner: tc.Runner, sender: tc.Runner) -> str:
    """Once the shards are split: a `Journal` id whose shard ``owner``
    serves (``sender`` does not)."""
    await trio.sleep(1)
    client = sender.client(Journal)
    return next(
        f"j{i}"
        for i in range(100)
        if client.address_of(f"j{i}").shard in owner.served_shards()
    )


async def test_a_senders_messages_keep_their_order_across_a_failover(autojump_clock):
    storage = MemoryStorage()
    claims_fail = True

    async def hook(session: str, operation: str) -> None:
        if operation == "claim" and claims_fail:
            raise OSError("claims are down")

    async with AsyncExitStack() as stack:
        first = await stack.enter_async_context(journal_runner(storage, 1))
        second_stack = AsyncExitStack()
        second = await second_stack.enter_async_context(journal_runner(storage, 2))
        entity = await an_entity_served_by(second, first)
        storage.fault_hook = hook
        # Stored unclaimed (the sender does not serve the entity) and not
        # claimed by its owner.
        await first.client(Journal)(entity).append.discard(Note("m1"))
        shard = first.client(Journal).address_of(entity).shard
        await second_stack.aclose()
        with trio.fail_after(5):
            while shard not in first.served_shards():  # noqa: ASYNC110
                await trio.sleep(0.05)
        # The sender now serves the entity, but m1 is still in storage: m2
        # must not overtake it through the fast path.
        await first.client(Journal)(entity).append.discard(Note("m2"))
        await trio.sleep(0.5)
        claims_fail = False
        with trio.fail_after(10):
            while len(Journal.log) < 2:  # noqa: ASYNC110
                await trio.sleep(0.1)
    assert Journal.log == ["m1", "m2"]


async def test_a_message_saved_while_its_shard_is_acquired_is_not_overtaken(
    autojump_clock,
):
    storage = MemoryStorage()
    saves_held = trio.Event()
    hold_saves = False
    claims_fail = False

    async def hook(session: str, operation: str) -> None:
        if operation == "save_requests" and hold_saves:
            await saves_held.wait()
        if operation == "claim" and claims_fail:
            raise OSError("claims are down")

    storage.fault_hook = hook
    async with AsyncExitStack() as stack:
        first = await stack.enter_async_context(journal_runner(storage, 1))
        nursery = await stack.enter_async_context(trio.open_nursery())
        second_stack = AsyncExitStack()
        second = await second_stack.enter_async_context(journal_runner(storage, 2))
        entity = await an_entity_served_by(second, first)
        shard = first.client(Journal).address_of(entity).shard
        sent = trio.Event()

        async def send_first() -> None:
            await first.client(Journal)(entity).append.discard(Note("m1"))
            sent.set()

        # m1's save begins while the sender does not serve the shard...
        hold_saves = True
        nursery.start_soon(send_first)
        await trio.sleep(0.1)
        await second_stack.aclose()
        with trio.fail_after(5):
            while shard not in first.served_shards():  # noqa: ASYNC110
                await trio.sleep(0.05)
        # ...and a claim of the acquired shard reads storage before m1 is in
        # it; later claims fail, so m1 waits in storage.
        await trio.sleep(1)
        claims_fail = True
        hold_saves = False
        saves_held.set()
        with trio.fail_after(5):
            await sent.wait()
        await first.client(Journal)(entity).append.discard(Note("m2"))
        await trio.sleep(0.5)
        assert Journal.log == []  # m2 did not run before m1
        claims_fail = False
        with trio.fail_after(10):
            while len(Journal.log) < 2:  # noqa: ASYNC110
                await trio.sleep(0.1)
    assert Journal.log == ["m1", "m2"]


async def test_a_caller_waiting_through_a_runner_that_stops_gets_an_error(
    autojump_clock,
):
    async with trio.open_nursery() as nursery:
        stop = trio.CancelScope()

        async def serve(*, task_status: trio.TaskStatus[tc.Runner]) -> None:
            with stop:
                await tc.serve_runner(
                    [Journal], config(), None, None, task_status=task_status
                )

        runner = await nursery.start(serve)
        outcome: list[BaseException] = []

        async def call() -> None:
            try:
                await runner.client(Journal)("j").slowly(Note("x"))
            except tc.RunnerClosedError as exc:
                outcome.append(exc)

        nursery.start_soon(call)
        await trio.sleep(1)
        stop.cancel()
        with trio.fail_after(60):
            while not outcome:  # noqa: ASYNC110
                await trio.sleep(1)
    assert "will be answered" in str(outcome[0])


async def test_a_remote_call_whose_runner_shuts_down_fails_closed(
    autojump_clock,
):
    async with open_simulated_cluster([Probe], runners=2) as cluster:
        entity = next(
            f"p{i}"
            for i in range(50)
            if cluster.owner_of(cluster.client(Probe)(f"p{i}").address) == 1
        )
        client = cluster.client(Probe, via=0)(entity)
        outcome: list[str] = []

        async def call(*, task_status: trio.TaskStatus[trio.CancelScope]) -> None:
            with trio.CancelScope() as scope:
                task_status.started(scope)
                try:
                    await client.touch(ProbeTouch(op=1, work=100.0))
                except trio.Cancelled:
                    outcome.append("cancelled")
                    raise
                except tc.RunnerClosedError:
                    outcome.append("runner closed")

        async with trio.open_nursery() as nursery:
            scope = await nursery.start(call)
            await trio.sleep(1)
            runner = cluster.runner(0)
            runner.stop()
            await runner.wait_stopped()
            # Cancelling afterwards finds nothing to interrupt (before, the
            # call hung until cancelled, and the interrupt met the closed
            # endpoint: found by the simulator).
            scope.cancel()
        # Its runner's shutdown ends the call (it may have run on r1).
        assert outcome == ["runner closed"]
        await cluster.restart(0)
