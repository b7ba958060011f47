"""Idle tracking (`trio_cluster._engine._passivation`): passivation after
``max_idle``, keep-alive, the residency cap, a message during ``on_stop``;
and persisted messages waiting for room at the cap
(`trio_cluster._engine._entity_lifecycle`)."""

from __future__ import annotations

from contextlib import AbstractAsyncContextManager

import pytest
import trio
import trio.lowlevel
import trio.testing

import trio_cluster as tc
from trio_cluster.storage import MemoryStorage

from ..helpers import ORIGIN, Get, Ping, Sleep, Tracked, config

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


async def test_a_shutdown_during_passivation_runs_on_stop_once(autojump_clock):
    # The graceful stop of the shard ran ``on_stop`` a second time, at the
    # same time, for an entity whose passivation was running it.
    SlowStop.log = []
    async with tc.open_runner(entities=[SlowStop], config=config()) as runner:
        await runner.client(SlowStop)("s").ping(Get())
        await trio.sleep(6)  # passivation started at t=5: on_stop until t=8
    assert SlowStop.log == ["start 0", "ping 0", "stopping 5", "stopped 8"]


# ----------------------------------------------------------------------
# Persisted messages at the residency cap wait for room (issue 11, item 10)


class Gated(tc.Entity):
    """Persisted work; ``work`` of text "1" waits for its entity's gate.
    ``on_start`` notes the most entities ever resident (``peak``); ``on_stop``
    takes a second."""

    type_name = "Gated"
    concurrency = 2
    log: list[str] = []  # noqa: RUF012
    gates: dict[str, trio.Event] = {}  # noqa: RUF012
    peak = 0

    async def on_start(self) -> None:
        Gated.log.append(f"start {self.id}")
        resident = tc.current_runner().statistics().entities
        Gated.peak = max(Gated.peak, resident)

    async def on_stop(self) -> None:
        await trio.sleep(1)
        Gated.log.append(f"stop {self.id}")

    @tc.rpc(persisted=True, primary_key=lambda m: m.text)
    async def work(self, msg: Ping) -> str:
        Gated.log.append(f"work {self.id} {msg.text}")
        if msg.text == "1" and (gate := Gated.gates.get(self.id)) is not None:
            await gate.wait()
        return f"{self.id} {msg.text}"

    @tc.rpc
    async def peek(self, msg: Get) -> str:
        return self.id


class GatedWithoutStop(Gated):
    """`Gated` without ``on_stop``: passivating it frees its place at once."""

    type_name = "GatedWithoutStop"
    on_stop = tc.Entity.on_stop


@pytest.fixture(params=[Gated, GatedWithoutStop], ids=["on_stop", "no_on_stop"])
def gated(request: pytest.FixtureRequest) -> type[Gated]:
    Gated.log = []
    Gated.gates = {}
    Gated.peak = 0
    cls: type[Gated] = request.param
    return cls


def gated_runner(
    cls: type[Gated], storage: MemoryStorage | None = None, **overrides: object
) -> AbstractAsyncContextManager[tc.Runner]:
    """A runner of ``cls`` with room for two entities. Its wall clock reads
    ``ORIGIN`` at Trio time 0, so that runners opened one after another
    (which number their requests by wall time) do not reuse ids."""
    return tc.open_runner(
        entities=[cls],
        config=config(max_resident_entities=2, **overrides),
        storage=storage,
        clock=tc.TrioWallClock(origin=ORIGIN + trio.current_time()),
    )


def call_soon(
    client: tc.EntityClient[Gated],
    nursery: trio.Nursery,
    results: dict[str, str],
    name: str,
    text: str = "1",
) -> None:
    """Call ``work(text)`` of entity ``name`` in the background; its reply
    goes to ``results[name]`` (text "1") or ``results[name + text]``."""

    async def call() -> None:
        reply = await client(name).work(Ping(text))
        results[name if text == "1" else name + text] = reply

    nursery.start_soon(call)


async def hold_at_the_cap(
    runner: tc.Runner,
    cls: type[Gated],
    nursery: trio.Nursery,
    results: dict[str, str],
) -> tc.EntityClient[Gated]:
    """Fill the runner's two places with busy entities ``a`` and ``b`` (of
    type ``cls``); returns the client of ``cls``."""
    client = runner.client(cls)
    for name in "ab":
        Gated.gates[name] = trio.Event()
        call_soon(client, nursery, results, name)
    await trio.testing.wait_all_tasks_blocked()
    assert runner.statistics().entities == 2
    return client


async def wait_for(results: dict[str, str], name: str) -> None:
    with trio.fail_after(10):
        while name not in results:  # noqa: ASYNC110 - polling virtual time
            await trio.sleep(0.01)


def works() -> list[str]:
    return sorted(line for line in Gated.log if line.startswith("work"))


def started() -> list[str]:
    """Entities started, in order (``a`` and ``b``, started together, sorted)."""
    names = [line.split()[1] for line in Gated.log if line.startswith("start")]
    return sorted(names[:2]) + names[2:]


async def test_persisted_message_for_a_new_entity_waits_for_room(autojump_clock, gated):
    results: dict[str, str] = {}
    async with gated_runner(gated) as runner, trio.open_nursery() as nursery:
        client = await hold_at_the_cap(runner, gated, nursery, results)
        call_soon(client, nursery, results, "c")
        claims = runner.statistics().storage_claims
        await trio.sleep(60)
        # Not admitted: no incarnation, no third resident, and the read loop
        # does not spin on it (at most one claim per poll interval).
        assert "c" not in started()
        assert runner.statistics().entities == 2
        assert runner.statistics().storage_claims - claims <= 60 / 5 + 1
        assert runner.statistics().persisted_in_flight == 3
        # Volatile calls at the cap are refused; resident entities still
        # take messages, persisted or not.
        with pytest.raises(tc.MailboxFullError, match="max_resident_entities"):
            await client("v").peek(Get())
        assert await client("a").peek(Get()) == "a"
        assert await client("b").work(Ping("2")) == "b 2"

        Gated.gates["a"].set()  # a goes idle: it is passivated for c
        await wait_for(results, "c")
        assert results == {"a": "a 1", "c": "c 1"}
        if gated is Gated:
            assert Gated.log.index("stop a") < Gated.log.index("start c")
        Gated.gates["b"].set()
    assert results == {"a": "a 1", "b": "b 1", "c": "c 1"}
    assert works() == ["work a 1", "work b 1", "work b 2", "work c 1"]
    assert started() == ["a", "b", "c"]
    assert Gated.peak == 2


async def test_persisted_message_passivates_an_idle_entity(autojump_clock, gated):
    async with gated_runner(gated) as runner:
        client = runner.client(gated)
        assert await client("a").work(Ping("1")) == "a 1"
        await trio.sleep(1)
        assert await client("b").work(Ping("1")) == "b 1"
        assert await client("c").work(Ping("1")) == "c 1"
        assert started() == ["a", "b", "c"]
        assert runner.statistics().entities == 2
        if gated is Gated:
            assert Gated.log.index("stop a") < Gated.log.index("start c")
            assert "stop b" not in Gated.log
    assert Gated.peak == 2


async def test_waiting_entities_are_admitted_in_order_before_newcomers(
    autojump_clock, gated
):
    results: dict[str, str] = {}
    async with gated_runner(gated) as runner, trio.open_nursery() as nursery:
        client = await hold_at_the_cap(runner, gated, nursery, results)
        for name in "cde":
            Gated.gates[name] = trio.Event()
            call_soon(client, nursery, results, name)
            await trio.sleep(1)
        # A second message for a waiting entity queues behind its first.
        call_soon(client, nursery, results, "c", "2")
        await trio.sleep(1)
        Gated.gates["b"].set()
        await wait_for(results, "b")
        # One place freed: c, the first to wait, took it; d and e still wait,
        # and a volatile newcomer does not overtake them.
        await trio.sleep(30)
        assert started() == ["a", "b", "c"]
        assert results.get("c2") == "c 2"
        with pytest.raises(tc.MailboxFullError, match="max_resident_entities"):
            await client("v").peek(Get())
        Gated.gates["a"].set()
        await wait_for(results, "a")
        await trio.sleep(30)
        assert started() == ["a", "b", "c", "d"]
        for name in "cde":
            Gated.gates[name].set()
        await wait_for(results, "e")
    assert started() == ["a", "b", "c", "d", "e"]
    assert works() == [f"work {name} 1" for name in "abc"] + ["work c 2"] + [
        f"work {name} 1" for name in "de"
    ]
    assert Gated.peak == 2


async def test_interrupted_waiting_message_never_runs(autojump_clock, gated):
    storage = MemoryStorage()
    results: dict[str, str] = {}
    async with gated_runner(gated, storage) as runner, trio.open_nursery() as nursery:
        client = await hold_at_the_cap(runner, gated, nursery, results)
        with trio.move_on_after(5):
            await client("c").work(Ping("1"))
        call_soon(client, nursery, results, "d")
        call_soon(client, nursery, results, "d", "2")
        with trio.move_on_after(5):  # withdrawn from behind d's first message
            await client("d").work(Ping("3"))
        assert runner.statistics().persisted_in_flight == 4  # a, b, d 1, d 2
        Gated.gates["a"].set()
        await wait_for(results, "d2")  # c's place in the queue went to d
        Gated.gates["b"].set()
        await trio.sleep(30)
    assert "c" not in started()
    assert works() == ["work a 1", "work b 1", "work d 1", "work d 2"]
    # Their stored replies say they were interrupted.
    async with gated_runner(gated, storage) as runner:
        for name, text in [("c", "1"), ("d", "3")]:
            with pytest.raises(tc.RequestInterruptedError):
                await runner.client(gated)(name).work(Ping(text))


async def test_waiting_message_survives_its_shard_stopping(autojump_clock, gated):
    storage = MemoryStorage()
    results: dict[str, str] = {}
    cfg = {"lease_duration": 3.0, "lease_refresh_interval": 1.0}
    async with (
        gated_runner(gated, storage, **cfg) as runner,
        trio.open_nursery() as nursery,
    ):
        client = await hold_at_the_cap(runner, gated, nursery, results)
        call_soon(client, nursery, results, "c")
        await trio.sleep(1)
        # The shards stop (a and b cancelled, c given back) and are acquired
        # again at a new epoch: a and b are replayed, c waits again.
        storage.expire_session(str(runner.address))
        with trio.fail_after(10):
            while runner.statistics().failovers < 1:  # noqa: ASYNC110
                await trio.sleep(0.1)
        await trio.sleep(10)
        assert "c" not in started()
        assert runner.statistics().entities == 2
        Gated.gates["a"].set()
        Gated.gates["b"].set()
        await wait_for(results, "c")
    assert results == {"a": "a 1", "b": "b 1", "c": "c 1"}
    assert works().count("work c 1") == 1
    assert Gated.peak == 2


async def test_waiting_message_of_a_closing_shard_is_left_to_its_next_epoch(
    autojump_clock, gated
):
    storage = MemoryStorage()
    results: dict[str, str] = {}
    async with (
        gated_runner(gated, storage) as runner,
        trio.open_nursery() as nursery,
    ):
        client = await hold_at_the_cap(runner, gated, nursery, results)
        call_soon(client, nursery, results, "c")
        await trio.sleep(1)
        # c's shard is closing (as when its lease deadline passed and its
        # cleanup has not run yet) when a place frees: c is not started
        # there; it is claimed again once the shard is served anew.
        hosts = runner._parts.sharding.table.hosts
        host = hosts[client.address_of("c").shard]
        host.closing = True
        Gated.gates["a"].set()
        await wait_for(results, "a")
        await trio.sleep(10)
        assert "c" not in started()
        assert runner.statistics().persisted_in_flight == 1  # b
        storage.expire_session(str(runner.address))
        Gated.gates["b"].set()
        await wait_for(results, "c")
    assert works().count("work c 1") == 1
