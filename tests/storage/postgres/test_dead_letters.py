"""Attempts, retries and dead letters on PostgreSQL: what the conformance
suite cannot show (real server).

Migration 4 on a database that has rows, dead-lettering inside a handler's
transaction, ``retry_later`` racing a final reply, concurrent replays, and
one statement per call.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import attrs
import pytest
import trio

from tests.pg_fixture import LEASE, TIMEOUT, pg_messages, unique_prefix, wait_blocked
from tests.storage.postgres.test_postgres_storage import use_batch_forms_only
from trio_cluster.abc import ReplyOutcome, RetryRecord, StorageSession
from trio_cluster.storage import PostgresStorage, migrate
from trio_cluster.storage._postgres._driver._driver import PgConnection
from trio_cluster.storage._postgres._schema import _STEPS, LATEST_VERSION, PgNames
from trio_cluster.testing import (
    BASE_TIME,
    SHARD,
    acquire_shards,
    final_reply,
    persisted_request,
    replies_of,
    saved_and_claimed,
)

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from tests.pg_fixture import PgSchema

pytestmark = pytest.mark.postgres


def retry(request_id: int, epoch: int, at: float, error: str = "boom") -> RetryRecord:
    return RetryRecord(
        request_id=request_id, shard=SHARD, epoch=epoch, deliver_at=at, error=error
    )


def dead(request_id: int, epoch: int, error: str = "boom") -> Any:
    return attrs.evolve(final_reply(request_id, epoch, b"dead"), dead_letter=error)


@pytest.fixture
def name() -> str:
    """The session's name: unique, as another suite may share the database."""
    return unique_prefix()


@pytest.fixture
async def a(storage: PostgresStorage, name: str) -> AsyncIterator[StorageSession]:
    async with storage.open_session(name=name, lease_duration=LEASE) as session:
        yield session


# ----------------------------------------------------------------------
# Migration 4


async def test_a_database_at_version_3_migrates_to_4_keeping_its_rows(
    pg_schema: PgSchema,
) -> None:
    prefix = unique_prefix()
    names = PgNames.for_prefix(prefix)
    m = names.messages
    assert LATEST_VERSION >= 4  # later migrations apply on top
    with trio.fail_after(TIMEOUT):
        conn = await PgConnection.connect(pg_schema.dsn, application_name="v3")
        async with conn:
            # A database of the release before: migrations 1 to 3 only.
            await conn.execute_script(
                f"CREATE TABLE {names.version} (version integer PRIMARY KEY,"
                " description text NOT NULL,"
                " applied_at timestamptz NOT NULL DEFAULT now())"
            )
            for number, description, build in _STEPS[:3]:
                await conn.execute_script(build(names))
                await conn.execute(
                    f"INSERT INTO {names.version} (version, description)"
                    " VALUES ($1::int4, $2::text)",
                    [number, description],
                )
            # Request 1 ready, 2 claimed at epoch 1 by a previous owner, 3
            # answered; with the columns version 3 knows.
            await conn.execute(
                f"INSERT INTO {names.shards} (shard_group, shard_number, epoch)"
                " VALUES ($1::text, $2::int4, 1)",
                [SHARD.group, SHARD.number],
            )
            for request_id, claimed, processed in ((1, None, None), (2, 1, None)):
                await conn.execute(
                    f"INSERT INTO {m} (request_id, shard_group, shard_number,"
                    " entity_type, entity_id, tag, payload, claimed_epoch,"
                    " processed_at, saved_at, metadata) VALUES ($1::int8, $2::text,"
                    " $3::int4, 'Counter', 'e1', 'increment', '\\x01'::bytea,"
                    ' $4::int8, $5::float8, $6::float8, \'{"k": "v"}\'::jsonb)',
                    [request_id, SHARD.group, SHARD.number, claimed, processed, 1.0],
                )
            await conn.execute(
                f"INSERT INTO {m} (request_id, shard_group, shard_number,"
                " entity_type, entity_id, tag, payload, processed_at)"
                " VALUES (3, $1::text, $2::int4, 'Counter', 'e1', 'increment',"
                " '\\x01'::bytea, 2.0)",
                [SHARD.group, SHARD.number],
            )
            await conn.execute(
                f"INSERT INTO {names.replies} (request_id, sequence, payload)"
                " VALUES (3, NULL, '\\x02'::bytea)"
            )
        manual = PostgresStorage(pg_schema.dsn, table_prefix=prefix, auto_migrate=False)
        assert await migrate(pg_schema.dsn, table_prefix=prefix) == LATEST_VERSION
        async with manual.open_session(name="v4", lease_duration=LEASE) as b:
            epoch = (await acquire_shards(b.runners, SHARD))[SHARD]
            assert epoch == 2
            batch = await b.messages.claim({SHARD: epoch}, now=BASE_TIME, limit=9)
            # Rows of before count no attempts: this claim is their first.
            assert [
                (c.request_id, c.claimed_before, c.attempts, c.last_error)
                for c in batch.requests
            ] == [(1, False, 1, None), (2, True, 1, None)]
            assert dict(batch.requests[0].metadata) == {"k": "v"}
            assert (await replies_of(b.messages, 3)).final == b"\x02"
            assert await b.messages.dead_letters(limit=10) == []
            # The new table works on the migrated database.
            await b.messages.save_replies([dead(1, epoch, "late")], now=BASE_TIME)
            [letter] = await b.messages.dead_letters(limit=10)
            assert (letter.request_id, letter.attempts, letter.error) == (1, 1, "late")
        rows = await _rows(
            pg_schema, f"SELECT request_id, attempts, last_error FROM {m} ORDER BY 1"
        )
        assert rows == [(1, 1, None), (2, 1, None), (3, 0, None)]


async def _rows(pg_schema: PgSchema, query: str) -> list[tuple[Any, ...]]:
    conn = await PgConnection.connect(pg_schema.dsn, application_name="test rows")
    async with conn:
        return (await conn.execute(query, prepare=False)).rows


# ----------------------------------------------------------------------
# Dead letters and transactions


@pytest.mark.parametrize("form", ["single-row", "batch"])
async def test_a_dead_letter_commits_or_rolls_back_with_the_handlers_transaction(
    pg_schema: PgSchema, monkeypatch: pytest.MonkeyPatch, form: str
) -> None:
    if form == "batch":
        use_batch_forms_only(monkeypatch)
    storage = PostgresStorage(pg_schema.dsn, table_prefix=unique_prefix())

    class Abort(Exception):
        pass

    with trio.fail_after(TIMEOUT):
        async with storage.open_session(name="tx-dead", lease_duration=LEASE) as a:
            epoch = await saved_and_claimed(
                a, persisted_request(1), persisted_request(2, entity="e2")
            )

            async def aborted() -> None:
                async with a.messages.open_transaction() as tx:
                    assert await a.messages.save_replies(
                        [dead(1, epoch)], now=BASE_TIME, transaction=tx
                    ) == [ReplyOutcome.RECORDED]
                    raise Abort

            with pytest.raises(Abort):
                await aborted()
            assert await a.messages.dead_letters(limit=10) == []
            assert (await replies_of(a.messages, 1)).final is None
            async with a.messages.open_transaction() as tx:
                await a.messages.save_replies(
                    [dead(2, epoch, "in tx")], now=BASE_TIME, transaction=tx
                )
                # Not visible outside the transaction before it commits.
                assert await a.messages.dead_letters(limit=10) == []
            [letter] = await a.messages.dead_letters(limit=10)
            assert (letter.request_id, letter.error) == (2, "in tx")


# ----------------------------------------------------------------------
# retry_later


async def test_retry_later_meeting_a_final_reply_committed_meanwhile_is_a_duplicate(
    a: StorageSession, name: str, pg_schema: PgSchema
) -> None:
    # The statement's snapshot sees the request unanswered; its update waits
    # for the transaction that answers it, then finds it answered.
    outcomes: list[ReplyOutcome] = []
    with trio.fail_after(TIMEOUT):
        epoch = await saved_and_claimed(a, persisted_request(1))
        watch = await PgConnection.connect(pg_schema.dsn, application_name="watch")
        async with (
            watch,
            trio.open_nursery() as nursery,
            a.messages.open_transaction() as tx,
        ):
            await a.messages.save_replies(
                [final_reply(1, epoch)], now=BASE_TIME, transaction=tx
            )

            async def give_back() -> None:
                outcomes.extend(
                    await a.messages.retry_later(
                        [retry(1, epoch, BASE_TIME)], now=BASE_TIME
                    )
                )

            nursery.start_soon(give_back)
            await wait_blocked(watch, f"trio_cluster {name}")
        assert outcomes == [ReplyOutcome.DUPLICATE]
        batch = await a.messages.claim({SHARD: epoch}, now=BASE_TIME + 99, limit=9)
        assert batch.requests == []
        assert (await replies_of(a.messages, 1)).final == b"done"


async def test_the_last_retry_of_a_request_in_a_batch_wins(a: StorageSession) -> None:
    with trio.fail_after(TIMEOUT):
        epoch = await saved_and_claimed(a, persisted_request(1))
        outcomes = await a.messages.retry_later(
            [
                retry(1, epoch, BASE_TIME + 10, "first"),
                retry(1, epoch + 1, BASE_TIME + 30, "stale"),
                retry(1, epoch, BASE_TIME + 20, "second"),
            ],
            now=BASE_TIME,
        )
        assert outcomes == [
            ReplyOutcome.RECORDED,
            ReplyOutcome.STALE_EPOCH,
            ReplyOutcome.RECORDED,
        ]
        early = await a.messages.claim({SHARD: epoch}, now=BASE_TIME + 15, limit=9)
        assert (early.requests, early.next_deliver_at) == ([], BASE_TIME + 20)
        due = await a.messages.claim({SHARD: epoch}, now=BASE_TIME + 20, limit=9)
        [again] = due.requests
        assert (again.attempts, again.last_error) == (2, "second")
        assert again.deliver_at == BASE_TIME + 20


# ----------------------------------------------------------------------
# Replays


async def test_concurrent_replays_of_one_dead_letter_save_it_once(
    storage: PostgresStorage, a: StorageSession
) -> None:
    results: dict[int, bool] = {}
    with trio.fail_after(TIMEOUT):
        epoch = await saved_and_claimed(a, persisted_request(1))
        await a.messages.save_replies([dead(1, epoch)], now=BASE_TIME)
        async with storage.open_session(name="replayer", lease_duration=LEASE) as b:

            async def replay(session: StorageSession, new_id: int) -> None:
                results[new_id] = await session.messages.replay_dead_letter(
                    1, new_request_id=new_id, now=BASE_TIME
                )

            async with trio.open_nursery() as nursery:
                nursery.start_soon(replay, a, 10)
                nursery.start_soon(replay, b, 11)
        assert sorted(results.values()) == [False, True]
        [winner] = [new_id for new_id, saved in results.items() if saved]
        [letter] = await a.messages.dead_letters(limit=10)
        assert letter.replayed_as == winner
        known = [(await replies_of(a.messages, new_id)).known for new_id in (10, 11)]
        assert known == [winner == 10, winner == 11]


# ----------------------------------------------------------------------
# Round trips


async def test_one_statement_per_call(a: StorageSession) -> None:
    with trio.fail_after(TIMEOUT):
        pool = pg_messages(a)
        ids = list(range(1, 51))
        epoch = await saved_and_claimed(
            a, *(persisted_request(i, entity=f"e{i}") for i in ids)
        )

        async def statements(call: Any) -> Any:
            before = pool.statistics()
            result = await call
            after = pool.statistics()
            assert after.statements - before.statements == 1
            assert after.round_trips - before.round_trips == 1
            return result

        retries = [retry(i, epoch, BASE_TIME) for i in ids[:25]]
        outcomes = await statements(a.messages.retry_later(retries, now=BASE_TIME))
        assert outcomes == [ReplyOutcome.RECORDED] * 25
        replies = [dead(i, epoch) for i in ids[25:]]
        await statements(a.messages.save_replies(replies, now=BASE_TIME))
        letters = await statements(a.messages.dead_letters(limit=100))
        assert [x.request_id for x in letters] == ids[25:]
        assert await statements(
            a.messages.replay_dead_letter(26, new_request_id=100, now=BASE_TIME)
        )
        assert await statements(a.messages.purge_dead_letters(ids)) == 25


async def test_empty_calls_do_not_touch_the_database(a: StorageSession) -> None:
    pool = pg_messages(a)
    before = pool.statistics().statements
    assert await a.messages.retry_later([], now=BASE_TIME) == []
    assert await a.messages.dead_letters(limit=0) == []
    assert await a.messages.dead_letters(after_id=2**63 - 1, limit=5) == []
    assert await a.messages.purge_dead_letters([]) == 0
    assert pool.statistics().statements == before
