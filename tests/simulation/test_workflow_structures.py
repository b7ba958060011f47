"""Parallel steps, child workflows and transactional steps under the
simulator: kills, freezes and partitions never break their guarantees.

Each saga runs a transactional step, a nursery of parallel branches (each
two transactional steps) and, in some, a child workflow saga, then a last
step; some decline at a generated step (non-retryable: the saga
compensates), some are interrupted by their client. Once everything
healed, every saga and child has ended, and:

* its journal holds each branch's steps at the positions of the code's
  structure (``(2, i, 0)``, ``(2, i, 2)``), whatever order they finished in;
* compensated, it compensated exactly the steps recorded as done, each once,
  in reverse order of position (a running child is interrupted in its turn
  and compensates its own steps the same way); completed, nothing;
* each transactional step's persisted send (to a `Tally` entity that counts
  exactly once) committed once if the step's result is recorded, and never
  otherwise: attempts that failed, or whose advance never committed, left
  nothing.
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
    run_simulation,
)
from trio_cluster.workflows import (
    Journal,
    Kind,
    Status,
    WorkflowContext,
    WorkflowHistory,
    workflow,
)

pytestmark = pytest.mark.simulation

TERMINAL = (Status.COMPLETED, Status.COMPENSATED, Status.FAILED)
EFFECTS: list[tuple[str, str, str]] = []
"""(``do``/``undo``, saga, step) of every attempt that ran (at least once)."""


class DeclinedError(Exception):
    pass


@attrs.frozen
class Work:
    saga: str
    name: str
    fail: bool


@attrs.frozen
class Mark:
    name: str


@attrs.frozen
class Marks:
    counts: tuple[tuple[str, int], ...] = ()


@attrs.frozen
class Read:
    pass


class Tally(tc.Entity):
    """Counts the marks each saga's steps sent, exactly once per request."""

    type_name = "SimTally"
    state = tc.durable(Marks)

    @tc.rpc(persisted=True, transactional=True)
    async def mark(self, msg: Mark) -> None:
        counts = dict(self.state.counts)
        counts[msg.name] = counts.get(msg.name, 0) + 1
        self.state = Marks(tuple(sorted(counts.items())))

    @tc.rpc
    async def read(self, msg: Read) -> Marks:
        return self.state


async def do(work: Work) -> str:
    tally: Any = tc.current_runner().client(Tally)(work.saga)
    await tally.mark.discard(Mark(work.name))  # in the step's savepoint
    await trio.sleep(0.2)  # work: a fault may strike in between
    EFFECTS.append(("do", work.saga, work.name))
    if work.fail:
        raise DeclinedError(work.name)
    return work.name


async def undo(work: Work, result: str) -> None:
    await trio.sleep(0.2)
    EFFECTS.append(("undo", work.saga, work.name))


RETRY = tc.RetryPolicy(
    max_attempts=1000, backoff=tc.Backoff(0.5, 0.5), non_retryable=(DeclinedError,)
)


@attrs.frozen
class Plan:
    id: str
    width: int
    child: bool
    fail_at: str | None


async def step(ctx: WorkflowContext, plan: Plan, saga: str, name: str) -> str:
    work = Work(saga, name, plan.fail_at == name)
    return await ctx.step(do, work, name=name, compensate=undo, transactional=True)


@workflow(name="sim_leaf", retry=RETRY)
async def sim_leaf(ctx: WorkflowContext, plan: Plan) -> int:
    saga = ctx.execution_id
    for name in ("c0", "c1"):
        await step(ctx, plan, saga, name)
        await ctx.sleep(1.0)
    return 2


@workflow(name="sim_tree", retry=RETRY)
async def sim_tree(ctx: WorkflowContext, plan: Plan) -> int:
    await step(ctx, plan, plan.id, "s0")
    await ctx.sleep(2.0)

    async def branch(index: int) -> None:
        await step(ctx, plan, plan.id, f"p{index}")
        await ctx.sleep(1.0)
        await step(ctx, plan, plan.id, f"q{index}")

    async def child() -> None:
        await ctx.child(sim_leaf, plan)

    async with ctx.open_nursery() as nursery:
        for index in range(plan.width):
            nursery.start_soon(branch, index)
        if plan.child:
            nursery.start_soon(child)
    await ctx.sleep(2.0)
    await step(ctx, plan, plan.id, "last")
    return plan.width


ENTITIES = [sim_tree.entity, sim_leaf.entity, Tally]


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
                pass  # its runner died, or storage failed: again
        await trio.sleep(0.5)


@attrs.frozen
class Final:
    history: WorkflowHistory
    marks: Marks


async def final_of(
    cluster: SimulatedCluster, definition: Any, execution_id: str, saga: str
) -> Final:
    while True:
        history: WorkflowHistory = await on_any(
            cluster, 2, lambda r: definition.client(r).get(execution_id).history()
        )
        status = history.journal.status
        assert status is not Status.SUSPENDED, history.journal
        if status in TERMINAL:
            break
        await trio.sleep(5.0)
    marks = await on_any(cluster, 3, lambda r: r.client(Tally)(saga).read(Read()))
    return Final(history, marks)


async def sagas_under_failure(
    faults: FaultSchedule, seed: int, plans: list[Plan], interrupted: set[str]
) -> dict[str, Final]:
    EFFECTS.clear()

    async def client(plan: Plan) -> None:
        await on_any(
            cluster,
            0,
            lambda r: sim_tree.client(r).start(plan, execution_id=plan.id),
        )
        if plan.id in interrupted:
            await trio.sleep(4.0)
            await on_any(
                cluster,
                1,
                lambda r: sim_tree.client(r).get(plan.id).interrupt("client gave up"),
            )

    async with open_simulated_cluster(ENTITIES, runners=3, seed=seed) as cluster:
        with trio.fail_after(faults.end + 120):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(cluster.run_schedule, faults)
                for plan in plans:
                    nursery.start_soon(client, plan)
        await cluster.heal_all()
        await cluster.wait_quiescent()
        finals: dict[str, Final] = {}
        with trio.fail_after(900):
            for plan in plans:
                final = finals[plan.id] = await final_of(
                    cluster, sim_tree, plan.id, plan.id
                )
                entries = final.history.journal.entries
                if any(entry.kind is Kind.CHILD for entry in entries):
                    leaf = f"{plan.id}/2.{plan.width}.0"
                    finals[leaf] = await final_of(cluster, sim_leaf, leaf, leaf)
    return finals


def step_names(plan: Plan) -> list[str]:
    names = ["s0", "last"]
    for index in range(plan.width):
        names += [f"p{index}", f"q{index}"]
    return names


@st.composite
def plans(draw: st.DrawFn) -> list[Plan]:
    result = []
    for n in range(draw(st.integers(1, 2))):
        width = draw(st.integers(1, 3))
        child = draw(st.booleans())
        names = [
            *step_names(Plan("", width, False, None)),
            *(["c0", "c1"] if child else []),
        ]
        fail_at = draw(st.none() | st.sampled_from(names))
        result.append(Plan(f"saga{n}", width, child, fail_at))
    return result


def check_saga(saga: str, journal: Journal, marks: Marks, interrupted: bool) -> None:
    """The guarantees of one execution (see the module docstring)."""
    entries = journal.entries
    done = {
        e.position: e.name for e in entries if e.kind is Kind.STEP and e.error is None
    }
    failed = [e for e in entries if e.kind is Kind.STEP and e.error is not None]
    # Exactly once: a step's mark committed iff its result is recorded.
    assert dict(marks.counts) == dict.fromkeys(done.values(), 1), (
        saga,
        marks,
        entries,
    )
    # Positions from the structure of the code.
    for position, name in done.items():
        if name.startswith("p"):
            assert position == (2, int(name[1:]), 0), (position, name)
        if name.startswith("q"):
            assert position == (2, int(name[1:]), 2), (position, name)
    dos = [name for kind, s, name in EFFECTS if kind == "do" and s == saga]
    undos = [name for kind, s, name in EFFECTS if kind == "undo" and s == saga]
    assert set(done.values()) <= set(dos)
    if journal.status is Status.COMPLETED:
        assert not failed, (saga, journal)
        assert not undos, (saga, EFFECTS)
        return
    assert journal.error is not None, (saga, journal)
    assert failed or interrupted or journal.error.type != "StepFailedError"
    # Each recorded step compensated once, newest position first (children
    # of the nursery in reverse order of starting); a child in its turn.
    compensated = list(journal.compensated)
    assert compensated == sorted(set(compensated), reverse=True), (saga, compensated)
    steps = [position for position in compensated if position in done]
    assert set(steps) == set(done), (saga, compensated, done)
    if journal.status is Status.FAILED:
        assert not done
    # Each compensation ran after its step; first runs in that same order.
    first_runs = list(dict.fromkeys(undos))
    assert first_runs == [done[position] for position in steps], (saga, EFFECTS)
    for name in first_runs:
        assert ("do", saga, name) in EFFECTS[: EFFECTS.index(("undo", saga, name))]


@given(
    faults=fault_schedules(
        runners=3, duration=15.0, kinds={"kill", "freeze", "partition"}
    ),
    seed=st.integers(0, 2**16),
    plans=plans(),
    interrupt=st.sets(st.sampled_from(["saga0", "saga1"])),
)
def test_parallel_steps_children_and_transactional_steps_under_failures(
    faults, seed, plans, interrupt
):
    finals = run_simulation(sagas_under_failure, faults, seed, plans, interrupt)
    for plan in plans:
        parent = finals[plan.id]
        journal = parent.history.journal
        check_saga(plan.id, journal, parent.marks, plan.id in interrupt)
        if not plan.child:
            continue
        leaf_id = f"{plan.id}/2.{plan.width}.0"
        child_entries = [e for e in journal.entries if e.kind is Kind.CHILD]
        if not child_entries:
            continue  # the parent failed (or was interrupted) before it
        [entry] = child_entries
        assert (entry.position, entry.execution_id) == ((2, plan.width, 0), leaf_id)
        leaf = finals[leaf_id]
        stopped = entry.position in journal.stopping
        check_saga(leaf_id, leaf.history.journal, leaf.marks, stopped)
        if leaf.history.journal.status is Status.COMPENSATED and stopped:
            assert entry.position in journal.compensated
        if journal.status is Status.COMPLETED:
            assert leaf.history.journal.status is Status.COMPLETED
