"""Rows a runner reads back from PostgreSQL that are not what it wrote (issue
11, item 6): each is written with raw SQL, as a hand edit, another program
or an older version could leave it, and the runner must serve on, on every
restart, with a typed error for what it cannot use (real server, real time).
"""

from __future__ import annotations

import json
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

import pytest
import trio

import trio_cluster as tc
from tests import helpers
from tests.pg_fixture import unique_prefix
from trio_cluster._core._hashing import advisory_namespace
from trio_cluster.storage import PostgresStorage
from trio_cluster.storage._postgres._driver._driver import PgConnection
from trio_cluster.storage._postgres._schema import PgNames

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from tests.pg_fixture import PgSchema

pytestmark = pytest.mark.postgres

TIMEOUT = 30

BAD_IDS = ["", " padded", "x" * 256]
"""Entity ids PostgreSQL holds but `EntityId` refuses (a NUL or a lone
surrogate cannot even be stored in a UTF-8 database)."""


def config() -> tc.ShardingConfig:
    return helpers.config(
        storage_poll_interval=0.2,
        lease_refresh_interval=0.5,
        membership_poll_interval=0.2,
    )


@asynccontextmanager
async def serving(storage: PostgresStorage) -> AsyncIterator[tc.Runner]:
    async with tc.open_runner(
        entities=[helpers.Account], storage=storage, config=config()
    ) as runner:
        await runner.wait_shards_acquired()
        yield runner


async def sql(dsn: str, query: str, params: list[object] | None = None) -> list[Any]:
    conn = await PgConnection.connect(dsn, application_name="test sql")
    async with conn:
        return (await conn.execute(query, params or [], prepare=False)).rows


async def insert_poison(
    dsn: str, prefix: str, row: tuple[tc.ShardId, bytes], first_id: int
) -> list[int]:
    """One request per bad id, in the shard and with the payload of ``row``
    (see `valid_row`), notified as the library's own writes are (runners do
    not poll); returns their ids."""
    shard, payload = row
    ids = [first_id + i for i in range(len(BAD_IDS))]
    for request_id, bad_id in zip(ids, BAD_IDS, strict=True):
        await sql(
            dsn,
            f"INSERT INTO {prefix}_messages (request_id, shard_group, shard_number,"
            " entity_type, entity_id, tag, payload)"
            " VALUES ($1, $2, $3, 'Account', $4, 'deposit', $5)",
            [request_id, shard.group, shard.number, bad_id, payload],
        )
    note = json.dumps({"m": [[shard.group, shard.number]], "d": None})
    await sql(
        dsn, "SELECT pg_notify($1, $2)", [PgNames.for_prefix(prefix).channel, note]
    )
    return ids


def valid_row(runner: tc.Runner) -> tuple[tc.ShardId, bytes]:
    """The shard of a valid id, and a valid `Account.deposit` payload."""
    shard = runner.client(helpers.Account).address_of("ivy").shard
    handler = runner._registry.get("Account").handlers["deposit"]  # type: ignore[union-attr]
    return shard, handler.message.encode(helpers.Deposit("poison", 1))


async def final_replies(dsn: str, prefix: str, ids: list[int]) -> dict[int, bytes]:
    rows = await sql(
        dsn,
        f"SELECT request_id, payload FROM {prefix}_replies"
        " WHERE request_id = ANY($1::int8[]) AND sequence IS NULL",
        [ids],
    )
    return dict(rows)


async def answered(dsn: str, prefix: str, ids: list[int]) -> dict[int, bytes]:
    """Wait (polling) until every request of ``ids`` has a final reply."""
    while True:
        replies = await final_replies(dsn, prefix, ids)
        if len(replies) == len(ids):
            return replies
        await trio.sleep(0.05)


async def test_a_row_with_an_invalid_entity_id_gets_an_error_and_the_runner_serves_on(
    pg_schema: PgSchema,
) -> None:
    # Regression: building the claimed request raised InvalidIdError out of
    # the read loop, so the runner died, and again on every restart (the row
    # stayed unanswered).
    prefix = unique_prefix()
    storage = PostgresStorage(pg_schema.dsn, table_prefix=prefix)
    dsn = pg_schema.dsn
    with trio.fail_after(TIMEOUT):
        async with serving(storage) as runner:
            accounts = runner.client(helpers.Account)
            row = valid_row(runner)
            first = await insert_poison(dsn, prefix, row, 1001)
            replies = await answered(dsn, prefix, first)
            assert await accounts("ivy").deposit(helpers.Deposit("a", 2)) == 2
            reply = runner._registry.generic_reply
        for request_id in first:
            error = reply.decode_exit(replies[request_id]).error
            assert isinstance(error, tc.InvalidIdError), error
            assert "entity id" in str(error)
        # Rows stored while no runner runs: the next one to start (a restart)
        # answers them, and serves on as well.
        second = await insert_poison(dsn, prefix, row, 2001)
        async with serving(storage) as restarted:
            await answered(dsn, prefix, second)
            accounts = restarted.client(helpers.Account)
            assert await accounts("ivy").deposit(helpers.Deposit("b", 3)) == 3
        kept = await sql(
            dsn,
            f"SELECT count(*) FROM {prefix}_messages"
            " WHERE request_id = ANY($1::int8[]) AND processed_at IS NOT NULL",
            [first + second],
        )
        assert kept == [(len(first + second),)]  # kept, for inspection


ODD_RUNNERS = {
    "port out of range": (70000, "{default}", 1.0),
    "weight zero": (7001, "{default}", 0.0),
    "weight NaN": (7002, "{default}", float("nan")),
    "a NULL group": (7003, "{default,NULL}", 1.0),
}


@pytest.mark.parametrize("case", list(ODD_RUNNERS))
async def test_a_live_registration_no_runner_would_write_is_left_out(
    pg_schema: PgSchema, case: str
) -> None:
    # Regression: reading it back raised (a RunnerAddress or an assignment
    # member refused it) out of the assignment poll, and the runner died.
    port, groups, weight = ODD_RUNNERS[case]
    prefix = unique_prefix()
    storage = PostgresStorage(pg_schema.dsn, table_prefix=prefix)
    with trio.fail_after(TIMEOUT):
        async with serving(storage) as runner:
            [(row_id,)] = await sql(
                pg_schema.dsn,
                f"INSERT INTO {prefix}_runners"
                " (host, port, groups, weight, machine_id, token, lease)"
                " VALUES ('10.9.9.9', $1, $2::text[], $3, 1000, 'odd', 1)"
                " RETURNING id",
                [port, groups, weight],
            )
            # Live: its liveness lock is held (by this test's connection).
            holder = await PgConnection.connect(pg_schema.dsn, application_name="odd")
            async with holder:
                await holder.execute(
                    "SELECT pg_advisory_lock($1::int4, $2::int4)",
                    [advisory_namespace(prefix), -row_id],
                    prepare=False,
                )
                await trio.sleep(1.0)  # several assignment polls
                assert len(runner.served_shards()) == helpers.config().shards_per_group
                accounts = runner.client(helpers.Account)
                assert await accounts("ivy").deposit(helpers.Deposit("a", 2)) == 2
