"""Durable entity state under the simulator: kills, freezes and partitions
never lose an acknowledged change, nor apply one twice.

A `Tally` keeps its total as durable state. Each client adds ``3**k`` for
its ``k``-th add, one after the other, through whichever runner is up,
retrying each with its key (the primary key) until it is answered. With
durable state, every answer is exact: the ``k``-th add answers the sum of
adds ``0..k`` (a lost commit would answer less, an add applied twice a
digit 2 in base 3), a retry answers the same, and once everything healed
the stored total is the sum of every add.
"""

from __future__ import annotations

import attrs
import pytest
import trio
from hypothesis import example, given, strategies as st

import trio_cluster as tc
from trio_cluster.testing import (
    FaultSchedule,
    FreezeRunner,
    KillRunner,
    SimulatedCluster,
    fault_schedules,
    open_simulated_cluster,
    run_simulation,
)

pytestmark = pytest.mark.simulation


@attrs.frozen
class Total:
    value: int = 0


@attrs.frozen
class Add:
    key: str
    amount: int


@attrs.frozen
class Read:
    pass


class Tally(tc.Entity):
    type_name = "sim.Tally"
    state = tc.durable(Total)

    @tc.rpc(persisted=True, transactional=True, primary_key=lambda m: m.key)
    async def add(self, msg: Add) -> int:
        value = self.state.value + msg.amount
        await trio.sleep(0.1)  # work: a kill or freeze may strike in between
        self.state = Total(value)
        return value

    @tc.rpc
    async def read(self, msg: Read) -> int:
        return self.state.value


async def call(
    cluster: SimulatedCluster, attempt: int, fn: str, tally: str, message: object
) -> int:
    """``Tally.<fn>(message)`` through any runner that is up, until it answers."""
    while True:
        attempt += 1
        runners = cluster.up()
        if runners:
            runner = runners[attempt % len(runners)].runner
            assert runner is not None
            try:
                handle = getattr(runner.client(Tally)(tally), fn)
                answer: int = await handle(message)
            except tc.ClusterError:
                pass  # its runner died, or storage failed: send it again
            else:
                return answer
        await trio.sleep(0.5)


async def client(
    cluster: SimulatedCluster,
    tally: str,
    count: int,
    answers: dict[tuple[str, int], list[int]],
) -> None:
    for k in range(count):
        add = Add(f"{tally}-{k}", 3**k)
        answers[tally, k] = [await call(cluster, k, "add", tally, add)]
        answers[tally, k].append(await call(cluster, k, "add", tally, add))


async def tallies_under_failure(
    faults: FaultSchedule, seed: int, adds: dict[str, int]
) -> tuple[dict[tuple[str, int], list[int]], dict[str, int]]:
    answers: dict[tuple[str, int], list[int]] = {}
    async with open_simulated_cluster([Tally], runners=3, seed=seed) as cluster:
        with trio.fail_after(faults.end + 120):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(cluster.run_schedule, faults)
                for tally, count in adds.items():
                    nursery.start_soon(client, cluster, tally, count, answers)
        await cluster.heal_all()
        await cluster.wait_quiescent()
        with trio.fail_after(60):
            finals = {
                tally: await call(cluster, 0, "read", tally, Read()) for tally in adds
            }
    return answers, finals


@given(
    faults=fault_schedules(
        runners=3, duration=15.0, kinds={"kill", "stop", "freeze", "partition"}
    ),
    seed=st.integers(0, 2**16),
    adds=st.dictionaries(
        st.sampled_from(["t1", "t2", "t3", "t4"]), st.integers(1, 6), min_size=1
    ),
)
# Found by this test: the handler of t2's third add returned on a runner
# frozen before its reply was written; its lease lapsed meanwhile (the
# shard stopped, the incarnation left its slot), then it thawed with the
# fence still its own and committed the reply, but no state: the state to
# save was looked up on the slot's incarnation, gone by then.
@example(
    faults=FaultSchedule(
        faults=(
            KillRunner(at=0.0, runner=0, down_for=1.0),
            FreezeRunner(at=0.5, runner=2, duration=5.0),
        )
    ),
    seed=0,
    adds={"t1": 1, "t2": 3},
)
def test_no_acknowledged_change_is_lost_or_applied_twice(faults, seed, adds):
    answers, finals = run_simulation(tallies_under_failure, faults, seed, adds)
    assert len(answers) == sum(adds.values())  # none lost
    for (tally, k), (total, again) in answers.items():
        expected = sum(3**i for i in range(k + 1))
        assert total == expected, f"{tally}-{k}: answered {total}, not {expected}"
        assert again == total, f"{tally}-{k}: the retry got another total"
    for tally, count in adds.items():
        assert finals[tally] == sum(3**i for i in range(count)), tally
