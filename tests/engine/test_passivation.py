"""Idle tracking (`trio_cluster._engine._passivation`): passivation after
``max_idle``, keep-alive, the residency cap, a message during ``on_stop``."""

from __future__ import annotations

import pytest
import trio
import trio.lowlevel
import trio.testing

import trio_cluster as tc

from ..helpers import Get, Sleep, Tracked, config

pytestmark = pytest.mark.usefixtures("clear_tracked_log")


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


class SlowStop(tc.Entity):
    type_name = "SlowStop"
    max_idle = 5.0
    log: list[str] = []  # noqa: RUF012

    async def on_start(self) -> None:
        SlowStop.log.append(f"start {trio.current_time():.0f}")

    async def on_stop(self) -> None:
        SlowStop.log.append(f"stopping {trio.current_time():.0f}")
        await trio.sleep(3)
        SlowStop.log.append(f"stopped {trio.current_time():.0f}")

    @tc.rpc
    async def ping(self, msg: Get) -> str:
        SlowStop.log.append(f"ping {trio.current_time():.0f}")
        return "pong"


async def test_message_during_on_stop_waits_and_reactivates(autojump_clock):
    SlowStop.log = []
    async with tc.open_runner(entities=[SlowStop], config=config()) as runner:
        ref = runner.client(SlowStop)("s")
        await ref.ping(Get())
        await trio.sleep(6)  # passivation started at t=5, on_stop runs until t=8
        assert await ref.ping(Get()) == "pong"
    assert SlowStop.log[:6] == [
        "start 0",
        "ping 0",
        "stopping 5",
        "stopped 8",
        "start 8",
        "ping 8",
    ]
