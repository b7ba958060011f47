"""Workflows on PostgreSQL storage: the journal survives a runner's exit, and
a new runner replays it, skipping recorded steps; transactional steps commit
their SQL with their recorded result, exactly once (real server, real time)."""

from __future__ import annotations

import uuid
from typing import TYPE_CHECKING, Any

import pytest
import trio

import trio_cluster as tc
from trio_cluster.storage import PostgresStorage
from trio_cluster.workflows import Status, WorkflowContext, workflow

from ..helpers import config

if TYPE_CHECKING:
    from tests.pg_fixture import PgAdmin, PgSchema

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


# ----------------------------------------------------------------------
# Transactional steps: their SQL commits with their recorded result, once

ATTEMPTS: dict[str, int] = {}
GATE: list[trio.Event] = []


def attempt_of(key: str) -> int:
    ATTEMPTS[key] = ATTEMPTS.get(key, 0) + 1
    return ATTEMPTS[key]


async def book(n: int) -> int:
    attempt = attempt_of(f"book {n}")
    await tc.current_transaction().execute(
        "INSERT INTO ledger (id, note) VALUES ($1, $2)", [n, f"book attempt {attempt}"]
    )
    if attempt == 1:
        raise ConnectionError("the first attempt fails after its write")
    return attempt


async def book_next(n: int) -> int:
    # Its first attempt writes a row that exists: the statement fails (and
    # so the transaction would, but for the attempt's savepoint).
    attempt = attempt_of(f"book_next {n}")
    row = n if attempt == 1 else n + 1
    await tc.current_transaction().execute(
        "INSERT INTO ledger (id, note) VALUES ($1, $2)",
        [row, f"next attempt {attempt}"],
    )
    return row


async def book_slowly(n: int) -> int:
    attempt = attempt_of(f"slow {n}")
    await tc.current_transaction().execute(
        "INSERT INTO ledger (id, note) VALUES ($1, $2)", [n, f"slow attempt {attempt}"]
    )
    await GATE[0].wait()
    return attempt


@workflow(
    name="pg_tx", retry=tc.RetryPolicy(max_attempts=3, backoff=tc.Backoff(0.1, 0.1))
)
async def pg_tx(ctx: WorkflowContext, n: int) -> list[int]:
    first = await ctx.step(book, n, transactional=True)
    second = await ctx.step(book_next, n, transactional=True)
    third = await ctx.step(book_slowly, n + 10, transactional=True)
    return [first, second, third]


def ledger(pg_admin: PgAdmin, pg_schema: PgSchema) -> list[tuple[Any, ...]]:
    return pg_admin.execute(
        f'SELECT id, note FROM "{pg_schema.name}".ledger ORDER BY id'
    )


async def test_transactional_steps_commit_their_sql_with_their_result_once(
    pg_schema: PgSchema, pg_admin: PgAdmin
) -> None:
    ATTEMPTS.clear()
    GATE[:] = [trio.Event()]
    pg_admin.execute(
        f'CREATE TABLE "{pg_schema.name}".ledger (id int PRIMARY KEY, note text)'
    )
    prefix = f"wf_{uuid.uuid4().hex[:12]}"
    with trio.fail_after(TIMEOUT):
        storage = PostgresStorage(pg_schema.dsn, table_prefix=prefix)
        async with tc.open_runner(
            entities=[pg_tx.entity], storage=storage, config=config()
        ) as runner:
            handle = await pg_tx.client(runner).start(1, execution_id="t1")
            while ATTEMPTS.get("slow 11") != 1:  # noqa: ASYNC110
                await trio.sleep(0.05)
            # Like kill -9 while the third step runs: its write never commits.
            runner.abort()
        assert ledger(pg_admin, pg_schema) == [
            (1, "book attempt 2"),
            (2, "next attempt 2"),
        ]
        GATE[0].set()
        storage = PostgresStorage(pg_schema.dsn, table_prefix=prefix)
        async with tc.open_runner(
            entities=[pg_tx.entity], storage=storage, config=config()
        ) as runner:
            handle = pg_tx.client(runner).get("t1")
            assert await handle.result() == [2, 2, 2]
            info = await handle.poll()
            assert (info.status, info.steps) == (Status.COMPLETED, 3)
    # Each step's write is there once, from the attempt whose result was
    # recorded; the failed attempts' writes were rolled back.
    assert ledger(pg_admin, pg_schema) == [
        (1, "book attempt 2"),
        (2, "next attempt 2"),
        (11, "slow attempt 2"),
    ]
    assert ATTEMPTS == {"book 1": 2, "book_next 1": 2, "slow 11": 2}
