"""State-machine entities (`trio_cluster._fsm`): checked transitions, state
timeouts, the state query and watch, and definition errors."""

from __future__ import annotations

from collections.abc import Mapping
from contextlib import AsyncExitStack
from typing import Any, ClassVar

import attrs
import msgpack
import pytest
import trio

import trio_cluster as tc
from trio_cluster.abc import (
    ListedState,
    StateCount,
    StateQuery,
    StateStorage,
    StoredState,
)
from trio_cluster.serialization import make_converter
from trio_cluster.storage import MemoryStorage
from trio_cluster.transport import MemoryNetwork, MemoryTransport

from .helpers import (
    ORIGIN,
    clock,
    config,
    open_clocked_runner,
    remote_id,
    runner_config,
)


@attrs.frozen
class Off:
    pass


@attrs.frozen
class On:
    level: int


@attrs.frozen
class Broken:
    why: str


@attrs.frozen
class Switch:
    level: int = 1


@attrs.frozen
class Nothing:
    pass


class Lamp(tc.StateMachine[Off | On | Broken]):
    type_name = "Lamp"
    max_idle = 50.0
    states: ClassVar[Mapping[str, type]] = {"off": Off, "on": On, "broken": Broken}
    initial_state = Off
    state_timeouts: ClassVar[Mapping[type, tc.StateTimeout]] = {
        On: tc.StateTimeout(after=10.0, transition="burn_out")
    }

    @tc.transition(from_=Off, to=On, primary_key=lambda m: f"on/{m.level}")
    async def switch_on(self, msg: Switch) -> On:
        return On(msg.level)

    @tc.transition(from_=On, to=Off)
    async def switch_off(self, msg: Nothing) -> Off:
        return Off()

    @tc.transition(from_=On, to=On)
    async def dim(self, msg: Switch) -> On:
        return On(msg.level)

    @tc.transition(from_=On, to=Broken)
    async def burn_out(self, msg: tc.StateTimedOut) -> Broken:
        return Broken(f"on for too long (entry {msg.entry})")

    @tc.transition(from_=(Off, On), to=Off)
    async def misbehave(self, msg: Switch) -> Off:
        return On(msg.level)  # type: ignore[return-value]  # a bug, caught

    @tc.transition(from_=Off, to=On)
    async def crash(self, msg: Switch) -> On:
        raise RuntimeError("a bug")


async def test_transitions_change_the_state_or_nothing(autojump_clock: Any) -> None:
    async with open_clocked_runner([Lamp]) as runner:
        lamp = runner.client(Lamp)("l")
        assert await lamp.current_state(tc.GetState()) == Off()
        with pytest.raises(tc.InvalidTransitionError) as raised:
            await lamp.switch_off(Nothing())
        assert raised.value.state == "off"
        assert raised.value.expected == ("on",)
        assert await lamp.switch_on(Switch(3)) == On(3)
        # A handler that returns a state its transition does not lead to.
        with pytest.raises(tc.InvalidTransitionError, match="returned on") as raised:
            await lamp.misbehave(Switch(9))
        assert raised.value.returned == "on"
        assert await lamp.current_state(tc.GetState()) == On(3)
        # A crashing handler rolls back (and is dead-lettered in the end).
        await lamp.switch_off(Nothing())
        with pytest.raises(tc.DeadLetteredError, match="a bug"):
            await lamp.crash(Switch(1))
        assert await lamp.current_state(tc.GetState()) == Off()


async def test_state_timeout_fires_unless_the_machine_moved_on(
    autojump_clock: Any,
) -> None:
    async with open_clocked_runner([Lamp]) as runner:
        lamp = runner.client(Lamp)("l")
        start = trio.current_time()
        await lamp.switch_on(Switch(1))
        await trio.sleep(5)
        # A transition to the same state is a new entry: the first timeout
        # is ignored, the second one (armed by dim) fires 10 s after it.
        await lamp.dim(Switch(2))
        await trio.sleep(6)  # the first timeout's time has passed
        assert await lamp.current_state(tc.GetState()) == On(2)
        await trio.sleep(5)
        assert await lamp.current_state(tc.GetState()) == Broken(
            "on for too long (entry 2)"
        )
        assert trio.current_time() - start == pytest.approx(16)
        # Switched off in time: no timeout.
        other = runner.client(Lamp)("m")
        await other.switch_on(Switch(1))
        await other.switch_off(Nothing())
        await trio.sleep(20)
        assert await other.current_state(tc.GetState()) == Off()


async def test_state_and_its_timeout_survive_a_restart(autojump_clock: Any) -> None:
    storage = MemoryStorage()
    async with open_clocked_runner([Lamp], config(), storage) as runner:
        await runner.client(Lamp)("l").switch_on(Switch(4))
    # Another runner on the same storage, 3 s later (the clock goes on).
    await trio.sleep(3)
    clock = tc.TrioWallClock(origin=ORIGIN + trio.current_time())
    async with tc.open_runner(
        entities=[Lamp], config=config(), storage=storage, clock=clock
    ) as runner:
        lamp = runner.client(Lamp)("l")
        assert await lamp.current_state(tc.GetState()) == On(4)
        await trio.sleep(8)
        assert await lamp.current_state(tc.GetState()) == Broken(
            "on for too long (entry 1)"
        )


async def test_watch_state_yields_committed_states(autojump_clock: Any) -> None:
    async with open_clocked_runner([Lamp]) as runner:
        lamp = runner.client(Lamp)("l")
        seen: list[object] = []

        async def watch(task_status: trio.TaskStatus[None]) -> None:
            async with lamp.watch_state(tc.WatchState()) as states:
                task_status.started()
                async for state in states:
                    seen.append(state)
                    if isinstance(state, Broken):
                        return

        async with trio.open_nursery() as nursery:
            await nursery.start(watch)
            await lamp.switch_on(Switch(1))
            with pytest.raises(tc.InvalidTransitionError):
                await lamp.switch_on(Switch(2))
            with pytest.raises(tc.InvalidTransitionError):
                await lamp.misbehave(Switch(1))
            await lamp.dim(Switch(5))
        assert seen == [Off(), On(1), On(5), Broken("on for too long (entry 2)")]


def test_states_are_checked_at_definition() -> None:
    with pytest.raises(tc.EntityDefinitionError, match="two or more"):

        class One(tc.StateMachine[Off]):
            type_name = "One"
            states: ClassVar[Mapping[str, type]] = {"off": Off}
            initial_state = Off

    with pytest.raises(tc.EntityDefinitionError, match="attrs class"):

        class NotAttrs(tc.StateMachine[Any]):
            type_name = "NotAttrs"
            states: ClassVar[Mapping[str, type]] = {"off": Off, "x": int}
            initial_state = Off

    with pytest.raises(tc.EntityDefinitionError, match="is not a state"):

        class Stranger(tc.StateMachine[Off | On]):
            type_name = "Stranger"
            states: ClassVar[Mapping[str, type]] = {"off": Off, "on": On}
            initial_state = Off

            @tc.transition(from_=Off, to=Broken)
            async def go(self, msg: Nothing) -> Broken:
                return Broken("x")

    with pytest.raises(tc.EntityDefinitionError, match="no transition"):

        class Timeless(tc.StateMachine[Off | On]):
            type_name = "Timeless"
            states: ClassVar[Mapping[str, type]] = {"off": Off, "on": On}
            initial_state = Off
            state_timeouts: ClassVar[Mapping[type, tc.StateTimeout]] = {
                On: tc.StateTimeout(after=1.0, transition="nope")
            }

            @tc.transition(from_=Off, to=On)
            async def go(self, msg: Nothing) -> On:
                return On(1)

    with pytest.raises(tc.EntityDefinitionError, match="does not start from it"):

        class Wrong(tc.StateMachine[Off | On]):
            type_name = "Wrong"
            states: ClassVar[Mapping[str, type]] = {"off": Off, "on": On}
            initial_state = Off
            state_timeouts: ClassVar[Mapping[type, tc.StateTimeout]] = {
                On: tc.StateTimeout(after=1.0, transition="go")
            }

            @tc.transition(from_=Off, to=On)
            async def go(self, msg: Nothing) -> On:
                return On(1)

    with pytest.raises(tc.EntityDefinitionError, match="must be classes"):
        tc.transition(from_=[Off, "on"], to=On)  # type: ignore[list-item]


async def test_state_query_and_watch_from_another_runner(autojump_clock: Any) -> None:
    storage, network = MemoryStorage(), MemoryNetwork()
    async with AsyncExitStack() as stack:
        first, second = [
            await stack.enter_async_context(
                tc.open_runner(
                    entities=[Lamp],
                    config=runner_config(port),
                    storage=storage,
                    transport=MemoryTransport(network),
                    clock=clock(),
                )
            )
            for port in (1, 2)
        ]

        def settled() -> bool:
            stats = [first.statistics(), second.statistics()]
            return sum(s.shards for s in stats) == 8 and all(
                s.runners == 2 and s.shards == s.shards_assigned for s in stats
            )

        with trio.fail_after(30):
            while not settled():  # noqa: ASYNC110
                await trio.sleep(0.01)
        lamp = first.client(Lamp)(remote_id(first, Lamp))
        assert await lamp.current_state(tc.GetState()) == Off()
        seen: list[object] = []

        async def watch(task_status: trio.TaskStatus[None]) -> None:
            async with lamp.watch_state(tc.WatchState()) as states:
                task_status.started()
                async for state in states:
                    seen.append(state)
                    if isinstance(state, On) and state.level == 7:
                        return

        async with trio.open_nursery() as nursery:
            await nursery.start(watch)
            await lamp.switch_on(Switch(1))
            await lamp.dim(Switch(7))
        assert seen == [Off(), On(1), On(7)]
        assert await lamp.current_state(tc.GetState()) == On(7)
        with pytest.raises(tc.InvalidTransitionError) as raised:
            await lamp.switch_on(Switch(2))
        assert raised.value.state == "on"
        assert first.statistics().remote_calls >= 2  # the queries, over the transport


async def test_a_stored_machine_that_does_not_decode_is_left_alone(
    autojump_clock: Any,
) -> None:
    durable = Lamp.__tc_durable__
    assert durable is not None
    codec = durable.codec(make_converter(), "Lamp")
    garbage = [
        b"\xc1",
        msgpack.packb(["x"]),
        msgpack.packb([{"_state": "on", "level": 1}, "1"]),
        msgpack.packb([{"_state": "dimmed", "level": 1}, 1]),
    ]
    for payload in garbage:
        with pytest.raises(tc.MalformedMessageError):
            codec.decode(payload)
    storage = MemoryStorage()
    address = tc.EntityAddress("Lamp", tc.EntityId("l"), tc.ShardId("default", 1))
    bad = StoredState(payload=garbage[-1], version=3, epoch=1)
    storage._states.apply(
        {("Lamp", "l"): ListedState("Lamp", "l", address.shard, bad, ORIGIN)}
    )
    async with open_clocked_runner([Lamp], config(), storage) as runner:
        with pytest.raises(tc.RemoteError, match="MalformedMessageError"):
            await runner.client(Lamp)("l").current_state(tc.GetState())
    assert storage._states.load(address) == bad


async def test_an_invalid_transition_stores_nothing_and_machines_count_by_state(
    autojump_clock: Any,
) -> None:
    storage = MemoryStorage()
    async with open_clocked_runner([Lamp], config(), storage) as runner:
        lamps = runner.client(Lamp)
        await lamps("a").switch_on(Switch(2))
        await lamps("b").switch_on(Switch(3))
        await lamps("b").switch_off(Nothing())
        address = lamps.address_of("a")
        before = storage._states.load(address)
        assert before is not None
        assert (before.version, before.label) == (1, "on")
        for invalid in (
            lamps("a").switch_on(Switch(5)),
            lamps("a").misbehave(Switch(1)),
        ):
            with pytest.raises(tc.InvalidTransitionError):
                await invalid
        # The refused transitions saved nothing: same snapshot, same version.
        assert storage._states.load(address) == before
        async with storage.open_session(name="operator", lease_duration=10) as op:
            assert isinstance(op.messages, StateStorage)
            counts = await op.messages.count_states(StateQuery("Lamp"))
        assert counts == [StateCount("Lamp", "off", 1), StateCount("Lamp", "on", 1)]
