"""Tests of `PostgresStorage` on a real server: conformance plus backend specifics.

Real server, real time (see ``tests/pg_fixture.py``). Every test uses its own
schema (``pg_schema``) and a unique table prefix: the prefix also names the
NOTIFY channel and the advisory-lock namespace, which are database-wide.
"""

from __future__ import annotations

import re
from functools import partial
from typing import TYPE_CHECKING, Any

import attrs
import pytest
import trio
import trio.testing

import trio_cluster
from tests.pg_fixture import (
    LEASE,
    TIMEOUT,
    pg_messages,
    pg_runners,
    unique_prefix,
    wait_blocked,
)
from trio_cluster import ConfigError, PersistenceError
from trio_cluster.abc import (
    MessagesAvailable,
    RepliesAvailable,
    ReplyOutcome,
    ReplyQuery,
    RunnersChanged,
    SaveResult,
    StorageSession,
    StorageTransaction,
)
from trio_cluster.storage import PostgresStorage, migrate
from trio_cluster.storage._postgres._driver._driver import PgConnection
from trio_cluster.storage._postgres._message_parts import PgTransaction
from trio_cluster.storage._postgres._queries import MessageQueries
from trio_cluster.storage._postgres._schema import LATEST_VERSION, PgNames
from trio_cluster.testing import (
    BASE_TIME,
    SHARD,
    StorageConformance,
    acquire_shards,
    conformance_shard,
    final_reply,
    persisted_request,
    replies_of,
    runner_info,
    saved_and_claimed,
)

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from tests.pg_fixture import PgAdmin, PgSchema

pytestmark = pytest.mark.postgres


class TestPostgresConformance(StorageConformance):
    """The conformance suite on the ``storage`` fixture of ``conftest.py``."""

    @pytest.fixture
    def lease_duration(self) -> float:
        return LEASE


class TestPostgresConformanceBatchForms(TestPostgresConformance):
    """The conformance suite again, with every save written by the batch
    statements: a batch of one otherwise uses the single-row forms, so this
    is the suite's run of the batch statements on single items."""

    omits_unneeded_reply_notifications = False  # only the plain form does

    @pytest.fixture
    def storage(
        self, pg_schema: PgSchema, monkeypatch: pytest.MonkeyPatch
    ) -> PostgresStorage:
        use_batch_forms_only(monkeypatch)
        return PostgresStorage(pg_schema.dsn, table_prefix=unique_prefix())


class TestPostgresConformanceGeneralSingleRowForms(TestPostgresConformance):
    """The conformance suite again, without the plain forms of a claimed
    save and of a final reply (`._one_row.save_claimed`,
    `._one_row.save_final_reply`): every single-row save is written by the
    general single-row statements, as the plain forms' fallback is."""

    omits_unneeded_reply_notifications = False  # only the plain form does

    @pytest.fixture
    def storage(
        self, pg_schema: PgSchema, monkeypatch: pytest.MonkeyPatch
    ) -> PostgresStorage:
        build = MessageQueries.build

        def general_forms(names: PgNames) -> MessageQueries:
            return attrs.evolve(build(names), save_claimed=None, save_final_reply=None)

        monkeypatch.setattr(MessageQueries, "build", general_forms)
        return PostgresStorage(pg_schema.dsn, table_prefix=unique_prefix())


def use_batch_forms_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """Storages built from now on write every save with the batch statements."""
    build = MessageQueries.build

    def batch_forms_only(names: PgNames) -> MessageQueries:
        return attrs.evolve(
            build(names),
            save_one=None,
            save_reply_one=None,
            save_claimed=None,
            save_final_reply=None,
        )

    monkeypatch.setattr(MessageQueries, "build", batch_forms_only)


@pytest.mark.parametrize("form", ["single-row", "batch"])
async def test_a_save_blocked_by_an_uncommitted_save_reports_it_as_the_original(
    pg_schema: PgSchema, monkeypatch: pytest.MonkeyPatch, form: str
) -> None:
    # Another session's uncommitted row with the same id blocks our insert;
    # once it commits, our statement's snapshot still cannot see it, so the
    # save is written again and then finds it.
    if form == "batch":
        use_batch_forms_only(monkeypatch)
    storage = PostgresStorage(pg_schema.dsn, table_prefix=unique_prefix())
    saved: list[SaveResult] = []
    with trio.fail_after(TIMEOUT):
        async with storage.open_session(name="race", lease_duration=LEASE) as a:
            other = await PgConnection.connect(pg_schema.dsn, application_name="other")
            watch = await PgConnection.connect(pg_schema.dsn, application_name="watch")
            async with other, watch, trio.open_nursery() as nursery:
                await other.execute("BEGIN", prepare=False)
                await other.execute(
                    f"INSERT INTO {storage.names.messages} (request_id, shard_group,"
                    " shard_number, entity_type, entity_id, tag, payload)"
                    f" VALUES (7, '{SHARD.group}', {SHARD.number}, 'Counter', 'e1',"
                    " 'increment', '\\x00'::bytea)",
                    prepare=False,
                )

                async def save() -> None:
                    request = persisted_request(7)
                    saved.extend(
                        await a.messages.save_requests([request], now=BASE_TIME)
                    )

                nursery.start_soon(save)
                await wait_blocked(watch, "trio_cluster race")
                await other.execute("COMMIT", prepare=False)
    [result] = saved
    assert (result.request_id, result.duplicate, result.claimed) == (7, True, False)


async def test_a_save_that_keeps_meeting_invisible_conflicts_raises_persistence_error(
    storage: PostgresStorage, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Every attempt's statement reports the request blocked by a row its
    # snapshot cannot see (a concurrent save that keeps racing it).
    async with storage.open_session(name="racing", lease_duration=LEASE) as session:
        messages = pg_messages(session)
        attempts: list[int] = []

        async def always_blocked(
            requests: list[Any], ords: list[int], *args: object
        ) -> list[tuple[Any, ...]]:
            await trio.lowlevel.checkpoint()
            attempts.append(len(requests))
            return [(1, ords[0], None, None, None), (2, 0, None, None, None)]

        monkeypatch.setattr(messages, "_save_rows", always_blocked)
        with pytest.raises(PersistenceError, match="concurrent saves 5 times"):
            await session.messages.save_requests([persisted_request(1)], now=BASE_TIME)
    assert attempts == [1] * 5


@pytest.fixture
async def a(storage: PostgresStorage) -> AsyncIterator[StorageSession]:
    async with storage.open_session(name="pg-a", lease_duration=LEASE) as session:
        yield session


async def table_count(schema: PgSchema, table: str) -> int:
    conn = await PgConnection.connect(schema.dsn, application_name="test count")
    async with conn:
        result = await conn.execute(f"SELECT count(*) FROM {table}", prepare=False)
        return int(result.rows[0][0])


# ----------------------------------------------------------------------
# Configuration


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"table_prefix": "Bad"}, "lower-case SQL identifier"),
        ({"table_prefix": "1abc"}, "lower-case SQL identifier"),
        ({"table_prefix": "a; drop"}, "lower-case SQL identifier"),
        ({"table_prefix": "x" * 41}, "at most 40"),
        ({"pool_size": 0}, "pool_size must be an integer >= 1"),
        ({"pool_size": 2.0}, "pool_size must be an int"),
        ({"transaction_pool_size": 0}, "transaction_pool_size must be an integer >= 1"),
        ({"lock_operation_timeout": 0}, "positive"),
        ({"transaction_idle_timeout": "1s"}, "number of seconds"),
    ],
)
def test_bad_options_raise_config_error(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        PostgresStorage("host=127.0.0.1 dbname=test", **kwargs)


def test_bad_dsn_raises_config_error() -> None:
    with pytest.raises(ConfigError, match="DSN"):
        PostgresStorage("host=127.0.0.1 nonsense_option=1")


def test_public_names() -> None:
    assert trio_cluster.storage.PostgresStorage is PostgresStorage
    assert not hasattr(trio_cluster.storage, "postgres")  # one constructor
    assert trio_cluster.storage.migrate is migrate
    assert PgNames.for_prefix("abc").namespace == PgNames.for_prefix("abc").namespace
    assert PgNames.for_prefix("abc").namespace != PgNames.for_prefix("abd").namespace


async def test_open_session_checks_arguments(storage: PostgresStorage) -> None:
    with pytest.raises(TypeError, match="session name"):
        storage.open_session(name=1, lease_duration=1.0)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="lease_duration"):
        storage.open_session(name="x", lease_duration="1")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="positive, finite"):
        storage.open_session(name="x", lease_duration=0)


async def test_unreachable_database_fails_to_open() -> None:
    storage = PostgresStorage("host=127.0.0.1 port=1 dbname=test connect_timeout=2")
    with trio.fail_after(TIMEOUT), pytest.raises(PersistenceError):
        async with storage.open_session(name="x", lease_duration=LEASE):
            pytest.fail("opened a session on a closed port")


# ----------------------------------------------------------------------
# Migrations


async def test_migrate_creates_the_schema_and_is_idempotent(
    pg_schema: PgSchema,
) -> None:
    prefix = unique_prefix()
    with trio.fail_after(TIMEOUT):
        assert await migrate(pg_schema.dsn, table_prefix=prefix) == LATEST_VERSION
        assert await migrate(pg_schema.dsn, table_prefix=prefix) == LATEST_VERSION
        steps = await table_count(pg_schema, f"{prefix}_schema_version")
        assert steps == LATEST_VERSION
        for table in ("runners", "shards", "messages", "replies", "dead_letters"):
            assert await table_count(pg_schema, f"{prefix}_{table}") == 0


async def test_migrate_upgrades_an_older_schema_keeping_its_data(
    pg_schema: PgSchema, pg_admin: PgAdmin
) -> None:
    prefix = unique_prefix()
    storage = PostgresStorage(pg_schema.dsn, table_prefix=prefix)
    with trio.fail_after(TIMEOUT):
        async with storage.open_session(name="v1", lease_duration=LEASE) as a:
            await a.messages.save_requests([persisted_request(1)], now=BASE_TIME)
        # Back to version 1, as a database of the first release would be.
        messages_table = pg_schema.qualified(storage.names.messages)
        pg_admin.execute(f"ALTER TABLE {messages_table} DROP COLUMN saved_at")
        pg_admin.execute(f"ALTER TABLE {messages_table} DROP COLUMN metadata")
        pg_admin.execute(f"ALTER TABLE {messages_table} DROP COLUMN attempts")
        pg_admin.execute(f"ALTER TABLE {messages_table} DROP COLUMN last_error")
        pg_admin.execute(
            f"DROP TABLE {pg_schema.qualified(storage.names.dead_letters)}"
        )
        for table in (
            "entity_state",
            "events",
            "event_heads",
            "event_cursors",
            "webhook_endpoints",
            "webhook_attempts",
        ):
            name = getattr(storage.names, table)
            pg_admin.execute(f"DROP TABLE {pg_schema.qualified(name)}")
        sequence = pg_schema.qualified(storage.names.machine_ids)
        pg_admin.execute(f"DROP SEQUENCE {sequence}")
        version_table = pg_schema.qualified(storage.names.version)
        pg_admin.execute(f"DELETE FROM {version_table} WHERE version > 1")
        manual = PostgresStorage(pg_schema.dsn, table_prefix=prefix, auto_migrate=False)
        with pytest.raises(PersistenceError, match="at version 1"):
            async with manual.open_session(name="old", lease_duration=LEASE):
                pytest.fail("opened a session on an outdated schema")
        assert await migrate(pg_schema.dsn, table_prefix=prefix) == LATEST_VERSION
        async with manual.open_session(name="new", lease_duration=LEASE) as b:
            epoch = (await acquire_shards(b.runners, SHARD))[SHARD]
            batch = await b.messages.claim({SHARD: epoch}, now=BASE_TIME, limit=10)
            assert [c.request_id for c in batch.requests] == [1]
            assert batch.requests[0].metadata == {}
        rows = pg_admin.execute(f"SELECT saved_at, metadata FROM {messages_table}")
        assert rows == [(None, None)]


async def test_concurrent_migrations_apply_each_step_once(
    pg_schema: PgSchema,
) -> None:
    prefix = unique_prefix()
    versions: list[int] = []

    async def one() -> None:
        versions.append(await migrate(pg_schema.dsn, table_prefix=prefix))

    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            for _ in range(6):
                nursery.start_soon(one)
    assert versions == [LATEST_VERSION] * 6
    assert await table_count(pg_schema, f"{prefix}_schema_version") == LATEST_VERSION


async def test_migrate_rejects_a_bad_prefix(pg_schema: PgSchema) -> None:
    with pytest.raises(ConfigError):
        await migrate(pg_schema.dsn, table_prefix="no-dashes")


async def test_sessions_starting_together_migrate_once(pg_schema: PgSchema) -> None:
    storage = PostgresStorage(pg_schema.dsn, table_prefix=unique_prefix(), pool_size=1)
    opened: list[int] = []
    all_registered = trio.Event()

    async def open_one(number: int) -> None:
        async with storage.open_session(
            name=f"starter-{number}", lease_duration=LEASE
        ) as session:
            opened.append(await session.runners.register(runner_info(7000 + number)))
            if len(opened) == 5:
                all_registered.set()
            # Stay registered until everyone is, so machine ids must differ.
            await all_registered.wait()

    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            for number in range(5):
                nursery.start_soon(open_one, number)
    assert sorted(opened) == [0, 1, 2, 3, 4]
    steps = await table_count(pg_schema, f"{storage.names.version}")
    assert steps == LATEST_VERSION


async def test_newer_schema_is_refused(pg_schema: PgSchema, pg_admin: PgAdmin) -> None:
    prefix = unique_prefix()
    with trio.fail_after(TIMEOUT):
        await migrate(pg_schema.dsn, table_prefix=prefix)
        pg_admin.execute(
            f"INSERT INTO {pg_schema.qualified(prefix + '_schema_version')}"
            " (version, description) VALUES (%s, 'from the future')",
            [LATEST_VERSION + 1],
        )
        with pytest.raises(PersistenceError, match="upgrade trio_cluster"):
            await migrate(pg_schema.dsn, table_prefix=prefix)
        storage = PostgresStorage(pg_schema.dsn, table_prefix=prefix)
        with pytest.raises(PersistenceError, match="newer than"):
            async with storage.open_session(name="old", lease_duration=LEASE):
                pytest.fail("opened a session on a newer schema")


async def test_auto_migrate_off_needs_a_migrated_schema(pg_schema: PgSchema) -> None:
    prefix = unique_prefix()
    storage = PostgresStorage(pg_schema.dsn, table_prefix=prefix, auto_migrate=False)
    with trio.fail_after(TIMEOUT):
        with pytest.raises(PersistenceError, match="trio-cluster migrate"):
            async with storage.open_session(name="x", lease_duration=LEASE):
                pytest.fail("opened a session on an empty database")
        await migrate(pg_schema.dsn, table_prefix=prefix)
        async with storage.open_session(name="x", lease_duration=LEASE) as session:
            assert await session.runners.live_runners() == []


async def test_each_connection_names_itself(
    storage: PostgresStorage, pg_admin: PgAdmin
) -> None:
    # A session name of its own: another test run on the same database (a
    # second suite at the same time) has sessions named like the fixtures'.
    name = unique_prefix()
    with trio.fail_after(TIMEOUT):
        async with storage.open_session(name=name, lease_duration=LEASE) as a:
            await a.runners.refresh([])
            async with a.messages.open_transaction() as tx:
                await tx.execute("SELECT 1")
                rows = pg_admin.execute(
                    "SELECT application_name, count(*) FROM pg_stat_activity"
                    " WHERE application_name LIKE %s GROUP BY 1",
                    [f"trio_cluster%{name}"],
                )
    assert dict(rows) == {
        f"trio_cluster {name}": 4,  # the message pool
        f"trio_cluster tx {name}": 1,  # opened for the transaction
        f"trio_cluster lock {name}": 1,
        f"trio_cluster listen {name}": 1,
    }


# ----------------------------------------------------------------------
# Several clusters in one database


async def test_prefixes_isolate_clusters(pg_schema: PgSchema) -> None:
    first = PostgresStorage(pg_schema.dsn, table_prefix=unique_prefix())
    second = PostgresStorage(pg_schema.dsn, table_prefix=unique_prefix())
    with trio.fail_after(TIMEOUT):
        async with (
            first.open_session(name="one", lease_duration=LEASE) as one,
            second.open_session(name="two", lease_duration=LEASE) as two,
        ):
            # Same shard numbers, same request ids: no collision anywhere.
            assert await acquire_shards(one.runners, SHARD) == {SHARD: 1}
            assert await acquire_shards(two.runners, SHARD) == {SHARD: 1}
            await one.runners.register(runner_info(7001))
            await two.runners.register(runner_info(7001))
            assert [r.machine_id for r in await two.runners.live_runners()] == [0]
            assert await one.messages.save_requests(
                [persisted_request(1)], now=BASE_TIME
            ) == [SaveResult(1, duplicate=False)]
            assert await two.messages.save_requests(
                [persisted_request(1, payload=b"other")], now=BASE_TIME
            ) == [SaveResult(1, duplicate=False)]
            batch = await two.messages.claim({SHARD: 1}, now=BASE_TIME, limit=10)
            assert [c.payload for c in batch.requests] == [b"other"]

            # The first cluster's notifications never reach the second (each
            # hears its own registration and its own save).
            async def notes(messages: Any) -> list[object]:
                seen: list[object] = []
                while MessagesAvailable(frozenset({SHARD})) not in seen:
                    seen += await messages.wait_notifications()
                return seen

            expected = {RunnersChanged(), MessagesAvailable(frozenset({SHARD}))}
            assert set(await notes(one.messages)) == expected
            assert set(await notes(two.messages)) == expected
            with trio.move_on_after(0.3) as scope:
                await two.messages.wait_notifications()
            assert scope.cancelled_caught


# ----------------------------------------------------------------------
# Round trips: one statement per call, whatever the batch size


async def test_one_statement_per_batch(a: StorageSession) -> None:
    with trio.fail_after(TIMEOUT):
        pool = pg_messages(a)
        epoch = (await acquire_shards(a.runners, SHARD))[SHARD]

        async def statements(call: Any) -> int:
            before = pool.statistics()
            await call
            after = pool.statistics()
            assert after.round_trips - before.round_trips == 1
            return after.statements - before.statements

        hundred = [persisted_request(i, primary_key=f"k{i}") for i in range(1, 101)]
        assert await statements(a.messages.save_requests(hundred, now=BASE_TIME)) == 1
        assert await statements(a.messages.save_requests(hundred, now=BASE_TIME)) == 1
        claim = a.messages.claim({SHARD: epoch}, now=BASE_TIME, limit=1024)
        assert await statements(claim) == 1
        finals = [final_reply(i, epoch) for i in range(1, 101)]
        assert await statements(a.messages.save_replies(finals, now=BASE_TIME)) == 1
        queries = [ReplyQuery(i) for i in range(1, 101)]
        assert await statements(a.messages.replies_for(queries)) == 1
        delete = a.messages.delete_processed(older_than=BASE_TIME + 1, limit=1000)
        assert await statements(delete) == 1

        lock = pg_runners(a)
        shards = [conformance_shard(n) for n in range(10, 310)]
        before = lock.statistics()
        assert len(await a.runners.acquire(shards)) == 300  # creates the rows too
        await a.runners.release(shards)
        assert len(await a.runners.acquire(shards)) == 300
        after = lock.statistics()
        assert after.round_trips - before.round_trips == 3
        assert after.statements - before.statements == 4

        # A lease refresh lists the live runners in its one statement.
        await a.runners.register(runner_info(7001))
        before = lock.statistics()
        held, live = await a.runners.refresh_and_list(shards)
        after = lock.statistics()
        assert (len(held), [runner.address.port for runner in live]) == (300, [7001])
        assert after.statements - before.statements == 1


async def test_a_claimed_save_and_its_final_reply_take_one_statement_each(
    a: StorageSession,
) -> None:
    # The plain forms write the common case alone; anything else they leave
    # to the general single-row statements, which then decide as before.
    pool = pg_messages(a)
    epoch = (await acquire_shards(a.runners, SHARD))[SHARD]
    request = persisted_request(1, claim_epoch=epoch)
    before = pool.statistics().statements
    (saved,) = await a.messages.save_requests([request], now=BASE_TIME)
    assert saved == SaveResult(1, duplicate=False, claimed=True)
    assert pool.statistics().statements == before + 1
    outcome = await a.messages.save_replies([final_reply(1, epoch)], now=BASE_TIME)
    assert outcome == [ReplyOutcome.RECORDED]
    assert pool.statistics().statements == before + 2
    # Saved again: the plain form inserts nothing, the general one answers.
    (again,) = await a.messages.save_requests([request], now=BASE_TIME)
    assert again == SaveResult(1, duplicate=True, claimed=False, final_reply=b"done")
    assert pool.statistics().statements == before + 4
    # Answered again: refused as a duplicate, by the general statement.
    outcome = await a.messages.save_replies([final_reply(1, epoch)], now=BASE_TIME)
    assert outcome == [ReplyOutcome.DUPLICATE]
    # A stale epoch: the request is saved unclaimed, its reply refused.
    stale = persisted_request(2, claim_epoch=epoch + 1)
    (saved,) = await a.messages.save_requests([stale], now=BASE_TIME)
    assert saved == SaveResult(2, duplicate=False, claimed=False)
    outcome = await a.messages.save_replies([final_reply(2, epoch + 1)], now=BASE_TIME)
    assert outcome == [ReplyOutcome.STALE_EPOCH]
    # A dead letter goes through the general statement (it copies the request).
    (saved,) = await a.messages.save_requests(
        [persisted_request(3, claim_epoch=epoch)], now=BASE_TIME
    )
    assert saved.claimed
    dead = attrs.evolve(final_reply(3, epoch), dead_letter="boom")
    assert await a.messages.save_replies([dead], now=BASE_TIME) == [
        ReplyOutcome.RECORDED
    ]
    dead_letters = await a.messages.dead_letters(limit=10)
    assert [letter.request_id for letter in dead_letters] == [3]


async def test_concurrent_releases_share_a_statement(
    a: StorageSession, storage: PostgresStorage
) -> None:
    with trio.fail_after(TIMEOUT):
        shards = [conformance_shard(n) for n in range(1, 301)]
        assert len(await a.runners.acquire(shards)) == 300
        lock = pg_runners(a)
        before = lock.statistics()
        async with trio.open_nursery() as nursery:
            for one in shards:  # as a runner stopping its shards one by one
                nursery.start_soon(a.runners.release, [one])
        after = lock.statistics()
        assert after.statements - before.statements <= 3
        async with storage.open_session(name="pg-b", lease_duration=LEASE) as b:
            assert len(await b.runners.acquire(shards)) == 300  # all free


async def test_releases_are_not_moved_across_other_lock_operations(
    a: StorageSession, storage: PostgresStorage
) -> None:
    # Queued in this order: release X, acquire Y (held: answered with its
    # epoch), release Y. The second release must not join the first one's
    # statement: Y would be unlocked before the acquire, which would lock it
    # again at a new epoch, and it would stay locked after "release Y".
    x, y = conformance_shard(1), conformance_shard(2)
    with trio.fail_after(TIMEOUT):
        epochs = await acquire_shards(a.runners, x, y)
        acquired: list[dict[Any, int]] = []

        async def acquire_y() -> None:
            acquired.append(await a.runners.acquire([y]))

        locks = pg_runners(a).locks
        # Test hook: the connection is busy while the three calls queue up.
        async with trio.open_nursery() as nursery, locks._mutex:
            for task in (
                partial(a.runners.release, [x]),
                acquire_y,
                partial(a.runners.release, [y]),
            ):
                nursery.start_soon(task)
                await trio.testing.wait_all_tasks_blocked()
        assert acquired == [{y: epochs[y]}]
        async with storage.open_session(name="pg-b", lease_duration=LEASE) as b:
            assert await b.runners.acquire([x, y]) == {
                x: epochs[x] + 1,
                y: epochs[y] + 1,
            }


async def test_runner_shutdown_releases_its_shards_in_a_few_statements(
    pg_schema: PgSchema,
) -> None:
    storage = PostgresStorage(pg_schema.dsn, table_prefix=unique_prefix())
    config = trio_cluster.ShardingConfig(shards_per_group=300)
    with trio.fail_after(TIMEOUT):
        async with trio_cluster.open_runner(
            entities=[], storage=storage, config=config
        ) as runner:
            await runner.wait_shards_acquired()
            assert runner.statistics().shards == 300
            before = storage.statistics()
    after = storage.statistics()
    # The leaving registration (a read, then one pipeline of 5 statements,
    # its announcement included), the read that announcement causes, release
    # (the shards stop one by one), release all, unregister, close.
    assert after.lock_statements - before.lock_statements <= 12


# ----------------------------------------------------------------------
# Registry details


async def test_machine_ids_are_handed_out_in_turn(
    storage: PostgresStorage, a: StorageSession
) -> None:
    # The id a session just freed is not the next one handed out (a runner
    # taking over on a host whose clock is behind would mint its
    # predecessor's last request ids): each registration looks from the
    # next value of the sequence on.
    with trio.fail_after(TIMEOUT):
        async with storage.open_session(name="pg-b", lease_duration=LEASE) as b:
            assert await b.runners.register(runner_info(7002)) == 0
        assert await a.runners.register(runner_info(7001)) == 1
        assert [r.address.port for r in await a.runners.live_runners()] == [7001]
        assert await a.runners.register(runner_info(7001, weight=2.0)) == 1  # kept
        await a.runners.unregister()
        assert await a.runners.register(runner_info(7001)) == 2


async def test_newest_registration_of_an_address_wins(
    storage: PostgresStorage, a: StorageSession
) -> None:
    # The displaced session is still open (its process may still mint
    # Snowflake ids), so its machine id stays reserved until it ends.
    with trio.fail_after(TIMEOUT):
        first = await a.runners.register(runner_info(7001))
        epoch = (await acquire_shards(a.runners, SHARD))[SHARD]
        async with storage.open_session(name="pg-b", lease_duration=LEASE) as b:
            second = await b.runners.register(runner_info(7001))
            assert second != first
            [live] = await a.runners.live_runners()
            assert (live.address.port, live.machine_id) == (7001, second)
            # a still holds the lock, but is no longer a registered runner.
            assert await a.runners.refresh([SHARD]) == {SHARD}
            owners = await b.runners.shard_owners()
            assert [(o.shard, o.runner, o.epoch) for o in owners] == [
                (SHARD, None, epoch)
            ]
            async with storage.open_session(name="pg-c", lease_duration=LEASE) as c:
                third = await c.runners.register(runner_info(7003))
                assert third not in (first, second)
            await a.runners.unregister()  # frees the displaced row
            assert [r.machine_id for r in await b.runners.live_runners()] == [second]
            async with storage.open_session(name="pg-d", lease_duration=LEASE) as d:
                # A free id, in turn: not the one just freed.
                fourth = await d.runners.register(runner_info(7004))
                assert fourth not in (first, second, third)


async def test_address_of_an_ended_session_is_taken_over(
    storage: PostgresStorage, a: StorageSession, pg_admin: PgAdmin
) -> None:
    # A registration whose session is gone is simply replaced.
    with trio.fail_after(TIMEOUT):
        async with storage.open_session(name="pg-b", lease_duration=LEASE) as b:
            first = await b.runners.register(runner_info(7001))
            pid = pg_runners(b).locks.backend_pid
            assert pid is not None
            assert pg_admin.terminate(pid=pid) == 1
            taken = await a.runners.register(runner_info(7001))
            assert taken != first  # in turn (the dead row's id is free)
            assert [r.machine_id for r in await a.runners.live_runners()] == [taken]


async def test_shard_owner_without_registration(a: StorageSession) -> None:
    with trio.fail_after(TIMEOUT):
        epoch = (await acquire_shards(a.runners, SHARD))[SHARD]
        owners = await a.runners.shard_owners()
        assert [(o.shard, o.runner, o.epoch) for o in owners] == [(SHARD, None, epoch)]


# ----------------------------------------------------------------------
# Notifications


async def test_large_notifications_are_split(a: StorageSession) -> None:
    group = "a-rather-long-shard-group-name-" + "x" * 40
    shards = [conformance_shard(n) for n in range(1, 4)] + [
        type(SHARD)(group, n) for n in range(1, 301)
    ]
    with trio.fail_after(TIMEOUT):
        batch = [persisted_request(i, shard_id=s) for i, s in enumerate(shards, 1)]
        await a.messages.save_requests(batch, now=BASE_TIME)
        seen: set[Any] = set()
        while seen != set(shards):
            for note in await a.messages.wait_notifications():
                assert isinstance(note, MessagesAvailable)
                seen |= note.shards
        epochs = await acquire_shards(a.runners, *shards)
        finals = [
            final_reply(i, epochs[s], shard_id=s) for i, s in enumerate(shards, 1)
        ]
        await a.messages.save_replies(finals, now=BASE_TIME)
        ids: set[int] = set()
        while ids != set(range(1, len(shards) + 1)):
            for note in await a.messages.wait_notifications():
                assert isinstance(note, RepliesAvailable)
                ids |= note.request_ids
        # Over 8000 bytes of ids and shards: several NOTIFYs were needed.
        assert pg_messages(a)._listener.reconnects == 0


async def test_a_batch_of_replies_nobody_else_waits_for_is_not_notified(
    a: StorageSession,
) -> None:
    # ``ReplyRecord.notify`` False on every reply of a batch: no
    # RepliesAvailable. Notifications arrive in commit order, so the request
    # saved afterwards comes first only if the replies sent none.
    with trio.fail_after(TIMEOUT):
        epoch = (await acquire_shards(a.runners, SHARD))[SHARD]
        await a.messages.save_requests(
            [persisted_request(i) for i in (1, 2, 3)], now=BASE_TIME
        )
        assert await a.messages.wait_notifications() == [
            MessagesAvailable(frozenset({SHARD}))
        ]
        quiet = [attrs.evolve(final_reply(i, epoch), notify=False) for i in (1, 2)]
        assert (
            await a.messages.save_replies(quiet, now=BASE_TIME)
            == [ReplyOutcome.RECORDED] * 2
        )
        await a.messages.save_requests([persisted_request(4)], now=BASE_TIME)
        assert await a.messages.wait_notifications() == [
            MessagesAvailable(frozenset({SHARD}))
        ]
        # One reply of a batch to notify: the batch is notified.
        loud = [attrs.evolve(final_reply(3, epoch), notify=True)]
        loud.append(attrs.evolve(final_reply(4, epoch), notify=False))
        await a.messages.save_replies(loud, now=BASE_TIME)
        ids: set[int] = set()
        while ids != {3, 4}:
            for note in await a.messages.wait_notifications():
                assert isinstance(note, RepliesAvailable)
                ids |= note.request_ids


async def test_foreign_payloads_on_the_channel_are_ignored(
    storage: PostgresStorage, a: StorageSession, pg_admin: PgAdmin
) -> None:
    with trio.fail_after(TIMEOUT):
        channel = storage.names.channel
        pg_admin.execute("SELECT pg_notify(%s, 'not json')", [channel])
        pg_admin.execute("SELECT pg_notify(%s, '{\"z\": 1}')", [channel])
        await a.messages.save_requests([persisted_request(1)], now=BASE_TIME)
        assert await a.messages.wait_notifications() == [
            MessagesAvailable(frozenset({SHARD}))
        ]


# ----------------------------------------------------------------------
# Transactions: the handler's own SQL commits with the reply, or neither


async def test_transaction_commits_handler_writes_with_the_reply(
    a: StorageSession, pg_schema: PgSchema
) -> None:
    with trio.fail_after(TIMEOUT):
        epoch = await saved_and_claimed(
            a, persisted_request(1), persisted_request(2), claim=False
        )
        async with a.messages.open_transaction() as tx:
            await tx.execute("CREATE TABLE ledger (id int PRIMARY KEY, note text)")
        async with a.messages.open_transaction() as tx:
            assert await tx.execute(
                "INSERT INTO ledger VALUES ($1, $2) RETURNING id", [1, "one"]
            ) == [(1,)]
            assert await a.messages.save_replies(
                [final_reply(1, epoch, b"ok")], now=BASE_TIME, transaction=tx
            ) == [ReplyOutcome.RECORDED]
            # Not visible outside the transaction before it commits.
            assert (await replies_of(a.messages, 1)).final is None
        assert (await replies_of(a.messages, 1)).final == b"ok"
        assert await table_count(pg_schema, "ledger") == 1
        with pytest.raises(trio.ClosedResourceError):
            await tx.execute("SELECT 1")

        class Abort(Exception):
            pass

        async def aborted() -> None:
            async with a.messages.open_transaction() as tx:
                await tx.execute("INSERT INTO ledger VALUES (2, 'two')")
                await a.messages.save_replies(
                    [final_reply(2, epoch)], now=BASE_TIME, transaction=tx
                )
                raise Abort

        with pytest.raises(Abort):
            await aborted()
        assert (await replies_of(a.messages, 2)).final is None
        assert await table_count(pg_schema, "ledger") == 1


async def test_failed_statement_makes_the_commit_fail(
    a: StorageSession, pg_schema: PgSchema
) -> None:
    with trio.fail_after(TIMEOUT):
        epoch = await saved_and_claimed(a, persisted_request(1), claim=False)
        async with a.messages.open_transaction() as tx:
            await tx.execute("CREATE TABLE ledger (id int PRIMARY KEY)")

        async def failing() -> None:
            async with a.messages.open_transaction() as tx:
                await a.messages.save_replies(
                    [final_reply(1, epoch)], now=BASE_TIME, transaction=tx
                )
                await tx.execute("INSERT INTO ledger VALUES (1)")
                with pytest.raises(PersistenceError, match="duplicate key"):
                    await tx.execute("INSERT INTO ledger VALUES (1)")
                assert tx.failure is None  # the statement's fault, not storage's

        with pytest.raises(PersistenceError) as failure:
            await failing()
        assert "rolled back" in str(failure.value)
        assert (await replies_of(a.messages, 1)).final is None
        assert await table_count(pg_schema, "ledger") == 0


async def test_a_savepoint_undoes_its_block_and_recovers_a_failed_statement(
    a: StorageSession, pg_schema: PgSchema
) -> None:
    with trio.fail_after(TIMEOUT):
        epoch = await saved_and_claimed(a, persisted_request(1), claim=False)
        async with a.messages.open_transaction() as tx:
            await tx.execute("CREATE TABLE ledger (id int PRIMARY KEY)")

        class Abort(Exception):
            pass

        async def insert_then_fail(tx: StorageTransaction) -> None:
            async with tx.savepoint():
                await tx.execute("INSERT INTO ledger VALUES (2)")
                raise Abort

        async def insert_twice(tx: StorageTransaction) -> None:
            async with tx.savepoint():
                await tx.execute("INSERT INTO ledger VALUES (3)")
                await tx.execute("INSERT INTO ledger VALUES (1)")

        async with a.messages.open_transaction() as tx:
            await tx.execute("INSERT INTO ledger VALUES (1)")
            with pytest.raises(Abort):
                await insert_then_fail(tx)
            # A failing statement aborts only its savepoint's part: the
            # transaction goes on and commits.
            with pytest.raises(PersistenceError, match="duplicate key"):
                await insert_twice(tx)
            with trio.CancelScope() as scope:
                async with tx.savepoint():
                    await tx.execute("INSERT INTO ledger VALUES (4)")
                    scope.cancel()
                    await trio.sleep_forever()
            async with tx.savepoint():
                await tx.execute("INSERT INTO ledger VALUES (5)")
            assert tx.failure is None
            await a.messages.save_replies(
                [final_reply(1, epoch)], now=BASE_TIME, transaction=tx
            )
        assert (await replies_of(a.messages, 1)).final == b"done"
        assert await table_count(pg_schema, "ledger") == 2  # 1 and 5


async def test_open_transactions_never_starve_message_traffic(
    pg_schema: PgSchema,
) -> None:
    storage = PostgresStorage(
        pg_schema.dsn,
        table_prefix=unique_prefix(),
        pool_size=1,
        transaction_pool_size=1,
    )
    with trio.fail_after(TIMEOUT):
        async with storage.open_session(name="tx", lease_duration=LEASE) as a:
            assert pg_messages(a).transaction_statistics().connects == 0  # lazy
            async with a.messages.open_transaction() as tx:
                await tx.execute("SELECT 1")
                # The only message connection is free for other work.
                await a.messages.save_requests([persisted_request(1)], now=BASE_TIME)
                assert (await replies_of(a.messages, 1)).known
                # A second transaction waits for the first one's connection
                # (at its first statement: connections are taken lazily).
                with trio.move_on_after(0.2) as waited:
                    async with a.messages.open_transaction() as second:
                        await second.execute("SELECT 1")
                        pytest.fail("two transactions on one connection")
                assert waited.cancelled_caught
            async with a.messages.open_transaction() as tx:
                assert await tx.execute("SELECT 2") == [(2,)]
            assert pg_messages(a).transaction_statistics().connects == 1


async def test_a_transaction_takes_its_connection_at_its_first_statement(
    pg_schema: PgSchema,
) -> None:
    storage = PostgresStorage(
        pg_schema.dsn, table_prefix=unique_prefix(), transaction_pool_size=1
    )
    with trio.fail_after(TIMEOUT):
        async with storage.open_session(name="tx", lease_duration=LEASE) as a:
            stats = pg_messages(a).transaction_statistics
            async with a.messages.open_transaction() as idle:
                # Another transaction runs meanwhile: the idle one holds
                # nothing of the pool (of one).
                async with a.messages.open_transaction() as busy:
                    assert await busy.execute("SELECT 1") == [(1,)]
                assert isinstance(idle, PgTransaction)
                with pytest.raises(trio.ClosedResourceError):
                    _ = idle.connection
            assert stats().connects == 1
            async with a.messages.open_transaction() as tx:
                await tx.execute("SELECT 2")
                assert isinstance(tx, PgTransaction)
                pid = tx.connection.backend_pid
                await tx.begin()  # idempotent
                assert tx.connection.backend_pid == pid


async def test_transaction_of_another_storage_is_refused(
    a: StorageSession, pg_schema: PgSchema
) -> None:
    other = PostgresStorage(pg_schema.dsn, table_prefix=unique_prefix())
    with trio.fail_after(TIMEOUT):
        async with (
            other.open_session(name="other", lease_duration=LEASE) as b,
            b.messages.open_transaction() as tx,
        ):
            with pytest.raises(ValueError, match="open_transaction"):
                await a.messages.save_replies(
                    [final_reply(1, 1)], now=BASE_TIME, transaction=tx
                )
            with pytest.raises(TypeError, match="query must be a str"):
                await tx.execute(b"SELECT 1")  # type: ignore[arg-type]


# ----------------------------------------------------------------------
# Retention


async def test_delete_processed_removes_replies_in_bounded_batches(
    storage: PostgresStorage, a: StorageSession, pg_schema: PgSchema
) -> None:
    with trio.fail_after(TIMEOUT):
        epoch = (await acquire_shards(a.runners, SHARD))[SHARD]
        batch = [persisted_request(i, stream=True) for i in range(1, 11)] + [
            persisted_request(11)
        ]
        await a.messages.save_requests(batch, now=BASE_TIME)
        for i in range(1, 11):
            chunks = [
                type(final_reply(i, epoch))(i, SHARD, epoch, b"c", sequence=s)
                for s in range(3)
            ]
            await a.messages.save_replies(
                [*chunks, final_reply(i, epoch)], now=BASE_TIME + i
            )
        replies_table = storage.names.replies
        assert await table_count(pg_schema, replies_table) == 40
        delete = a.messages.delete_processed
        assert await delete(older_than=BASE_TIME + 4.5, limit=3) == 3  # 1, 2, 3
        assert await delete(older_than=BASE_TIME + 4.5, limit=3) == 1  # 4
        assert await delete(older_than=BASE_TIME + 4.5, limit=3) == 0
        assert await table_count(pg_schema, replies_table) == 24
        known = [
            r.known
            for r in await a.messages.replies_for([ReplyQuery(i) for i in (4, 5, 11)])
        ]
        assert known == [False, True, True]
        assert await delete(older_than=BASE_TIME + 100, limit=100) == 6
        assert await table_count(pg_schema, replies_table) == 0
        assert await table_count(pg_schema, storage.names.messages) == 1


# ----------------------------------------------------------------------
# Misuse and closing


async def test_closed_session_raises_closed_resource_error(
    storage: PostgresStorage,
) -> None:
    with trio.fail_after(TIMEOUT):
        async with storage.open_session(name="closing", lease_duration=LEASE) as s:
            pass
        with pytest.raises(trio.ClosedResourceError):
            await s.messages.save_requests([persisted_request(1)], now=BASE_TIME)
        with pytest.raises(trio.ClosedResourceError):
            await s.runners.refresh([])
        with pytest.raises(trio.ClosedResourceError):
            await s.messages.wait_notifications()
        await s.runners.wait_session_lost()  # a closed session is lost


async def test_arguments_are_checked_like_memory_storage(a: StorageSession) -> None:
    with pytest.raises(TypeError, match="requests must be a sequence"):
        await a.messages.save_requests("x", now=BASE_TIME)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="now must be a float"):
        await a.messages.claim({}, now="x", limit=1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="limit must be an integer >= 0"):
        await a.messages.claim({}, now=BASE_TIME, limit=-1)
    bad = type(final_reply(1, 1))(1, SHARD, 1, b"", sequence=-1)
    with pytest.raises(ValueError, match="sequence must be >= 0"):
        await a.messages.save_replies([bad], now=BASE_TIME)
    with pytest.raises(TypeError, match="RunnerInfo"):
        await a.runners.register("me")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="address must be an EntityAddress"):
        await a.messages.clear_address("x")  # type: ignore[arg-type]


async def test_empty_batches_do_not_touch_the_database(a: StorageSession) -> None:
    pool = pg_messages(a)
    before = pool.statistics().statements
    assert await a.messages.save_requests([], now=BASE_TIME) == []
    assert await a.messages.save_replies([], now=BASE_TIME) == []
    assert await a.messages.replies_for([]) == []
    await a.messages.ack_chunks([])
    await a.messages.interrupt([])
    assert await a.messages.delete_processed(older_than=BASE_TIME, limit=0) == 0
    batch = await a.messages.claim({}, now=BASE_TIME, limit=10)
    assert (batch.requests, batch.more) == ([], False)
    assert pool.statistics().statements == before


def test_queries_use_only_generic_plan_friendly_parameters() -> None:
    # Every parameter is cast, so prepared generic plans have fixed types.
    queries = MessageQueries.build(PgNames.for_prefix("x"))
    retries = attrs.asdict(queries.retries)
    for name in ("save", "claim", "save_replies", "replies_for", *retries):
        text: str = retries.get(name) or getattr(queries, name)
        for match in re.finditer(r"\$\d+", text):
            following = text[match.end() : match.end() + 2]
            assert following == "::" or following.startswith((")", ",", " ")), (
                name,
                match.group(),
            )
    # The single-row forms cast every occurrence: one scalar per parameter.
    retry = queries.retries
    for one_row in (
        queries.save_one,
        queries.save_reply_one,
        queries.save_claimed,
        queries.save_final_reply,
        retry.dead_letters,
        retry.replay_dead_letter,
        retry.purge_dead_letters,
    ):
        assert one_row is not None
        occurrences = list(re.finditer(r"\$\d+", one_row))
        assert occurrences
        for match in occurrences:
            assert one_row[match.end() : match.end() + 2] == "::", match.group()
