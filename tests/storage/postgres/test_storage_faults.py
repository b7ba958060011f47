"""Fault tests of `PostgresStorage` against a real server (real time).

Each fault is injected from outside, as an operator or the operating system
would: ``pg_terminate_backend`` of one of a session's connections, a query
cancelled by Trio while the server runs it, the server ended the lock session
of a runner that stopped calling (``idle_session_timeout``), and a restart of
a private server (``private_server``) while a runner has persisted messages
in flight. Every wait is bounded by ``trio.fail_after``.
"""

from __future__ import annotations

import uuid
from typing import TYPE_CHECKING

import pytest
import trio

from tests.helpers import session_fixture
from tests.pg_fixture import LEASE, TIMEOUT, pg_messages, pg_runners
from trio_cluster import PersistenceError
from trio_cluster.abc import (
    MessagesAvailable,
    NotificationsMissed,
    ReplyOutcome,
    StorageSession,
    StorageTransaction,
)
from trio_cluster.storage import PostgresStorage
from trio_cluster.storage._postgres._driver._driver import PgConnection
from trio_cluster.storage._postgres._driver._errors import (
    ConnectionLostError,
    PgError,
    is_storage_failure,
)
from trio_cluster.storage._postgres._message_parts import PgTransaction
from trio_cluster.testing import (
    BASE_TIME,
    SHARD,
    SHARD2,
    acquire_shards,
    final_reply,
    persisted_request,
    replies_of,
    runner_info,
)

if TYPE_CHECKING:
    from tests.pg_fixture import PgAdmin, PgSchema

pytestmark = pytest.mark.postgres


def lock_pid(session: StorageSession) -> int:
    pid = pg_runners(session).locks.backend_pid
    assert pid is not None
    return pid


async def terminate(dsn: str, pid: int) -> None:
    """``pg_terminate_backend`` from Trio (the event loop keeps running), and
    wait until the backend has exited."""
    conn = await PgConnection.connect(dsn, application_name="test terminator")
    async with conn:
        result = await conn.execute(
            "SELECT pg_terminate_backend($1::int4, 5000)", [pid], prepare=False
        )
    assert result.rows == [(True,)]


async def active_queries(dsn: str, application_name: str) -> list[str]:
    conn = await PgConnection.connect(dsn, application_name="test observer")
    async with conn:
        result = await conn.execute(
            "SELECT query FROM pg_stat_activity"
            " WHERE application_name = $1::text AND state = 'active'",
            [application_name],
            prepare=False,
        )
    return [row[0] for row in result.rows]


# Names of this process's own (another suite may run on the same database).
SESSION_A = f"fault-a-{uuid.uuid4().hex[:8]}"
a = session_fixture("a", lease=LEASE, session=SESSION_A)
b = session_fixture("b", lease=LEASE, session=f"fault-b-{uuid.uuid4().hex[:8]}")


# ----------------------------------------------------------------------
# The lock connection is terminated


async def test_terminated_lock_connection_is_lost_before_anyone_takes_its_locks(
    a: StorageSession, b: StorageSession, pg_schema: PgSchema
) -> None:
    with trio.fail_after(TIMEOUT):
        await a.runners.register(runner_info(7001))
        epochs = await acquire_shards(a.runners, SHARD, SHARD2)
        lost = trio.Event()

        async def watch() -> None:
            await a.runners.wait_session_lost()
            lost.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(watch)
            assert await b.runners.acquire([SHARD, SHARD2]) == {}
            assert not lost.is_set()
            await terminate(pg_schema.base_dsn, lock_pid(a))
            # The locks are free on the server now; b's first attempt can
            # take them, yet a knew it lost them before b's attempt returned.
            got = await b.runners.acquire([SHARD, SHARD2])
            assert lost.is_set()
        assert got == {SHARD: epochs[SHARD] + 1, SHARD2: epochs[SHARD2] + 1}
        # a's next session holds nothing, but its runner is live again.
        assert await a.runners.refresh([SHARD, SHARD2]) == set()
        assert [r.address.port for r in await b.runners.live_runners()] == [7001]
        assert pg_runners(a).statistics().losses == 1


def failure_of(transaction: StorageTransaction) -> PersistenceError | None:
    """``transaction.failure`` (a call, so the type checker does not keep a
    narrowed type across the statements that change it)."""
    return transaction.failure


async def test_terminated_transaction_connection_is_the_transactions_failure(
    a: StorageSession, pg_schema: PgSchema
) -> None:
    with trio.fail_after(TIMEOUT):

        async def statement_after_termination() -> None:
            async with a.messages.open_transaction() as tx:
                assert await tx.execute("SELECT 1") == [(1,)]
                assert failure_of(tx) is None
                assert isinstance(tx, PgTransaction)
                await terminate(pg_schema.base_dsn, tx.connection.backend_pid)
                with pytest.raises(PersistenceError) as failure:
                    await tx.execute("SELECT 2")
                assert tx.failure is failure.value
                assert is_storage_failure(failure.value)

        with pytest.raises(PersistenceError):  # its COMMIT: the connection died
            await statement_after_termination()

        # The pool replaces the connection for the next transaction.
        async with a.messages.open_transaction() as again:
            assert await again.execute("SELECT 3") == [(3,)]


@pytest.mark.parametrize(
    ("sqlstate", "transient"),
    [
        ("40001", True),  # serialization failure
        ("40P01", True),  # deadlock
        ("55P03", True),  # lock not available
        ("57014", True),  # statement timeout
        ("08006", True),  # connection failure
        ("53300", True),  # too many connections
        ("42601", False),  # syntax error
        ("23505", False),  # unique violation
        (None, False),  # client side, e.g. a parameter that cannot adapt
    ],
)
def test_storage_failures_are_told_from_statement_errors(
    sqlstate: str | None, transient: bool
) -> None:
    assert is_storage_failure(PgError("x", sqlstate=sqlstate)) is transient
    assert is_storage_failure(ConnectionLostError("x", sqlstate=sqlstate))
    assert not is_storage_failure(PersistenceError("not from PostgreSQL"))


async def test_stale_epoch_writes_are_refused_after_a_takeover(
    a: StorageSession, b: StorageSession, pg_schema: PgSchema
) -> None:
    with trio.fail_after(TIMEOUT):
        old = (await acquire_shards(a.runners, SHARD))[SHARD]
        await a.messages.save_requests(
            [persisted_request(1), persisted_request(2)], now=BASE_TIME
        )
        batch = await a.messages.claim({SHARD: old}, now=BASE_TIME, limit=10)
        assert [r.request_id for r in batch.requests] == [1, 2]
        await terminate(pg_schema.base_dsn, lock_pid(a))
        new = (await acquire_shards(b.runners, SHARD))[SHARD]
        assert new == old + 1
        # a does not know yet (it made no call): every fenced write fails.
        assert await a.messages.save_replies([final_reply(1, old)], now=BASE_TIME) == [
            ReplyOutcome.STALE_EPOCH
        ]
        stale = await a.messages.claim({SHARD: old}, now=BASE_TIME, limit=10)
        assert (stale.requests, stale.stale_shards) == ([], frozenset({SHARD}))
        [saved] = await a.messages.save_requests(
            [persisted_request(3, claim_epoch=old)], now=BASE_TIME
        )
        assert not saved.claimed  # stored for the new owner instead
        # The new owner re-claims everything and its replies are recorded.
        batch = await b.messages.claim({SHARD: new}, now=BASE_TIME, limit=10)
        assert [r.request_id for r in batch.requests] == [1, 2, 3]
        assert await b.messages.save_replies(
            [final_reply(1, new, b"new")], now=BASE_TIME
        ) == [ReplyOutcome.RECORDED]
        assert (await replies_of(a.messages, 1)).final == b"new"


# ----------------------------------------------------------------------
# A frozen client: the server ends the idle lock session


async def test_lock_session_of_a_silent_client_is_ended_by_the_server(
    a: StorageSession, b: StorageSession
) -> None:
    with trio.fail_after(TIMEOUT):
        epoch = (await acquire_shards(a.runners, SHARD))[SHARD]
        # a makes no call on its lock connection any more (its heartbeat
        # stopped): after one lease of silence the server ends the session.
        silent_since = trio.current_time()
        await a.messages.save_requests(
            [persisted_request(1)], now=BASE_TIME
        )  # not a heartbeat
        await a.runners.wait_session_lost()
        silence = trio.current_time() - silent_since
        assert LEASE * 0.9 < silence < LEASE + 2.0
        got = await b.runners.acquire([SHARD])
        assert got == {SHARD: epoch + 1}
        assert await a.messages.save_replies(
            [final_reply(1, epoch)], now=BASE_TIME
        ) == [ReplyOutcome.STALE_EPOCH]
        assert await a.runners.refresh([SHARD]) == set()


async def test_heartbeats_keep_the_lock_session(
    a: StorageSession, b: StorageSession
) -> None:
    with trio.fail_after(TIMEOUT):
        await acquire_shards(a.runners, SHARD)
        generation = pg_runners(a).statistics().generation
        with trio.move_on_after(LEASE * 2.5):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(a.runners.wait_session_lost)
                for _ in range(100):
                    await trio.sleep(LEASE / 4)
                    assert await a.runners.refresh([SHARD]) == {SHARD}
                pytest.fail("the heartbeat loop ended early")
        assert pg_runners(a).statistics().generation == generation
        assert await b.runners.acquire([SHARD]) == {}


# ----------------------------------------------------------------------
# Queries cancelled by Trio while the server runs them


async def test_cancelled_query_is_cancelled_on_the_server_and_the_connection_reused(
    a: StorageSession, pg_schema: PgSchema
) -> None:
    pool = pg_messages(a)._pool
    with trio.fail_after(TIMEOUT):
        before = pool.statistics()
        started = trio.current_time()
        with trio.move_on_after(0.3) as scope:
            async with a.messages.open_transaction() as tx:
                await tx.execute("SELECT pg_sleep(30)")
        assert scope.cancelled_caught
        assert trio.current_time() - started < 2.5
        assert (
            await active_queries(pg_schema.base_dsn, f"trio_cluster {SESSION_A}") == []
        )
        after = pool.statistics()
        assert after.discarded == before.discarded  # drained, back in the pool
        assert after.connects == before.connects
        # The same connections keep working.
        assert await a.messages.save_requests([persisted_request(1)], now=BASE_TIME)
        assert pool.statistics().connects == before.connects


async def test_cancelled_lock_operation_closes_the_lock_connection(
    a: StorageSession, storage: PostgresStorage, pg_schema: PgSchema, pg_admin: PgAdmin
) -> None:
    # A lock statement interrupted mid-flight has an unknown outcome: the
    # lock connection is closed (its locks freed), never reused, and the
    # server does not keep the abandoned statement's session alive.
    import psycopg

    with trio.fail_after(TIMEOUT):
        await acquire_shards(a.runners, SHARD)
        await a.runners.release([SHARD])
        pid = lock_pid(a)
        shards = pg_schema.qualified(storage.names.shards)
        with psycopg.connect(pg_schema.base_dsn) as blocker:
            # Blocks every writer of the table (a locked row would not do:
            # acquisitions skip the shards whose row is locked).
            blocker.execute(f"LOCK TABLE {shards} IN SHARE MODE")
            with trio.move_on_after(0.3) as scope:
                await a.runners.acquire([SHARD])  # blocks on the table lock
            assert scope.cancelled_caught
            await a.runners.wait_session_lost()
            for _ in range(100):  # the server notices the closed client
                if not pg_admin.execute(
                    "SELECT 1 FROM pg_stat_activity WHERE pid = %s", [pid]
                ):
                    break
                await trio.sleep(0.05)
            else:
                pytest.fail("the abandoned lock session is still alive")
            blocker.rollback()
        assert await a.runners.acquire([SHARD]) == {SHARD: 2}
        assert lock_pid(a) != pid


# ----------------------------------------------------------------------
# The LISTEN connection is terminated


async def test_notifications_resume_after_the_listen_connection_is_terminated(
    a: StorageSession, b: StorageSession, pg_schema: PgSchema
) -> None:
    listener = pg_messages(a)._listener
    with trio.fail_after(TIMEOUT):
        pid = listener.backend_pid
        assert pid is not None
        async with trio.open_nursery() as nursery:
            failures: list[PersistenceError] = []

            async def wait_once() -> None:
                try:
                    await a.messages.wait_notifications()
                except PersistenceError as exc:
                    failures.append(exc)

            nursery.start_soon(wait_once)
            await trio.sleep(0.05)
            await terminate(pg_schema.base_dsn, pid)
        assert len(failures) == 1  # reported at once, not after a timeout
        # The next wait opens a new connection and, once it LISTENs, says at
        # once that notifications may have been missed (the runtime then
        # reads everything again: it does not poll).
        assert await a.messages.wait_notifications() == [NotificationsMissed()]
        assert listener.backend_pid not in (None, pid)
        assert listener.reconnects == 1
        async with trio.open_nursery() as nursery:
            got: list[object] = []

            async def wait_again() -> None:
                got.extend(await a.messages.wait_notifications())

            nursery.start_soon(wait_again)
            await trio.sleep(0.05)
            await b.messages.save_requests([persisted_request(1)], now=BASE_TIME)
        assert got == [MessagesAvailable(frozenset({SHARD}))]
        assert listener.reconnects == 1
