"""Tests of the trio-native PostgreSQL connection (`trio_cluster.storage._postgres._driver._driver`).

Real server, real time (see ``tests/pg_fixture.py``). Every test runs in its
own schema and guards itself with ``trio.fail_after``.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
import os
import random
import signal
import socket
import time
import uuid
from contextlib import asynccontextmanager
from functools import partial
from typing import TYPE_CHECKING, Any

import psycopg
import pytest
import trio
import trio.testing
from psycopg import pq

from tests.pg_fixture import throwaway_cluster
from trio_cluster import (
    ClusterInternalError,
    ConfigError,
    PersistenceError,
    StorageRefusedError,
)
from trio_cluster.storage._postgres._driver._connect import (
    resolve_host as _resolve_host,
    wait_readable_or_writable,
)
from trio_cluster.storage._postgres._driver._driver import (
    PgConnection,
    PgNotification,
    build_conninfo,
)
from trio_cluster.storage._postgres._driver._errors import (
    ConnectionLostError,
    PgError,
    is_session_fatal,
)

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from tests.pg_fixture import PgAdmin, PgSchema

pytestmark = pytest.mark.postgres
logger = logging.getLogger(__name__)  # timings: pytest --log-cli-level=INFO
FIELD_SEVERITY = pq.DiagnosticField.SEVERITY_NONLOCALIZED

UTC = dt.UTC


@pytest.fixture
def app_name() -> str:
    return f"tc-test-{uuid.uuid4().hex[:12]}"


@pytest.fixture
async def conn(pg_schema: PgSchema, app_name: str) -> AsyncIterator[PgConnection]:
    async with await PgConnection.connect(
        pg_schema.dsn, application_name=app_name
    ) as c:
        yield c


async def connect(dsn: str, **kwargs: object) -> PgConnection:
    name = f"tc-test-{uuid.uuid4().hex[:12]}"
    return await PgConnection.connect(dsn, application_name=name, **kwargs)  # type: ignore[arg-type]


@asynccontextmanager
async def frozen_backend(conn: PgConnection) -> AsyncIterator[None]:
    """SIGSTOP the connection's server process for the block: a hung server."""
    comm = trio.Path(f"/proc/{conn.backend_pid}/comm")
    if not await comm.exists() or (await comm.read_text()).strip() != "postgres":
        pytest.skip(
            "the PostgreSQL server does not run on this machine (cannot freeze it)"
        )
    os.kill(conn.backend_pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(conn.backend_pid, signal.SIGCONT)


async def scalar(conn: PgConnection, query: str, *params: object) -> object:
    result = await conn.execute(query, params)
    assert len(result.rows) == 1
    return result.rows[0][0]


def shrink_send_buffer(conn: PgConnection) -> None:
    """Make the kernel send buffer tiny, so that libpq's flush must wait."""
    with socket.socket(fileno=os.dup(conn._pgconn.socket)) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)


# ---------------------------------------------------------------- types


async def test_scalar_types_round_trip(conn: PgConnection) -> None:
    now = dt.datetime(2026, 11, 23, 8, 53, 53, 123456, tzinfo=UTC)
    values = [1, 2**40, "héllo wörld ✓ 日本", b"\x00\xff\x01", True, False, 1.5, now]
    with trio.fail_after(10):
        result = await conn.execute(
            "select $1::int, $2::bigint, $3::text, $4::bytea, $5::bool, $6::bool,"
            " $7::float8, $8::timestamptz",
            values,
        )
    assert result.rows == [tuple(values)]
    assert result.rowcount == 1
    assert result.status == "SELECT 1"
    names = ("int4", "int8", "text", "bytea", "bool", "bool", "float8", "timestamptz")
    assert result.columns == names


async def test_nulls_and_arrays_round_trip(conn: PgConnection) -> None:
    with trio.fail_after(10):
        nulls = await conn.execute(
            "select $1::int, $2::bigint, $3::text, $4::bytea, $5::bool, $6::float8,"
            " $7::timestamptz, $8::bigint[]",
            [None] * 8,
        )
        assert nulls.rows == [(None,) * 8]
        arrays = [
            [1, None, 3],
            [2**40, -(2**40)],
            ["a", None, "ü"],
            [b"x", None, b""],
            [True, None, False],
            [0.5, None],
            [dt.datetime(2000, 1, 1, tzinfo=UTC), None],
        ]
        result = await conn.execute(
            "select $1::int[], $2::bigint[], $3::text[], $4::bytea[], $5::bool[],"
            " $6::float8[], $7::timestamptz[], $8::int[]",
            [*arrays, []],
        )
    assert result.rows == [(*arrays, [])]


async def test_large_bytea_round_trip(conn: PgConnection) -> None:
    blob = os.urandom(1 << 20)
    with trio.fail_after(10):
        await conn.execute_script("create table blobs (b bytea)")
        await conn.execute("insert into blobs values ($1)", [blob])
        assert await scalar(conn, "select b from blobs") == blob
        # Through a tiny kernel send buffer, libpq's flush has to wait.
        shrink_send_buffer(conn)
        digest = hashlib.md5(blob * 4).hexdigest()
        assert await scalar(conn, "select md5($1::bytea)", blob * 4) == digest


async def test_unnest_insert_of_10000_rows_is_one_statement(conn: PgConnection) -> None:
    n = 10_000
    columns: list[list[Any]] = [
        list(range(n)),
        [f"r{i}" for i in range(n)],
        [b"x" * 100] * n,
    ]
    with trio.fail_after(20):
        (ddl,) = await conn.execute_script(
            "create table msgs (id bigint, name text, body bytea)"
        )
        assert (ddl.status, ddl.rowcount) == ("CREATE TABLE", -1)
        before = conn.statistics()
        started = time.perf_counter()
        result = await conn.execute(
            "insert into msgs select * from unnest($1::bigint[], $2::text[], $3::bytea[])",
            columns,
        )
        elapsed = time.perf_counter() - started
        after = conn.statistics()
        assert (result.status, result.rowcount) == (f"INSERT 0 {n}", n)
        assert after.statements - before.statements == 1
        assert after.round_trips - before.round_trips == 1
        rows = (await conn.execute("select * from msgs where id = $1", [n - 1])).rows
        assert rows == [(n - 1, f"r{n - 1}", b"x" * 100)]
        assert (
            await conn.execute("delete from msgs where id >= $1", [n - 2])
        ).rowcount == 2
    logger.info("unnest insert of %d rows: %.1f ms", n, elapsed * 1e3)


# ------------------------------------------------------- prepared statements


async def test_prepared_statements_are_reused(conn: PgConnection) -> None:
    with trio.fail_after(10):
        for i in range(3):
            assert await scalar(conn, "select $1::int + 1", i) == i + 1
        stats = conn.statistics()
        assert (stats.prepares, stats.statements, stats.round_trips) == (1, 3, 3)
        # Other parameter types (int8 instead of int2) need their own statement.
        assert await scalar(conn, "select $1::bigint + 1", 2**40) == 2**40 + 1
        assert await scalar(conn, "select $1::int + 1", 2**20) == 2**20 + 1
        assert conn.statistics().prepares == 3
        assert await scalar(conn, "select 'prepared too'") == "prepared too"
        await conn.execute("select 'dynamic'", prepare=False)
        assert conn.statistics().prepares == 4
        names = await conn.execute(
            "select count(*) from pg_prepared_statements", prepare=False
        )
        assert names.rows == [(4,)]
        await conn.execute_script("DISCARD ALL")  # seen: the cache is cleared
        assert await scalar(conn, "select $1::int + 1", 1) == 2
        assert conn.statistics().prepares == 5


async def test_statement_deallocated_behind_our_back_is_prepared_again(
    conn: PgConnection,
) -> None:
    with trio.fail_after(10):
        assert await scalar(conn, "select $1::int * 2", 2) == 4
        (name,) = (
            await conn.execute("select name from pg_prepared_statements", prepare=False)
        ).rows[0]
        await conn.execute_script(f'DEALLOCATE "{name}"')
        before = conn.statistics()
        assert await scalar(conn, "select $1::int * 2", 3) == 6
        after = conn.statistics()
        # One failed attempt, then prepare + execute in one round trip.
        assert after.round_trips - before.round_trips == 2
        assert after.prepares - before.prepares == 1


async def test_lost_statement_in_a_transaction_is_not_retried(
    conn: PgConnection,
) -> None:
    with trio.fail_after(10):
        await conn.execute("select $1::int", [1])
        await conn.execute_script("DEALLOCATE ALL; SELECT 1")  # seen: cache cleared
        await conn.execute("select $1::int", [1])
        (name,) = (
            await conn.execute("select name from pg_prepared_statements", prepare=False)
        ).rows[0]
        await conn.execute_script(f'DEALLOCATE "{name}"')
        with pytest.raises(PgError) as caught:
            async with conn.transaction():
                await conn.execute("select $1::int", [1])
        assert caught.value.sqlstate == "26000"
        assert conn.is_idle
        assert await scalar(conn, "select $1::int", 5) == 5


async def test_max_prepared_limits_the_cache(pg_schema: PgSchema) -> None:
    with trio.fail_after(10):
        async with await connect(pg_schema.dsn, max_prepared=1) as conn:
            assert await scalar(conn, "select 1") == 1
            assert await scalar(conn, "select 2") == 2
            assert await scalar(conn, "select 2") == 2
            assert conn.statistics().prepares == 1


# ------------------------------------------------------------- pipelines


async def test_pipeline_runs_in_one_round_trip(conn: PgConnection) -> None:
    with trio.fail_after(10):
        await conn.execute_script("create table p (x int)")
        before = conn.statistics()
        results = await conn.execute_pipeline(
            [
                ("insert into p values ($1), ($2)", [1, 2]),
                ("select count(*) from p", []),
                ("select $1::text", ["z"]),
            ]
        )
        after = conn.statistics()
        assert [r.rows for r in results] == [[], [(2,)], [("z",)]]
        assert results[0].rowcount == 2
        assert after.round_trips - before.round_trips == 1
        assert after.statements - before.statements == 3
        assert await conn.execute_pipeline([]) == []


async def test_pipeline_error_in_the_middle(conn: PgConnection) -> None:
    with trio.fail_after(10):
        await conn.execute_script("create table p (x int)")
        with pytest.raises(PgError) as caught:
            await conn.execute_pipeline(
                [
                    ("insert into p values ($1)", [1]),
                    ("select 1 / $1::int", [0]),
                    ("insert into p values ($1)", [2]),
                ]
            )
        assert caught.value.sqlstate == "22012"
        assert isinstance(caught.value.__cause__, psycopg.errors.DivisionByZero)
        # One implicit transaction: the first insert was rolled back too.
        assert await scalar(conn, "select count(*) from p") == 0
        assert conn.is_idle
        # The statements prepared by the failed pipeline are usable.
        results = await conn.execute_pipeline(
            [("insert into p values ($1)", [3]), ("select 1 / $1::int", [1])]
        )
        assert results[1].rows == [(1,)]
        assert await scalar(conn, "select count(*) from p") == 1
        # A statement that fails to prepare inside the pipeline.
        with pytest.raises(PgError) as caught:
            await conn.execute_pipeline(
                [("select 1", []), ("selec 2", []), ("select 3", [])]
            )
        assert caught.value.sqlstate == "42601"
        results = await conn.execute_pipeline([("select 1", []), ("select 3", [])])
        assert [r.rows for r in results] == [[(1,)], [(3,)]]


async def test_pipeline_cancelled(conn: PgConnection) -> None:
    with trio.fail_after(10):
        started = time.perf_counter()
        with trio.move_on_after(0.2) as scope:
            await conn.execute_pipeline(
                [("select 1", []), ("select pg_sleep(5)", []), ("select 2", [])]
            )
        assert scope.cancelled_caught
        assert time.perf_counter() - started < 1.5
        assert conn.is_idle
        assert await scalar(conn, "select $1::int", 17) == 17
        assert conn.statistics().cancels >= 1


# ---------------------------------------------------------- transactions


async def test_transaction_commits_or_rolls_back(conn: PgConnection) -> None:
    with trio.fail_after(10):
        await conn.execute_script("create table tx (x int)")
        async with conn.transaction():
            await conn.execute("insert into tx values (0)")
        assert await scalar(conn, "delete from tx returning x") == 0

        async def insert_then(fail: str) -> None:
            async with conn.transaction():
                await conn.execute("insert into tx values (1)")
                if fail == "python":
                    raise KeyError("boom")
                await conn.execute("insert into tx values ('x')")

        with pytest.raises(KeyError):
            await insert_then("python")
        assert await scalar(conn, "select count(*) from tx") == 0
        with pytest.raises(PgError) as caught:
            await insert_then("sql")
        assert caught.value.sqlstate == "22P02"
        assert await scalar(conn, "select count(*) from tx") == 0
        assert conn.is_idle


async def test_failed_commit_is_reported(conn: PgConnection) -> None:
    with trio.fail_after(10):
        await conn.execute_script(
            "create table a (id int primary key);"
            " create table b (a_id int references a deferrable initially deferred)"
        )

        async def insert_an_orphan() -> None:
            async with conn.transaction():
                await conn.execute("insert into b values (5)")

        with pytest.raises(PgError) as caught:
            await insert_an_orphan()
        assert caught.value.sqlstate == "23503"
        assert conn.is_idle
        assert await scalar(conn, "select count(*) from b") == 0


async def test_transaction_with_a_swallowed_error_does_not_commit(
    conn: PgConnection,
) -> None:
    with trio.fail_after(10):
        await conn.execute_script("create table tx (x int)")

        async def swallow_an_error() -> None:
            async with conn.transaction():
                await conn.execute("insert into tx values (1)")
                with pytest.raises(PgError):
                    await conn.execute("select 1 / 0")

        with pytest.raises(PgError) as caught:
            await swallow_an_error()
        assert caught.value.sqlstate == "25P02"
        assert await scalar(conn, "select count(*) from tx") == 0


async def test_transaction_rolls_back_on_cancellation(conn: PgConnection) -> None:
    with trio.fail_after(10):
        await conn.execute_script("create table tx (x int)")
        started = time.perf_counter()
        with trio.move_on_after(0.2) as scope:
            async with conn.transaction():
                await conn.execute("insert into tx values (1)")
                await conn.execute("select pg_sleep(5)")
        assert scope.cancelled_caught
        assert time.perf_counter() - started < 1.5
        assert conn.is_idle
        assert await scalar(conn, "select count(*) from tx") == 0


async def test_cancelled_statement_leaves_the_transaction_aborted_until_the_block_exits(
    conn: PgConnection,
) -> None:
    with trio.fail_after(10):

        async def go_on_after_a_cancelled_statement() -> None:
            async with conn.transaction():
                with trio.move_on_after(0.1):
                    await conn.execute("select pg_sleep(5)")
                await conn.execute("select 1")  # must not run outside the transaction

        with pytest.raises(PgError) as caught:
            await go_on_after_a_cancelled_statement()
        assert caught.value.sqlstate == "25P02"
        assert conn.is_idle


async def test_transaction_does_not_nest(conn: PgConnection) -> None:
    with trio.fail_after(10):
        async with conn.transaction():
            with pytest.raises(ClusterInternalError):
                async with conn.transaction():
                    pass  # pragma: no cover
        await conn.execute("begin")
        with pytest.raises(ClusterInternalError):
            async with conn.transaction():
                pass  # pragma: no cover
        # A raw transaction aborted by a cancellation is rolled back.
        with trio.move_on_after(0.1):
            await conn.execute("select pg_sleep(5)")
        assert conn.is_idle


# ----------------------------------------------------------- cancellation


async def test_cancel_of_a_long_query_is_prompt(conn: PgConnection) -> None:
    with trio.fail_after(10):
        with trio.CancelScope() as scope:
            scope.cancel()
            await conn.execute("select pg_sleep(5)")
        assert conn.statistics().round_trips == 0  # cancelled before sending
        started = time.perf_counter()
        with trio.move_on_after(0.2) as scope:
            await conn.execute("select pg_sleep(5)")
        elapsed = time.perf_counter() - started
        assert scope.cancelled_caught
        assert elapsed < 1.0
        assert conn.is_idle
        assert await scalar(conn, "select $1::int", 41) == 41
        assert conn.statistics().cancels == 1
    logger.info("cancelled pg_sleep(5) returned after %.0f ms", elapsed * 1e3)


async def test_cancel_with_the_blocking_cancel_fallback(conn: PgConnection) -> None:
    conn._nonblocking_cancel = False  # what libpq < 17 gives
    with trio.fail_after(10):
        with trio.move_on_after(0.2):
            await conn.execute("select pg_sleep(5)")
        assert await scalar(conn, "select 'after'") == "after"


async def test_many_cancellations_at_random_points(conn: PgConnection) -> None:
    rng = random.Random(1234)
    cancelled = completed = 0
    with trio.fail_after(25):
        for i in range(300):
            with trio.move_on_after(rng.uniform(0, 0.0012)) as scope:
                await conn.execute("select pg_sleep(0.0005)")
            cancelled += scope.cancelled_caught
            completed += not scope.cancelled_caught
            assert await scalar(conn, "select $1::int", i) == i
    assert not conn.is_broken
    logger.info("race: %d cancelled, %d completed", cancelled, completed)


async def test_recovery_timeout_zero_closes_instead(pg_schema: PgSchema) -> None:
    with trio.fail_after(10):
        async with await connect(pg_schema.dsn, recovery_timeout=0) as conn:
            with trio.move_on_after(0.1):
                await conn.execute("select pg_sleep(5)")
            assert conn.is_broken
            with pytest.raises(ConnectionLostError):
                await conn.execute("select 1")


async def test_hung_server_breaks_the_connection_within_the_recovery_timeout(
    pg_schema: PgSchema,
) -> None:
    async with await connect(pg_schema.dsn, recovery_timeout=0.3) as conn:
        with trio.fail_after(5):
            async with frozen_backend(conn):
                started = time.perf_counter()
                with trio.move_on_after(0.2):
                    await conn.execute("select 1")
                elapsed = time.perf_counter() - started
        assert conn.is_broken
        assert 0.45 < elapsed < 1.5
        with pytest.raises(ConnectionLostError):
            await conn.execute("select 1")


async def test_a_wait_that_starts_after_the_socket_closed_says_closed() -> None:
    """`wait_readable_or_writable` starts its two waiters as tasks: one that
    starts after another task closed the connection (`finish_pgconn`) finds
    the descriptor gone. Found in CI: `PgError: [Errno 9] Bad file descriptor`
    instead of the closed connection, from a send stuck in recovery."""
    a, b = socket.socketpair()
    fd = a.fileno()
    a.close()
    try:
        with trio.fail_after(5), pytest.raises(trio.ClosedResourceError):
            await wait_readable_or_writable(fd)
    finally:
        b.close()


async def test_close_from_another_task_during_recovery_of_a_stuck_send(
    pg_schema: PgSchema,
) -> None:
    async def send_forever(conn: PgConnection) -> None:
        with trio.move_on_after(0.2):
            await conn.execute("select length($1::bytea)", [bytes(8 << 20)])

    async with await connect(pg_schema.dsn, recovery_timeout=5) as conn:
        shrink_send_buffer(conn)
        with trio.fail_after(5):
            async with frozen_backend(conn), trio.open_nursery() as nursery:
                started = time.perf_counter()
                nursery.start_soon(send_forever, conn)  # the server does not read
                await trio.sleep(0.4)  # send_forever is now stuck in recovery
                conn.close()
            assert time.perf_counter() - started < 1.0
        with pytest.raises(trio.ClosedResourceError):
            await conn.execute("select 1")


# ---------------------------------------------------------- LISTEN/NOTIFY


async def test_listen_notify_round_trip(
    conn: PgConnection, pg_schema: PgSchema
) -> None:
    with trio.fail_after(10):
        await conn.listen("events")
        async with await connect(pg_schema.dsn) as sender:
            await sender.execute("select pg_notify('events', $1)", ["hello ✓"])
            got = await conn.wait_notifications()
            assert got == [PgNotification("events", "hello ✓", sender.backend_pid)]
            # Notifications that arrive during other work are kept for later.
            await sender.execute("notify events, 'one'", prepare=False)
            await sender.execute_script("notify events, 'two'; notify other")
            await trio.sleep(0.05)
            assert await scalar(conn, "select 1") == 1
            with trio.testing.assert_checkpoints():
                got = await conn.wait_notifications()
            assert [n.payload for n in got] == ["one", "two"]
            assert conn.statistics().notifications == 3
            with trio.move_on_after(0.05) as scope:
                await conn.wait_notifications()
            assert scope.cancelled_caught
            assert await scalar(conn, "select 2") == 2


async def test_check_alive_nowait_reads_what_the_idle_connection_was_sent(
    conn: PgConnection, pg_schema: PgSchema, pg_admin: PgAdmin, app_name: str
) -> None:
    with trio.fail_after(10):
        await conn.listen("events")
        assert conn.check_alive_nowait()  # nothing sent: nothing read
        assert conn.statistics().notifications == 0
        async with await connect(pg_schema.dsn) as sender:
            await sender.execute("select pg_notify('events', 'idle')")
        await trio.sleep(0.05)
        assert conn.check_alive_nowait()
        assert conn.statistics().notifications == 1
        assert [n.payload for n in await conn.wait_notifications()] == ["idle"]
        terminate = partial(pg_admin.terminate, application_name=app_name)
        assert await trio.to_thread.run_sync(terminate) == 1
        await trio.sleep(0.05)  # let the server's goodbye arrive
        assert not conn.check_alive_nowait()
        assert conn.is_broken


async def test_terminated_listener_notices_at_once(
    conn: PgConnection,
    pg_admin: PgAdmin,
    app_name: str,
) -> None:
    await conn.listen("events")
    detected_after: list[float] = []

    async def park() -> None:
        with pytest.raises(ConnectionLostError) as caught:
            await conn.wait_notifications()
        detected_after.append(time.perf_counter() - started)
        assert isinstance(caught.value.__cause__, psycopg.Error)

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(park)
            await trio.testing.wait_all_tasks_blocked()
            started = time.perf_counter()
            terminate = partial(pg_admin.terminate, application_name=app_name)
            assert await trio.to_thread.run_sync(terminate) == 1
    assert detected_after[0] < 1.0
    assert conn.is_broken
    with pytest.raises(ConnectionLostError):
        await conn.execute("select 1")
    logger.info("terminate noticed after %.1f ms", detected_after[0] * 1e3)


async def test_idle_session_timeout_ends_the_session(pg_schema: PgSchema) -> None:
    with trio.fail_after(10):
        async with await connect(pg_schema.dsn, idle_session_timeout=1.0) as conn:
            assert await scalar(conn, "show idle_session_timeout") == "1s"
            started = time.perf_counter()
            with pytest.raises(ConnectionLostError):
                await conn.wait_notifications()
            assert 0.9 < time.perf_counter() - started < 3.0


# ---------------------------------------------------------------- errors


async def test_syntax_error_is_translated(conn: PgConnection) -> None:
    with trio.fail_after(10):
        with pytest.raises(PersistenceError) as caught:
            await conn.execute("selec 1")
        error = caught.value
        assert type(error) is PgError
        assert error.sqlstate == "42601"
        assert isinstance(error.__cause__, psycopg.errors.SyntaxError)
        assert "42601" in str(error)
        assert await scalar(conn, "select 1") == 1


async def test_data_the_server_refuses_is_a_storage_refused_error(
    conn: PgConnection,
) -> None:
    # Classes 22 (data exception) and 23 (integrity constraint violation)
    # say the statement's data is at fault: the runtime writes a refused
    # batch's items apart (issue 11, item 9). Nothing else is refused.
    with trio.fail_after(10):
        await conn.execute_script("create table u (x int primary key)")
        await conn.execute("insert into u values (1)")
        refused: list[tuple[str, list[object], str]] = [
            ("select $1::text", ["a\x00b"], "22021"),
            ("select 1 / $1::int", [0], "22012"),
            ("insert into u values ($1)", [1], "23505"),
        ]
        for query, params, sqlstate in refused:
            with pytest.raises(StorageRefusedError) as caught:
                await conn.execute(query, params)
            assert isinstance(caught.value, PgError)
            assert caught.value.sqlstate == sqlstate
        with pytest.raises(PgError) as other:
            await conn.execute("select * from missing_table")
        assert not isinstance(other.value, StorageRefusedError)
        assert await scalar(conn, "select 3") == 3


async def test_no_psycopg_error_escapes(conn: PgConnection) -> None:
    with trio.fail_after(10):
        cases: list[tuple[str, list[object]]] = [
            ("select $1", [object()]),
            ("select 1 / 0", []),
            ("select * from missing_table", []),
            ("select $1::int", ["not a number"]),
        ]
        for query, params in cases:
            with pytest.raises(PgError) as caught:
                await conn.execute(query, params)
            assert isinstance(caught.value.__cause__, psycopg.Error)
            assert not isinstance(caught.value, psycopg.Error)
        with pytest.raises(PgError):
            await conn.execute_script("select 1; selec 2")
        assert await scalar(conn, "select 3") == 3


async def test_settings_and_notices(
    pg_schema: PgSchema, caplog: pytest.LogCaptureFixture
) -> None:
    settings = {"statement_timeout": "100ms", "lock_timeout": "1 s"}
    with trio.fail_after(10), caplog.at_level(logging.DEBUG, "trio_cluster"):
        async with await connect(pg_schema.dsn, settings=settings) as conn:
            assert await scalar(conn, "show lock_timeout") == "1s"
            with pytest.raises(PgError) as caught:
                await conn.execute("select pg_sleep(2)")
            assert caught.value.sqlstate == "57014"
            assert not conn.is_broken
            await conn.execute("rollback")  # a WARNING notice, logged
    assert any("no transaction in progress" in r.getMessage() for r in caplog.records)


async def test_copy_is_refused_and_the_connection_survives(conn: PgConnection) -> None:
    with trio.fail_after(10):
        await conn.execute_script("create table c (x int)")
        with pytest.raises(PgError, match="COPY"):
            await conn.execute_script(
                "copy (select generate_series(1, 300000)) to stdout"
            )
        with pytest.raises(PgError, match="COPY"):
            await conn.execute("copy c from stdin", prepare=False)
        assert await scalar(conn, "select count(*) from c") == 0


# ------------------------------------------------------ connection lifecycle


async def test_connect_failures_and_cancellation(postgres_dsn: str) -> None:
    with trio.fail_after(10):
        with pytest.raises(ConnectionLostError):
            await connect(postgres_dsn + " dbname=no_such_database_here")
        listener = trio.socket.socket()
        await listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        dsn = f"host=127.0.0.1 port={listener.getsockname()[1]} user=postgres"
        with trio.move_on_after(0.1) as scope:  # accepted, but never answered
            await connect(dsn)
        assert scope.cancelled_caught
        listener.close()  # now nothing listens there
        with pytest.raises(ConnectionLostError) as caught:
            await connect(dsn)
        assert isinstance(caught.value.__cause__, psycopg.OperationalError)


async def test_bad_configuration_is_rejected_eagerly(postgres_dsn: str) -> None:
    with trio.fail_after(10):
        cases: list[dict[str, Any]] = [
            {"recovery_timeout": -1.0},
            {"recovery_timeout": float("nan")},
            {"max_prepared": -1},
            {"idle_session_timeout": 0.0},
            {"settings": {"bad name": "1"}},
        ]
        for kwargs in cases:
            with pytest.raises(ConfigError):
                await connect(postgres_dsn, **kwargs)
        with pytest.raises(ConfigError):
            await connect("this is not a dsn")


def test_build_conninfo_adds_defaults_and_keeps_the_dsn() -> None:
    params = build_conninfo(
        "host=db port=5433 keepalives_idle=30 options='-c search_path=s'",
        application_name="me",
        idle_session_timeout=1.5,
        settings={"application_name": "x y"},
    )
    assert params["keepalives"] == "1"
    assert params["keepalives_idle"] == "30"  # the DSN wins
    assert params["client_encoding"] == "UTF8"
    assert params["application_name"] == "me"
    assert (
        params["options"]
        == "-c search_path=s -c application_name=x\\ y -c idle_session_timeout=1500"
    )


async def test_no_host_name_to_resolve() -> None:
    for host in ["", "/tmp", "::1", "a,b"]:
        params = {"host": host} if host else {"port": "5432"}
        await _resolve_host(params)
        assert params == ({"host": host} if host else {"port": "5432"})


def test_session_fatal_errors() -> None:
    class FatalResult:
        def error_field(self, code: int) -> bytes | None:
            return b"FATAL" if code == FIELD_SEVERITY else None

    assert is_session_fatal(ConnectionResetError())
    assert is_session_fatal(psycopg.OperationalError("server closed the connection"))
    assert is_session_fatal(psycopg.errors.ConnectionFailure("gone"))
    assert is_session_fatal(psycopg.errors.AdminShutdown("terminating connection"))
    assert is_session_fatal(psycopg.errors.InternalError_("x", info=FatalResult()))  # type: ignore[arg-type]
    assert not is_session_fatal(psycopg.errors.QueryCanceled("statement timeout"))
    assert not is_session_fatal(psycopg.ProgrammingError("cannot adapt"))


async def test_host_names_are_resolved(postgres_dsn: str) -> None:
    params = build_conninfo(postgres_dsn, application_name="x")
    if params.get("host") != "127.0.0.1":
        pytest.skip("the test server is not on 127.0.0.1")
    with trio.fail_after(10):
        async with await connect(postgres_dsn + " host=localhost") as conn:
            assert await scalar(conn, "select 1") == 1


async def test_concurrent_use_is_refused(conn: PgConnection) -> None:
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(conn.execute, "select pg_sleep(0.2)")
            await trio.testing.wait_all_tasks_blocked()
            with pytest.raises(trio.BusyResourceError):
                await conn.execute("select 1")
        assert await scalar(conn, "select 1") == 1


async def test_closed_connection(conn: PgConnection) -> None:
    with trio.fail_after(10):
        await conn.listen("x")

        async def park() -> None:
            with pytest.raises(trio.ClosedResourceError):
                await conn.wait_notifications()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(park)
            await trio.testing.wait_all_tasks_blocked()
            await conn.aclose()
        with pytest.raises(trio.ClosedResourceError):
            await conn.execute("select 1")
        assert not conn.is_idle
        conn.close()  # idempotent


async def test_checkpoints_and_statistics(conn: PgConnection) -> None:
    with trio.fail_after(10):
        with trio.testing.assert_checkpoints():
            await conn.execute_script("select 1; select 2; select 3")
        with trio.testing.assert_checkpoints():
            await conn.execute_pipeline([])
        async with conn.transaction():
            with trio.testing.assert_checkpoints():
                await conn.execute("select 1")
        stats = conn.statistics()
        assert stats.statements == 6  # 3 + BEGIN + select + COMMIT
        assert stats.round_trips == 4
        with trio.testing.assert_checkpoints():
            await conn.aclose()


@pytest.mark.slow
def test_throwaway_cluster_path() -> None:
    """The fixture's last resort (a cluster from the system binaries) works."""

    async def check(dsn: str) -> None:
        with trio.fail_after(10):
            async with await connect(dsn) as conn:
                assert await scalar(conn, "select $1::int", 1) == 1

    with throwaway_cluster() as dsn:
        trio.run(check, dsn)
