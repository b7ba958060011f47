"""The message statements use indexes at 10^6 messages (real server).

One million message rows are generated server-side (``generate_series``): 95 %
processed, the rest spread over 300 shards (ready, due later, claimed at an
old epoch), half of them with a dedup key. After ``ANALYZE``, the generic
plans of the storage's own statements (what ``force_generic_plan`` makes the
runners use) must reach ``messages`` only through its indexes.
"""

from __future__ import annotations

import json
import uuid
from typing import TYPE_CHECKING, Any

import attrs
import psycopg
import pytest
import trio

from tests.pg_fixture import dsn_with_options, unique_prefix
from trio_cluster import ShardId
from trio_cluster.storage import PostgresStorage
from trio_cluster.storage._postgres._queries import MessageQueries
from trio_cluster.testing import BASE_TIME, persisted_request

if TYPE_CHECKING:
    from collections.abc import Iterator

pytestmark = pytest.mark.postgres

ROWS = 1_000_000
SHARDS = 300


def fill(conn: psycopg.Connection[Any], table: str, replies: str) -> None:
    """Insert the rows as fast as the server can (3-4 s here for 10^6):
    unlogged tables (test data only), explicit ``seq`` values, the secondary
    indexes dropped and re-created afterwards from their exact definitions
    (``pg_get_indexdef``), then ``ANALYZE``."""
    conn.execute(f"ALTER TABLE {replies} SET UNLOGGED")
    conn.execute(f"ALTER TABLE {table} SET UNLOGGED")
    indexes = conn.execute(
        "SELECT indexrelid::regclass::text, pg_get_indexdef(indexrelid)"
        " FROM pg_index WHERE indrelid = %s::regclass AND NOT indisprimary",
        [table],
    ).fetchall()
    for name, _ in indexes:
        conn.execute(f"DROP INDEX {name}")
    conn.execute("SET synchronous_commit = off")
    # r = i % 100: 0, 3, 4 ready; 1 due in the future; 2 claimed at epoch 1;
    # 5..99 processed.
    conn.execute(
        f"""
INSERT INTO {table} (request_id, seq, shard_group, shard_number, entity_type,
    entity_id, tag, payload, primary_key, dedup, deliver_at, stream,
    claimed_epoch, processed_at, saved_at)
OVERRIDING SYSTEM VALUE
SELECT i, i, 'default', 1 + i % {SHARDS}, 'Counter', 'e' || (i % 100000),
       'increment', '\\x00'::bytea,
       CASE WHEN i % 2 = 0 THEN 'k' || i END,
       CASE WHEN i % 2 = 0 THEN decode(md5(i::text), 'hex') END,
       CASE WHEN i % 100 = 1 THEN {BASE_TIME + 3600} END,
       false,
       CASE WHEN i % 100 = 2 THEN 1 END,
       CASE WHEN i % 100 >= 5 THEN {BASE_TIME} - i END,
       {BASE_TIME} - i
FROM generate_series(1, {ROWS}) AS i"""
    )
    # seq given explicitly above (nextval per row is the slowest part).
    conn.execute(f"SELECT setval(pg_get_serial_sequence('{table}', 'seq'), {ROWS})")
    conn.execute("SET maintenance_work_mem = '128MB'")
    for _, definition in indexes:
        conn.execute(definition)
    conn.execute(f"ANALYZE {table}")


def nodes(plan: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield plan
    for child in plan.get("Plans", ()):
        yield from nodes(child)


def generic_plan(
    conn: psycopg.Connection[Any], name: str, query: str, args: str
) -> list[dict[str, Any]]:
    """The generic plan's nodes of ``query`` (no execution)."""
    conn.execute(f"PREPARE {name} AS {query}")
    [(raw,)] = conn.execute(f"EXPLAIN (FORMAT JSON) EXECUTE {name}({args})").fetchall()
    plan = raw if isinstance(raw, list) else json.loads(raw)
    return list(nodes(plan[0]["Plan"]))


def scans_of(plan: list[dict[str, Any]], table: str) -> list[tuple[str, str | None]]:
    """How the plan reads ``table`` (its writes, ModifyTable, left out)."""
    return [
        (node["Node Type"], node.get("Index Name"))
        for node in plan
        if node.get("Relation Name") == table and node["Node Type"] != "ModifyTable"
    ]


@pytest.fixture(scope="module")
def filled(postgres_dsn: str) -> Iterator[tuple[str, str]]:
    """A cluster (dsn, prefix) with ROWS messages, in a schema of its own."""
    schema = f"test_{uuid.uuid4().hex}"
    prefix = unique_prefix()
    with psycopg.connect(postgres_dsn, autocommit=True) as admin:
        admin.execute(f'CREATE SCHEMA "{schema}"')
        try:
            dsn = dsn_with_options(postgres_dsn, f"-csearch_path={schema}")

            async def migrate_only() -> None:
                storage = PostgresStorage(dsn, table_prefix=prefix)
                async with storage.open_session(name="idx", lease_duration=5.0):
                    pass

            trio.run(migrate_only)
            with psycopg.connect(dsn, autocommit=True) as conn:
                fill(conn, f"{prefix}_messages", f"{prefix}_replies")
            yield dsn, prefix
        finally:
            admin.execute(f'DROP SCHEMA "{schema}" CASCADE')


def test_claim_and_dedup_lookup_use_indexes(filled: tuple[str, str]) -> None:
    dsn, prefix = filled
    names = PostgresStorage(dsn, table_prefix=prefix).names
    queries = MessageQueries.build(names)
    messages = names.messages
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("SET plan_cache_mode = force_generic_plan")
        [(count,)] = conn.execute(f"SELECT count(*) FROM {messages}").fetchall()
        assert count == ROWS

        groups = "ARRAY[" + ",".join(["'default'"] * SHARDS) + "]"
        numbers = "ARRAY[" + ",".join(str(n) for n in range(1, SHARDS + 1)) + "]"
        epochs = "ARRAY[" + ",".join(["2"] * SHARDS) + "]::int8[]"
        claim = generic_plan(
            conn,
            "claim",
            queries.claim,
            f"{groups}, {numbers}, {epochs}, {BASE_TIME}, 1024",
        )
        scans = scans_of(claim, messages)
        assert scans, claim
        assert all(kind in ("Index Scan", "Index Only Scan") for kind, _ in scans), (
            scans
        )
        used = {index for _, index in scans}
        index = names.index_names
        assert {index["ready"], index["delayed"], index["claimed"]} <= used

        # Saving: the dedup lookup of each request (and the id lookup).
        args = (
            "ARRAY[1::int8], ARRAY['default'], ARRAY[1], ARRAY['Counter'], ARRAY['e1'],"
            " ARRAY['increment'], ARRAY['\\x00'::bytea], ARRAY['k2'],"
            " ARRAY[decode(md5('2'), 'hex')], ARRAY[NULL::float8], ARRAY[false],"
            f" ARRAY[NULL::int8], ARRAY[0], {BASE_TIME}, 'channel', ARRAY[NULL::text]"
        )
        save = generic_plan(conn, "save", queries.save, args)
        scans = scans_of(save, messages)
        assert scans, save
        assert all(kind in ("Index Scan", "Index Only Scan") for kind, _ in scans), (
            scans
        )
        assert index["dedup"] in {index_name for _, index_name in scans}
        # The single-row forms of the saves (a batch of one).
        save_one = generic_plan(
            conn,
            "save_one",
            queries.save_one or "",
            "1::int8, 'default', 1, 'Counter', 'e1', 'increment', '\\x00'::bytea,"
            " 'k2', decode(md5('2'), 'hex'), NULL::float8, false, NULL::int8, 0,"
            f" {BASE_TIME}, 'channel', NULL::text",
        )
        scans = scans_of(save_one, messages)
        assert scans, save_one
        assert {kind for kind, _ in scans} <= {"Index Scan", "Index Only Scan"}, scans
        assert index["dedup"] in {index_name for _, index_name in scans}
        reply_one = generic_plan(
            conn,
            "save_reply_one",
            queries.save_reply_one or "",
            f"3::int8, 'default', 4, 2::int8, '\\x00'::bytea, NULL::int8, {BASE_TIME},"
            " 'channel', 'boom'",
        )
        scans = scans_of(reply_one, messages)
        assert scans, reply_one
        assert {kind for kind, _ in scans} <= {"Index Scan", "Index Only Scan"}, scans
        # Replies, the batch form (with the dead-letter copy's lookup): its
        # reads of ``messages`` (the test's ``replies`` table is empty and
        # never analyzed, so its plan there proves nothing).
        replies = generic_plan(
            conn,
            "save_replies",
            queries.save_replies,
            "ARRAY[0], ARRAY[3::int8], ARRAY['default'], ARRAY[4], ARRAY[2::int8],"
            f" ARRAY['\\x00'::bytea], ARRAY[NULL::int8], {BASE_TIME}, 'channel',"
            " ARRAY['boom'], true",
        )
        scans = scans_of(replies, messages)
        assert scans, replies
        assert {kind for kind, _ in scans} <= {"Index Scan", "Index Only Scan"}, scans
        # Giving a request back: found by its id (the primary key).
        retry = generic_plan(
            conn,
            "retry_later",
            queries.retries.retry_later,
            "ARRAY[0], ARRAY[3::int8], ARRAY['default'], ARRAY[4], ARRAY[2::int8],"
            f" ARRAY[{BASE_TIME}::float8], ARRAY['boom'], 'channel', ARRAY[true]",
        )
        scans = scans_of(retry, messages)
        assert scans, retry
        assert set(scans) == {("Index Scan", f"{messages}_pkey")}, scans
        assert not any(
            node["Node Type"] == "Seq Scan"
            and node.get("Relation Name") in (messages, names.replies)
            for node in [*claim, *save, *save_one, *reply_one, *retry]
        )


async def test_claim_and_save_stay_fast_at_a_million_rows(
    filled: tuple[str, str],
) -> None:
    dsn, prefix = filled
    storage = PostgresStorage(dsn, table_prefix=prefix)
    with trio.fail_after(30):
        async with storage.open_session(name="idx-fast", lease_duration=5.0) as a:
            shards = [ShardId("default", n) for n in range(1, SHARDS + 1)]
            epochs = await a.runners.acquire(shards)
            assert len(epochs) == SHARDS
            started = trio.current_time()
            batch = await a.messages.claim(epochs, now=BASE_TIME, limit=1024)
            claim_time = trio.current_time() - started
            assert len(batch.requests) == 1024
            assert batch.more
            first = persisted_request(ROWS + 1, shard_id=shards[0], primary_key="once")
            await a.messages.save_requests([first], now=BASE_TIME)
            again = attrs.evolve(first, request_id=ROWS + 2)
            started = trio.current_time()
            [saved] = await a.messages.save_requests([again], now=BASE_TIME)
            save_time = trio.current_time() - started
    assert (saved.duplicate, saved.request_id) == (True, ROWS + 1)
    # Generous bounds (a shared machine): a sequential scan of 10^6 rows
    # takes far longer than this here.
    assert claim_time < 1.0, claim_time
    assert save_time < 0.25, save_time
