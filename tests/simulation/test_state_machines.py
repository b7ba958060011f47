"""State machines under the simulator: transitions and state timeouts
survive kills, freezes and partitions.

Each client switches a `Fuse` on (it blows 20 s later: a state timeout)
and, for some fuses, resets it first (back to off: the timeout armed by
switching on must then be ignored, even after a failover). Once everything
healed and the timeouts are due, every fuse that was left on has blown, by
its own timeout (entry 1), and every reset one is off, with the transitions
each acknowledged exactly once.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar

import attrs
import pytest
import trio
from hypothesis import given, strategies as st

import trio_cluster as tc
from trio_cluster.testing import (
    FaultSchedule,
    SimulatedCluster,
    fault_schedules,
    open_simulated_cluster,
    run_simulation,
)

pytestmark = pytest.mark.simulation

BLOW_AFTER = 20.0


@attrs.frozen
class Off:
    resets: int = 0


@attrs.frozen
class On:
    pass


@attrs.frozen
class Blown:
    entry: int


@attrs.frozen
class Switch:
    key: str


class Fuse(tc.StateMachine[Off | On | Blown]):
    type_name = "sim.Fuse"
    states: ClassVar[Mapping[str, type]] = {"off": Off, "on": On, "blown": Blown}
    initial_state = Off
    state_timeouts: ClassVar[Mapping[type, tc.StateTimeout]] = {
        On: tc.StateTimeout(after=BLOW_AFTER, transition="blow")
    }

    @tc.transition(from_=Off, to=On, primary_key=lambda m: m.key)
    async def switch_on(self, msg: Switch) -> On:
        await trio.sleep(0.1)  # work: a fault may strike in between
        return On()

    @tc.transition(from_=On, to=Off, primary_key=lambda m: m.key)
    async def reset(self, msg: Switch) -> Off:
        return Off(resets=1)

    @tc.transition(from_=On, to=Blown)
    async def blow(self, msg: tc.StateTimedOut) -> Blown:
        return Blown(msg.entry)


async def call(cluster: SimulatedCluster, attempt: int, fuse: str, what: str) -> object:
    """A transition (or the state query) through any runner that is up, until
    it answers; an `InvalidTransitionError` is an answer too."""
    while True:
        attempt += 1
        runners = cluster.up()
        if runners:
            runner = runners[attempt % len(runners)].runner
            assert runner is not None
            handle = runner.client(Fuse)(fuse)
            try:
                if what == "state":
                    return await handle.current_state(tc.GetState())
                method = handle.switch_on if what == "on" else handle.reset
                return await method(Switch(f"{fuse}/{what}"))
            except tc.InvalidTransitionError as exc:
                return exc
            except tc.ClusterError:
                pass  # its runner died, or storage failed: send it again
        await trio.sleep(0.5)


async def fuses_under_failure(
    faults: FaultSchedule, seed: int, fuses: dict[str, bool]
) -> tuple[dict[str, list[object]], dict[str, object]]:
    answers: dict[str, list[object]] = {fuse: [] for fuse in fuses}

    async def client(fuse: str, reset: bool) -> None:
        answers[fuse].append(await call(cluster, 0, fuse, "on"))
        if reset:
            answers[fuse].append(await call(cluster, 1, fuse, "reset"))

    async with open_simulated_cluster([Fuse], runners=3, seed=seed) as cluster:
        with trio.fail_after(faults.end + 120):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(cluster.run_schedule, faults)
                for fuse, reset in fuses.items():
                    nursery.start_soon(client, fuse, reset)
        await cluster.heal_all()
        await cluster.wait_quiescent()
        await trio.sleep(BLOW_AFTER + 10)  # every timeout is due, and delivered
        with trio.fail_after(60):
            finals = {fuse: await call(cluster, 2, fuse, "state") for fuse in fuses}
    return answers, finals


@given(
    faults=fault_schedules(
        runners=3, duration=15.0, kinds={"kill", "stop", "freeze", "partition"}
    ),
    seed=st.integers(0, 2**16),
    fuses=st.dictionaries(
        st.sampled_from(["f1", "f2", "f3", "f4"]), st.booleans(), min_size=1
    ),
)
def test_transitions_and_timeouts_survive_failures(faults, seed, fuses):
    answers, finals = run_simulation(fuses_under_failure, faults, seed, fuses)
    for fuse, reset in fuses.items():
        if reset:
            # Reset within 20 s of switching on (unless faults delayed it
            # past the timeout: then the fuse blew first, and stays so).
            assert answers[fuse][0] == On(), (fuse, answers[fuse])
            if answers[fuse][1] == Off(resets=1):
                assert finals[fuse] == Off(resets=1), (fuse, finals[fuse])
            else:
                assert isinstance(answers[fuse][1], tc.InvalidTransitionError)
                assert finals[fuse] == Blown(entry=1), (fuse, finals[fuse])
        else:
            assert answers[fuse] == [On()], (fuse, answers[fuse])
            assert finals[fuse] == Blown(entry=1), (fuse, finals[fuse])
