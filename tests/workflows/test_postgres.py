"""Workflows on PostgreSQL storage: the journal survives a runner's exit, and
a new runner replays it, skipping recorded steps (real server, real time)."""

from __future__ import annotations

import uuid
from typing import TYPE_CHECKING

import pytest
import trio

import trio_cluster as tc
from trio_cluster.storage import PostgresStorage
from trio_cluster.workflows import Status, WorkflowContext, workflow

from ..helpers import config

if TYPE_CHECKING:
    from tests.pg_fixture import PgSchema

pytestmark = pytest.mark.postgres

TIMEOUT = 60  # generous: the machine is loaded
CALLS: list[str] = []


async def first(n: int) -> int:
    CALLS.append("first")
    return n + 1


async def second(n: int) -> int:
    CALLS.append("second")
    return n * 10


@workflow(name="pg_flow")
async def pg_flow(ctx: WorkflowContext, n: int) -> int:
    a = await ctx.step(first, n)
    await ctx.sleep(2.0)  # above in_memory_sleep: a durable timer
    return await ctx.step(second, a)


async def test_a_workflow_resumes_from_its_journal_on_postgres(
    pg_schema: PgSchema,
) -> None:
    CALLS.clear()
    prefix = f"wf_{uuid.uuid4().hex[:12]}"
    with trio.fail_after(TIMEOUT):
        storage = PostgresStorage(pg_schema.dsn, table_prefix=prefix)
        async with tc.open_runner(
            entities=[pg_flow.entity], storage=storage, config=config()
        ) as runner:
            handle = await pg_flow.client(runner).start(4, execution_id="p1")
            # Until the first step and the timer are committed.
            while (await handle.poll()).status is not Status.WAITING:  # noqa: ASYNC110
                await trio.sleep(0.05)
        assert CALLS == ["first"]
        storage = PostgresStorage(pg_schema.dsn, table_prefix=prefix)
        async with tc.open_runner(
            entities=[pg_flow.entity], storage=storage, config=config()
        ) as runner:
            handle = pg_flow.client(runner).get("p1")
            assert await handle.result() == 50
            info = await handle.poll()
            assert (info.status, info.steps) == (Status.COMPLETED, 3)
    assert CALLS == ["first", "second"]
