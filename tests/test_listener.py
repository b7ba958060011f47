"""The public observation seam (`trio_cluster._listener`): what a
`RunnerListener` hears, in order, and that a failing listener is dropped."""

from __future__ import annotations

import pytest
import trio

import trio_cluster as tc
from trio_cluster.abc import RunnerListener

from .helpers import Add, Counter, Sleep, config


class Recorder(RunnerListener):
    def __init__(self) -> None:
        self.events: list[tuple[object, ...]] = []

    def runner_started(self, runner: tc.RunnerAddress) -> None:
        self.events.append(("runner_started",))

    def runner_stopping(self, runner: tc.RunnerAddress) -> None:
        self.events.append(("runner_stopping",))

    def shard_acquired(
        self, runner: tc.RunnerAddress, shard: tc.ShardId, epoch: int
    ) -> None:
        self.events.append(("acquired", shard, epoch))

    def shard_stopping(
        self, runner: tc.RunnerAddress, shard: tc.ShardId, epoch: int, *, graceful: bool
    ) -> None:
        self.events.append(("stopping", shard, epoch, graceful))

    def shard_stopped(
        self, runner: tc.RunnerAddress, shard: tc.ShardId, epoch: int
    ) -> None:
        self.events.append(("stopped", shard, epoch))

    def handler_started(
        self,
        runner: tc.RunnerAddress,
        address: tc.EntityAddress,
        handler: str,
        epoch: int,
    ) -> None:
        self.events.append(("handler_started", address.entity_id.value, handler, epoch))

    def handler_finished(
        self,
        runner: tc.RunnerAddress,
        address: tc.EntityAddress,
        handler: str,
        epoch: int,
    ) -> None:
        self.events.append(
            ("handler_finished", address.entity_id.value, handler, epoch)
        )

    def of(self, kind: str) -> list[tuple[object, ...]]:
        return [event for event in self.events if event[0] == kind]


async def test_a_listener_hears_shards_and_handlers_in_order(autojump_clock):
    recorder = Recorder()
    async with tc.open_runner(
        entities=[Counter], config=config(), listeners=[recorder]
    ) as runner:
        served = dict(runner.served_shards())
        assert len(served) == 8
        assert recorder.events[-1] == ("runner_started",)
        assert {(s, e) for _, s, e in recorder.of("acquired")} == set(served.items())
        assert runner.machine_id is not None
        assert [info.address for info in runner.live_runners()] == [runner.address]
        assert set(runner.assignment().values()) == {runner.address}

        ref = runner.client(Counter)("a")
        epoch = served[ref.address.shard]
        await ref.add(Add(1))  # cannot suspend: the one-step path
        await ref.sleep(Sleep(1))  # suspends: a handler with its own scope
        assert recorder.of("handler_started") == [
            ("handler_started", "a", "add", epoch),
            ("handler_started", "a", "sleep", epoch),
        ]
        assert recorder.of("handler_finished") == [
            ("handler_finished", "a", "add", epoch),
            ("handler_finished", "a", "sleep", epoch),
        ]
        recorder.events.clear()
    assert recorder.events[0] == ("runner_stopping",)
    assert {(s, e, g) for _, s, e, g in recorder.of("stopping")} == {
        (s, e, True) for s, e in served.items()
    }
    assert {(s, e) for _, s, e in recorder.of("stopped")} == set(served.items())
    # Each shard stops after it starts stopping.
    for shard in served:
        kinds = [event[0] for event in recorder.events if shard in event]
        assert kinds == ["stopping", "stopped"]


async def test_shard_stopped_waits_for_a_cancelled_handler_to_finish(autojump_clock):
    recorder = Recorder()
    async with trio.open_nursery() as nursery:
        async with tc.open_runner(
            entities=[Counter],
            config=config(entity_termination_timeout=1),
            listeners=[recorder],
        ) as runner:
            ref = runner.client(Counter)("a")

            async def nap() -> None:
                with pytest.raises(tc.EntityNotAssignedError):
                    await ref.sleep(Sleep(100))

            nursery.start_soon(nap)
            await trio.testing.wait_all_tasks_blocked()
        shard = ref.address.shard
        mine = [event[0] for event in recorder.events if shard in event or "a" in event]
        assert mine[-3:] == ["stopping", "handler_finished", "stopped"]


class Failing(RunnerListener):
    def shard_acquired(
        self, runner: tc.RunnerAddress, shard: tc.ShardId, epoch: int
    ) -> None:
        raise RuntimeError("a broken listener")


async def test_a_listener_that_raises_is_dropped_and_the_runner_goes_on(
    autojump_clock, caplog
):
    recorder = Recorder()
    async with tc.open_runner(
        entities=[Counter], config=config(), listeners=[Failing(), recorder]
    ) as runner:
        assert await runner.client(Counter)("a").add(Add(2)) == 2
    assert len(recorder.of("acquired")) == 8
    assert "runner listener" in caplog.text
    assert caplog.text.count("raised; it is removed") == 1  # told once, then dropped
