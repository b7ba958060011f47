"""A code change deployed under the simulator (`WorkflowContext.patched`):
executions started before it, mid-way through it and after it all end,
none suspended, each on one branch.

The workflow's code reads the deployed version (a variable the test flips
mid-run, as a deploy replaces the code on every runner): version 1 runs the
old step, version 2 runs ``if ctx.patched("v2")`` with a new step (and a
sleep) in the new branch. Under kills, freezes and partitions (so replays on
other runners, on either side of the deploy), once healed:

* every execution completed (no `NonDeterminismError` suspended one);
* at the change's position the journal holds the old step if the execution
  decided ``v2`` False or never asked (it went past under version 1), and
  the new one if it decided True;
* executions started after the deploy all took the new branch;
* every history replays under version 2's code (`replay_workflow`).
"""

from __future__ import annotations

from typing import Any

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
    replay_workflow,
    run_simulation,
)
from trio_cluster.workflows import Status, WorkflowContext, WorkflowHistory, workflow

pytestmark = pytest.mark.simulation

DEPLOYED = [1]
"""The version of the code the runners run."""


async def act(name: str) -> str:
    await trio.sleep(0.2)  # a fault may strike in between
    return name


@attrs.frozen
class Plan:
    id: str
    pause: float
    start_at: float


@workflow(
    name="sim_versioned",
    retry=tc.RetryPolicy(max_attempts=1000, backoff=tc.Backoff(0.5, 0.5)),
)
async def sim_versioned(ctx: WorkflowContext, plan: Plan) -> str:
    await ctx.step(act, "a", name="a")
    await ctx.sleep(plan.pause)
    if DEPLOYED[0] >= 2 and ctx.patched("v2"):
        await ctx.step(act, "new", name="new")
        await ctx.sleep(1.0)
        branch = "new"
    else:
        await ctx.step(act, "old", name="old")
        branch = "old"
    await ctx.step(act, "z", name="z")
    return branch


async def on_any(cluster: SimulatedCluster, attempt: int, what: Any) -> Any:
    """``await what(runner)`` through any runner that is up, until it works."""
    while True:
        attempt += 1
        runners = cluster.up()
        if runners:
            runner = runners[attempt % len(runners)].runner
            assert runner is not None
            try:
                return await what(runner)
            except tc.ClusterError:
                pass
        await trio.sleep(0.5)


async def deploy_under_failure(
    faults: FaultSchedule, seed: int, plans: list[Plan], deploy_at: float
) -> tuple[dict[str, WorkflowHistory], set[str]]:
    DEPLOYED[0] = 1
    after: set[str] = set()

    async def client(plan: Plan) -> None:
        await trio.sleep(plan.start_at)
        if DEPLOYED[0] >= 2:
            after.add(plan.id)
        await on_any(
            cluster,
            0,
            lambda r: sim_versioned.client(r).start(plan, execution_id=plan.id),
        )

    async def deploy() -> None:
        await trio.sleep(deploy_at)
        DEPLOYED[0] = 2

    async with open_simulated_cluster([sim_versioned.entity], seed=seed) as cluster:
        with trio.fail_after(faults.end + 120):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(cluster.run_schedule, faults)
                nursery.start_soon(deploy)
                for plan in plans:
                    nursery.start_soon(client, plan)
        await cluster.heal_all()
        await cluster.wait_quiescent()
        finals: dict[str, WorkflowHistory] = {}
        with trio.fail_after(600):
            for plan in plans:
                while True:
                    history: WorkflowHistory = await on_any(
                        cluster,
                        2,
                        lambda r, p=plan: sim_versioned.client(r).get(p.id).history(),
                    )
                    status = history.journal.status
                    assert status is not Status.SUSPENDED, history.journal
                    if status is Status.COMPLETED:
                        finals[plan.id] = history
                        break
                    await trio.sleep(5.0)
    return finals, after


@st.composite
def plans(draw: st.DrawFn) -> list[Plan]:
    return [
        Plan(f"v{n}", draw(st.floats(0.5, 8.0)), draw(st.floats(0.0, 12.0)))
        for n in range(draw(st.integers(1, 4)))
    ]


@given(
    faults=fault_schedules(
        runners=3, duration=15.0, kinds={"kill", "freeze", "partition"}
    ),
    seed=st.integers(0, 2**16),
    plans=plans(),
    deploy_at=st.floats(0.0, 12.0),
)
def test_a_patched_change_deployed_mid_run_keeps_every_execution_on_one_branch(
    faults, seed, plans, deploy_at
):
    finals, after = run_simulation(deploy_under_failure, faults, seed, plans, deploy_at)
    DEPLOYED[0] = 2
    for plan in plans:
        journal = finals[plan.id].journal
        names = {e.position: e.name for e in journal.entries}
        decided = dict(journal.patches).get("v2")
        assert journal.result is not None
        if decided:
            expected = ["a", "sleep", "new", "sleep", "z"]
        else:
            expected = ["a", "sleep", "old", "z"]
        assert [names[(i,)] for i in range(len(expected))] == expected, journal
        assert len(names) == len(expected)
        if plan.id in after:
            assert decided is True, (plan, journal)
        trio.run(replay_workflow, sim_versioned, finals[plan.id])
