"""Entity lifecycle: activation, passivation, residency cap, shutdown, embedding."""

from __future__ import annotations

import pytest
import trio
import trio.lowlevel
import trio.testing

import trio_cluster as tc

from .helpers import Add, Counter, Get, Sleep, config


class Tracked(tc.Entity):
    type_name = "Tracked"
    max_idle = 10.0

    log: list[str] = []  # shared across incarnations on purpose  # noqa: RUF012

    async def on_start(self) -> None:
        Tracked.log.append(f"start {self.id} {tc.current_entity_address()}")

    async def on_stop(self) -> None:
        Tracked.log.append(f"stop {self.id}")

    @tc.rpc
    async def touch(self, msg: Get) -> str:
        return self.id

    @tc.rpc
    async def hold(self, msg: Get) -> None:
        self.keep_alive()

    @tc.rpc
    async def release(self, msg: Get) -> None:
        self.keep_alive(False)

    @tc.rpc
    async def nap(self, msg: Sleep) -> None:
        await trio.sleep(msg.seconds)


@pytest.fixture(autouse=True)
def _clear_log():
    Tracked.log = []


async def test_on_start_sees_id_and_address(autojump_clock):
    async with tc.open_runner(entities=[Tracked], config=config()) as runner:
        assert await runner.client(Tracked)("a").touch(Get()) == "a"
        assert len(Tracked.log) == 1
        assert Tracked.log[0].startswith("start a Tracked/a@default:")


async def test_passivation_after_max_idle(autojump_clock):
    async with tc.open_runner(entities=[Tracked], config=config()) as runner:
        ref = runner.client(Tracked)("a")
        await ref.touch(Get())
        start = trio.current_time()
        await trio.sleep(9.9)
        await ref.touch(Get())  # activity resets the idle clock
        assert Tracked.log == [Tracked.log[0]]
        while Tracked.log[-1] != "stop a":  # noqa: ASYNC110 - polling virtual time on purpose
            await trio.sleep(0.1)
        assert trio.current_time() - start == pytest.approx(19.9, abs=0.11)
        assert runner.statistics().entities == 0
        await ref.touch(Get())  # a new incarnation
        assert [line.split()[0] for line in Tracked.log] == ["start", "stop", "start"]


async def test_keep_alive_prevents_passivation(autojump_clock):
    async with tc.open_runner(entities=[Tracked], config=config()) as runner:
        ref = runner.client(Tracked)("a")
        await ref.hold(Get())
        await trio.sleep(100)
        assert "stop a" not in Tracked.log
        await ref.release(Get())
        await trio.sleep(10.5)
        assert Tracked.log[-1] == "stop a"


async def test_busy_entities_are_not_passivated(autojump_clock):
    async with tc.open_runner(entities=[Tracked], config=config()) as runner:
        await runner.client(Tracked)("a").nap(Sleep(50))
        assert "stop a" not in Tracked.log


async def test_residency_cap_passivates_least_recently_used(autojump_clock):
    async with tc.open_runner(
        entities=[Tracked], config=config(max_resident_entities=3)
    ) as runner:
        client = runner.client(Tracked)
        for name in "abc":
            await client(name).touch(Get())
            await trio.sleep(1)
        await client("a").touch(Get())  # b is now the least recently used
        await client("d").touch(Get())
        await trio.lowlevel.checkpoint()
        assert "stop b" in Tracked.log
        assert "stop a" not in Tracked.log
        assert "stop c" not in Tracked.log
        assert runner.statistics().entities == 3


async def test_residency_cap_with_no_idle_entity_refuses_new_ones(autojump_clock):
    async with tc.open_runner(
        entities=[Tracked], config=config(max_resident_entities=2)
    ) as runner:
        client = runner.client(Tracked)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(client("a").nap, Sleep(10))
            nursery.start_soon(client("b").nap, Sleep(10))
            await trio.testing.wait_all_tasks_blocked()
            with pytest.raises(tc.MailboxFullError, match="max_resident_entities"):
                await client("c").touch(Get())
        assert await client("c").touch(Get()) == "c"


async def test_graceful_shutdown_lets_handlers_finish(autojump_clock):
    finished: list[float] = []

    async def nap(runner: tc.Runner) -> None:
        await runner.client(Tracked)("a").nap(Sleep(3))
        finished.append(trio.current_time())

    async with trio.open_nursery() as nursery:
        async with tc.open_runner(
            entities=[Tracked], config=config(entity_termination_timeout=5)
        ) as runner:
            nursery.start_soon(nap, runner)
            await trio.testing.wait_all_tasks_blocked()
            closed_at = trio.current_time()
        # Leaving the block waited for the running handler, then on_stop ran.
        assert trio.current_time() == pytest.approx(closed_at + 3)
    assert finished == [pytest.approx(closed_at + 3)]
    assert Tracked.log[-1] == "stop a"


async def test_shutdown_cancels_handlers_after_the_termination_timeout(autojump_clock):
    outcome: list[BaseException] = []

    async def call(runner: tc.Runner) -> None:
        try:
            await runner.client(Tracked)("a").nap(Sleep(100))
        except tc.ClusterError as exc:
            outcome.append(exc)

    async with trio.open_nursery() as nursery:
        async with tc.open_runner(
            entities=[Tracked], config=config(entity_termination_timeout=2)
        ) as runner:
            nursery.start_soon(call, runner)
            await trio.testing.wait_all_tasks_blocked()
            start = trio.current_time()
        assert trio.current_time() - start == pytest.approx(2, abs=0.01)
    assert len(outcome) == 1
    assert isinstance(outcome[0], tc.EntityNotAssignedError)
    assert "may have partly run" in str(outcome[0])


async def test_calls_after_shutdown_raise_runner_closed(autojump_clock):
    async with tc.open_runner(entities=[Counter], config=config()) as runner:
        ref = runner.client(Counter)("a")
    with pytest.raises(tc.RunnerClosedError):
        await ref.add(Add(1))
    with pytest.raises(trio.ClosedResourceError):
        await ref.get(Get())


async def test_serve_runner_with_nursery_start(autojump_clock):
    async with trio.open_nursery() as nursery:
        runner = await nursery.start(tc.serve_runner, [Counter], config())
        assert isinstance(runner, tc.Runner)
        assert await runner.client(Counter)("a").add(Add(4)) == 4
        nursery.cancel_scope.cancel()
    with pytest.raises(tc.RunnerClosedError):
        await runner.client(Counter)("a").add(Add(1))


async def test_error_in_the_block_propagates_unwrapped(autojump_clock):
    with pytest.raises(ZeroDivisionError):
        async with tc.open_runner(entities=[Counter], config=config()):
            1 / 0  # noqa: B018


async def test_statistics_snapshot(autojump_clock):
    async with tc.open_runner(entities=[Counter], config=config()) as runner:
        await runner.wait_shards_acquired()
        client = runner.client(Counter)
        for name in "abc":
            await client(name).add(Add(1))
        async with trio.open_nursery() as nursery:
            nursery.start_soon(client("a").sleep, Sleep(5))
            nursery.start_soon(client("a").sleep, Sleep(5))
            await trio.testing.wait_all_tasks_blocked()
            stats = runner.statistics()
        assert stats.shards == 8
        assert stats.shards_assigned == 8
        assert stats.runners == 1
        assert stats.entities == 3
        assert stats.entities_by_type == {"Counter": 3}
        assert stats.running_handlers == 1
        assert stats.queued_messages == 1
        assert stats.max_mailbox_depth == 2
        assert stats.messages_handled == 3
        assert runner.statistics().messages_handled == 5


async def test_current_runner_inside_handlers(autojump_clock):
    class Asker(tc.Entity):
        type_name = "Asker"

        @tc.rpc
        async def ask(self, msg: Add) -> int:
            other = tc.current_runner().client(Counter)("x")
            return await other.add(msg)

    async with tc.open_runner(entities=[Asker, Counter], config=config()) as runner:
        assert await runner.client(Asker)("q").ask(Add(3)) == 3
    with pytest.raises(RuntimeError, match="no current runner"):
        tc.current_runner()
