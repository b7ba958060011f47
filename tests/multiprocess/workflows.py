"""A workflow the multi-process tests run in real runner processes:
``python -m trio_cluster run tests.multiprocess.workflows:RUNNER``.

``slow_job`` runs one slow step: each attempt drops a marker file naming
the runner that runs it (so a test can kill that runner mid-step and see
the survivor run it again), then works for ``seconds``.
"""

from __future__ import annotations

from pathlib import Path

import attrs
import trio

import trio_cluster as tc
from trio_cluster.workflows import WorkflowContext, workflow


@attrs.frozen
class Job:
    id: str
    markers: str
    """A directory: each attempt of the slow step creates
    ``<id>@<runner port>`` in it when it starts."""
    seconds: float


@attrs.frozen
class Done:
    id: str
    started_by: str
    worked_by: str


async def begin(job: Job) -> str:
    return str(tc.current_runner().address)


async def work(job: Job) -> str:
    address = tc.current_runner().address
    Path(job.markers, f"{job.id}@{address.port}").touch()  # noqa: ASYNC240 - a tiny local file
    await trio.sleep(job.seconds)
    return str(address)


@workflow(name="mp.slow_job", idempotency_key=lambda job: job.id)
async def slow_job(ctx: WorkflowContext, job: Job) -> Done:
    started_by = await ctx.step(begin, job)
    worked_by = await ctx.step(work, job)
    return Done(job.id, started_by, worked_by)


RUNNER = {"entities": [slow_job.entity]}
