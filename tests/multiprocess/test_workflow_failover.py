"""Durable workflows across ``kill -9`` of real runner processes on real
PostgreSQL: an execution killed in a durable sleep wakes on a survivor, and
one killed in the middle of a step runs that step again there, each within
the failover time, with every recorded step kept (not run again)."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import pytest
import trio

from trio_cluster.workflows import Status, WorkflowAdmin

from ..helpers import load_example
from .helpers import MultiCluster, http_get, log
from .test_failover import KILL_BOUND
from .workflows import Job, slow_job

if TYPE_CHECKING:
    from pathlib import Path

    import trio_cluster as tc

pytestmark = [pytest.mark.postgres, pytest.mark.multiprocess, pytest.mark.slow]

SLACK = 1.0
"""Seconds allowed on top of `KILL_BOUND` for the woken execution's own
work (its advance and its step's transaction) on the loaded machine."""
JOBS = 4
WORK = 8.0
"""Seconds a slow step works: every job's is still running at the kill."""
REMINDERS = 24
DELAY = 8.0
"""Seconds each reminder sleeps: long enough that they all sleep before the
kill, and that some are due before the survivor has taken over."""


async def _wait_status(
    client: tc.Runner, workflow: str, status: Status, n: int
) -> None:
    """Poll storage (bounded by the caller) until ``n`` executions of
    ``workflow`` have ``status``."""
    admin = WorkflowAdmin(client)
    while len(await admin.list(workflow=workflow, status=status, limit=1000)) < n:  # noqa: ASYNC110 - storage, polled
        await trio.sleep(0.1)


async def test_a_sleeping_workflow_wakes_on_a_survivor_after_kill_9(
    cluster: MultiCluster,
) -> None:
    example = load_example("durable_sleep")
    target = "examples.durable_sleep:RUNNER"
    a = await cluster.spawn("a", target=target, metrics=True)
    b = await cluster.spawn("b", target=target)
    await a.wait_ready()
    await b.wait_ready()
    async with cluster.client() as client:
        reminders = example.remind.client(client)
        admin = WorkflowAdmin(client)
        with trio.fail_after(120):
            handles = [
                await reminders.start(example.Reminder(f"r{n:02}", "x", DELAY))
                for n in range(REMINDERS)
            ]
            await _wait_status(client, "remind", Status.WAITING, REMINDERS)
            sleeping = await admin.list(workflow="remind", limit=1000)
            noted_by = {
                x.execution_id: admin.journal_data(x.journal)["entries"][0]["value"]
                for x in sleeping
                if x.journal is not None
            }
            victims = {e for e, runner in noted_by.items() if runner == b.address}
            assert victims, noted_by
            assert set(noted_by.values()) == {a.address, b.address}
            due = {
                x.execution_id: x.info.waiting_until
                for x in sleeping
                if x.info is not None and x.info.waiting_until is not None
            }
            assert len(due) == REMINDERS
            # Kill b just before its first reminder is due: some of its
            # reminders fall due while nobody serves their shards.
            first = min(due[e] for e in victims)
            await trio.sleep(max(0.0, first - client.clock.now() - 0.2))
            killed_at = client.clock.now()
            b.kill()
            sent = {h.execution_id: await h.result() for h in handles}
        assert await b.wait_exit() == -9
    overdue = [e for e in victims if due[e] < killed_at + 0.5]
    assert overdue, (killed_at, due)
    for execution, done in sent.items():
        assert done.noted_by == noted_by[execution]  # recorded: not run again
        if execution in victims:
            assert done.sent_by == a.address
            woke = done.sent_at - max(done.due, killed_at)
            assert woke <= KILL_BOUND + SLACK, (execution, woke)
        else:
            assert done.sent_by == a.address
            assert done.sent_at - done.due <= SLACK, (execution, done)
    lateness = sorted(done.sent_at - done.due for done in sent.values())
    log.info(
        "kill -9 in a durable sleep: %d of %d reminders on the killed runner (%d"
        " due within 0.5 s of the kill); lateness median %.3f s, max %.3f s",
        len(victims),
        REMINDERS,
        len(overdue),
        lateness[len(lateness) // 2],
        lateness[-1],
    )
    # The command line and the survivor's /metrics see them all completed.
    code, out, err = await cluster.command("workflows", "list", "--status", "completed")
    assert code == 0, err
    assert len(_json_list(out)) == REMINDERS
    assert a.metrics_port is not None
    status, body = await http_get(a.metrics_port, "/metrics")
    assert status == 200
    assert (
        f'trio_cluster_workflows{{status="completed",workflow="remind"}} {REMINDERS}'
        in body
    )
    assert 'trio_cluster_workflow_step_seconds_count{workflow="remind"}' in body


async def test_a_step_cut_by_kill_9_runs_again_on_a_survivor(
    cluster: MultiCluster, tmp_path: Path
) -> None:
    target = "tests.multiprocess.workflows:RUNNER"
    a, b = await cluster.start("a", "b", target=target)
    markers = tmp_path / "markers"
    markers.mkdir()
    port_of = {runner.address: runner.address.rsplit(":", 1)[1] for runner in (a, b)}
    async with cluster.client() as client:
        jobs = slow_job.client(client)
        with trio.fail_after(150):
            # Few jobs: a running step holds one of its runner's (4)
            # transaction connections. Their shards may all be a's (1 in
            # 16): then the batch finishes and another is started.
            handles = []
            victims: set[str] = set()
            for batch in range(3):
                handles += [
                    await jobs.start(Job(f"j{batch}.{n}", str(markers), WORK))
                    for n in range(JOBS)
                ]
                # Every job's slow step is running: kill b under its own.
                while len(list(markers.iterdir())) < JOBS * (batch + 1):  # noqa: ASYNC110
                    await trio.sleep(0.05)
                started = dict(p.name.split("@") for p in markers.iterdir())
                victims = {
                    j for j, port in started.items() if port == port_of[b.address]
                }
                if victims:
                    break
                for handle in handles:
                    await handle.result()
            assert victims, started
            killed_at = trio.current_time()
            b.kill()
            again: dict[str, float] = {}
            while len(again) < len(victims):
                for job in victims - again.keys():
                    if (markers / f"{job}@{port_of[a.address]}").exists():
                        again[job] = trio.current_time() - killed_at
                await trio.sleep(0.02)
            done = {h.execution_id: await h.result() for h in handles}
        assert await b.wait_exit() == -9
        admin = WorkflowAdmin(client)
        for job, result in done.items():
            if job in victims:
                # Started on b, cut, run again (at least once) on a.
                assert (result.started_by, result.worked_by) == (b.address, a.address)
            else:
                assert result.worked_by == a.address
            execution = await admin.get("mp.slow_job", job)
            assert execution is not None
            assert execution.journal is not None
            # Each step recorded once; the cut attempt left no trace.
            entries = admin.journal_data(execution.journal)["entries"]
            assert [(e["name"], e["attempts"]) for e in entries] == [
                ("begin", 1),
                ("work", 1),
            ]
    worst = max(again.values())
    log.info(
        "kill -9 mid-step: %d cut steps ran again on the survivor within %.3f s",
        len(victims),
        worst,
    )
    assert worst <= KILL_BOUND + SLACK, again


def _json_list(text: str) -> list[Any]:
    data = json.loads(text)
    assert isinstance(data, list)
    return data
