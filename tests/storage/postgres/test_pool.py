"""Tests of the PostgreSQL connection pool (`trio_cluster.storage._postgres._driver._pool`).

Real server, real time (see ``tests/pg_fixture.py``).
"""

from __future__ import annotations

import itertools
import time
import uuid
from functools import partial
from typing import TYPE_CHECKING

import pytest
import trio
import trio.testing

from tests.helpers import TaskSteps
from trio_cluster import ConfigError
from trio_cluster._core._retry import Backoff
from trio_cluster.storage._postgres._driver._driver import PgConnection
from trio_cluster.storage._postgres._driver._errors import ConnectionLostError, PgError
from trio_cluster.storage._postgres._driver._pool import PgPool, open_pool

if TYPE_CHECKING:
    from tests.pg_fixture import PgAdmin, PgSchema

pytestmark = pytest.mark.postgres


@pytest.fixture
def app_name() -> str:
    return f"tc-pool-{uuid.uuid4().hex[:12]}"


async def wait_gone(pg_admin: PgAdmin, app_name: str) -> None:
    """Wait until the server has no session left with ``app_name``."""
    for _ in range(200):
        if not pg_admin.backends(app_name):
            return
        await trio.sleep(0.01)
    raise AssertionError(f"sessions of {app_name} are still there")


async def pid_of(pool: PgPool) -> int:
    async with pool.connection() as conn:
        return conn.backend_pid


async def test_many_tasks_share_a_few_connections(
    pg_schema: PgSchema, pg_admin: PgAdmin, app_name: str
) -> None:
    in_use = peak = 0
    answers: list[int] = []

    async def worker(pool: PgPool, worker_id: int) -> None:
        nonlocal in_use, peak
        for i in range(20):
            async with pool.connection() as conn:
                in_use += 1
                peak = max(peak, in_use)
                result = await conn.execute(
                    "select $1::int * 1000 + $2::int", [worker_id, i]
                )
                answers.append(result.rows[0][0])
                in_use -= 1

    with trio.fail_after(20):
        async with open_pool(pg_schema.dsn, size=4, application_name=app_name) as pool:
            assert len(pg_admin.backends(app_name)) == 4
            async with trio.open_nursery() as nursery:
                for worker_id in range(50):
                    nursery.start_soon(worker, pool, worker_id)
            stats = pool.statistics()
            assert len(pg_admin.backends(app_name)) == 4
        await wait_gone(pg_admin, app_name)
    assert sorted(answers) == sorted(w * 1000 + i for w in range(50) for i in range(20))
    assert peak == 4
    assert (stats.size, stats.idle, stats.borrowed, stats.waiting) == (4, 4, 0, 0)
    assert (stats.connects, stats.discarded, stats.generation) == (4, 0, 0)
    assert stats.statements == stats.round_trips == 1000


async def test_terminated_idle_connection_is_replaced(
    pg_schema: PgSchema, pg_admin: PgAdmin, app_name: str
) -> None:
    with trio.fail_after(10):
        async with open_pool(pg_schema.dsn, size=1, application_name=app_name) as pool:
            old_pid = await pid_of(pool)
            terminate = partial(pg_admin.terminate, pid=old_pid)
            assert await trio.to_thread.run_sync(terminate) == 1
            await trio.sleep(0.05)  # let the server's goodbye arrive
            async with pool.connection() as conn:
                assert conn.backend_pid != old_pid
                assert (await conn.execute("select 1")).rows == [(1,)]
            stats = pool.statistics()
            assert (stats.connects, stats.discarded) == (2, 1)
            # Noticed before lending, without a failed query: no rebuild needed.
            assert stats.generation == 0


async def test_connection_terminated_during_use_triggers_one_rebuild(
    pg_schema: PgSchema, pg_admin: PgAdmin, app_name: str
) -> None:
    async def fail_on(pool: PgPool, ready: trio.Event, go: trio.Event) -> None:
        async with pool.connection() as conn:
            ready.set()
            await go.wait()
            with pytest.raises(ConnectionLostError):
                await conn.execute("select 1")

    with trio.fail_after(10):
        async with open_pool(pg_schema.dsn, size=3, application_name=app_name) as pool:
            go = trio.Event()
            async with trio.open_nursery() as nursery:
                for _ in range(2):
                    ready = trio.Event()
                    nursery.start_soon(fail_on, pool, ready, go)
                    await ready.wait()
                # Both borrowed sessions die; the idle third one is fine.
                borrowed = [
                    pid
                    for pid in pg_admin.backends(app_name)
                    if pid not in {c.connection.backend_pid for c in pool._idle}
                ]
                for pid in borrowed:
                    await trio.to_thread.run_sync(partial(pg_admin.terminate, pid=pid))
                go.set()
            stats = pool.statistics()
            assert stats.generation == pool.generation == 1  # two failures, one rebuild
            assert stats.idle == 0  # the idle connection of generation 0 was closed
            assert stats.discarded == 3
            assert (await pid_of(pool)) not in borrowed
            assert pool.statistics().connects == 4


async def test_connection_left_in_a_transaction_is_not_reused(
    pg_schema: PgSchema, app_name: str
) -> None:
    with trio.fail_after(10):
        async with open_pool(pg_schema.dsn, size=1, application_name=app_name) as pool:
            async with pool.connection() as conn:
                await conn.execute("begin")
                first = conn.backend_pid
            async with pool.connection() as conn:
                assert conn.backend_pid != first
                assert conn.is_idle
            assert pool.statistics().generation == 0


async def test_waiting_is_fifo_and_cancellable(
    pg_schema: PgSchema, app_name: str
) -> None:
    order: list[int] = []

    async def borrow(pool: PgPool, n: int) -> None:
        async with pool.connection():
            order.append(n)

    with trio.fail_after(10):
        async with open_pool(pg_schema.dsn, size=1, application_name=app_name) as pool:
            async with trio.open_nursery() as nursery, pool.connection():
                for n in range(5):
                    nursery.start_soon(borrow, pool, n)
                    await trio.testing.wait_all_tasks_blocked()
                with trio.move_on_after(0.01) as scope:  # joins the queue, gives up
                    await borrow(pool, 99)
                assert scope.cancelled_caught
                assert pool.statistics().waiting == 5
            assert order == [0, 1, 2, 3, 4]
            assert pool.statistics().borrowed == 0


async def test_reconnects_are_spaced_by_the_backoff(
    pg_schema: PgSchema, app_name: str
) -> None:
    attempts: list[float] = []

    async def refuse() -> PgConnection:
        attempts.append(trio.current_time())
        raise ConnectionLostError("refused")

    backoff = Backoff(0.05, 1.0)
    with trio.fail_after(10):
        async with open_pool(
            pg_schema.dsn, size=1, application_name=app_name, backoff=backoff
        ) as pool:
            connect = pool._connect_fn
            pool._connect_fn = refuse
            for entry in pool._idle:
                entry.connection.close()  # force a reconnect
            for _ in range(3):
                with pytest.raises(ConnectionLostError):
                    await pid_of(pool)
            pool._connect_fn = connect
            assert await pid_of(pool) > 0
            stats = pool.statistics()
    gaps = [b - a for a, b in itertools.pairwise(attempts)]
    assert gaps[0] >= 0.05
    assert gaps[1] >= 0.1
    assert (stats.connect_failures, stats.connects) == (3, 2)


async def test_closing_the_pool(
    pg_schema: PgSchema, pg_admin: PgAdmin, app_name: str
) -> None:
    outcomes: list[str] = []

    async def hold(pool: PgPool, task_status: trio.TaskStatus[None]) -> None:
        async with pool.connection() as conn:
            task_status.started()
            await trio.sleep(0.5)
            try:
                await conn.execute("select 1")
            except trio.ClosedResourceError:
                outcomes.append("holder: closed")

    async def wait(pool: PgPool) -> None:
        try:
            await pid_of(pool)
        except trio.ClosedResourceError:
            outcomes.append("waiter: closed")

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            async with open_pool(
                pg_schema.dsn, size=1, application_name=app_name, close_grace=0.2
            ) as pool:
                await nursery.start(hold, pool)
                nursery.start_soon(wait, pool)
                await trio.testing.wait_all_tasks_blocked()
                started = time.perf_counter()
            closed_after = time.perf_counter() - started
            await wait_gone(pg_admin, app_name)
        assert 0.15 < closed_after < 0.45
        assert sorted(outcomes) == ["holder: closed", "waiter: closed"]
        with pytest.raises(trio.ClosedResourceError):
            await pid_of(pool)
        await pool.aclose()  # idempotent


async def test_close_waits_for_a_connection_coming_back(
    pg_schema: PgSchema, app_name: str
) -> None:
    async def hold_briefly(pool: PgPool, task_status: trio.TaskStatus[None]) -> None:
        async with pool.connection() as conn:
            task_status.started()
            await trio.sleep(0.1)
            await conn.execute("select 1")

    with trio.fail_after(10):
        async with (
            trio.open_nursery() as nursery,
            open_pool(
                pg_schema.dsn, size=2, application_name=app_name, close_grace=5
            ) as pool,
        ):
            await nursery.start(hold_briefly, pool)
        assert pool.statistics().discarded == 2


async def test_open_pool_failures(postgres_dsn: str, app_name: str) -> None:
    with trio.fail_after(10):
        with pytest.raises(ConfigError):
            async with open_pool(postgres_dsn, size=0, application_name=app_name):
                pass  # pragma: no cover
        with pytest.raises(ConfigError):
            async with open_pool(
                postgres_dsn, size=1, application_name=app_name, close_grace=-1
            ):
                pass  # pragma: no cover
        with pytest.raises(ConfigError):
            async with open_pool(
                postgres_dsn, size=2, application_name=app_name, recovery_timeout=-1
            ):
                pass  # pragma: no cover
        with pytest.raises(ConnectionLostError):
            async with open_pool(
                postgres_dsn + " dbname=no_such_database_here",
                size=2,
                application_name=app_name,
            ):
                pass  # pragma: no cover


async def test_errors_inside_the_block_keep_the_connection(
    pg_schema: PgSchema, app_name: str
) -> None:
    with trio.fail_after(10):
        async with open_pool(pg_schema.dsn, size=1, application_name=app_name) as pool:
            pid = await pid_of(pool)
            with pytest.raises(PgError):
                async with pool.connection() as conn:
                    await conn.execute("selec 1")
            with trio.move_on_after(0.1):
                async with pool.connection() as conn:
                    await conn.execute("select pg_sleep(5)")
            assert await pid_of(pool) == pid
            assert pool.statistics().discarded == 0


async def test_borrowing_checkpoints(pg_schema: PgSchema, app_name: str) -> None:
    with trio.fail_after(10):
        async with open_pool(pg_schema.dsn, size=1, application_name=app_name) as pool:
            with trio.testing.assert_checkpoints():
                async with pool.connection():
                    pass


async def test_execute_lends_gives_back_and_wakes_its_task_once(
    pg_schema: PgSchema, app_name: str
) -> None:
    with trio.fail_after(10):
        async with open_pool(pg_schema.dsn, size=1, application_name=app_name) as pool:
            pid = await pid_of(pool)
            with trio.testing.assert_checkpoints():
                result = await pool.execute("select $1::int8 + 1", [41])
            assert result.rows == [(42,)]
            with pytest.raises(PgError):
                await pool.execute("selec 1")
            with trio.move_on_after(0.1):
                await pool.execute("select pg_sleep(5)")
            assert await pid_of(pool) == pid  # given back every time
            assert pool.statistics().discarded == 0

            async def one(borrow: bool, steps: list[int]) -> None:
                counter = TaskSteps(trio.lowlevel.current_task())
                trio.lowlevel.add_instrument(counter)
                try:
                    if borrow:
                        async with pool.connection() as conn:
                            await conn.execute("select 1")
                    else:
                        await pool.execute("select 1")
                finally:
                    trio.lowlevel.remove_instrument(counter)
                steps.append(counter.steps)

            borrowed: list[int] = []
            direct: list[int] = []
            async with trio.open_nursery() as nursery:
                nursery.start_soon(one, True, borrowed)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(one, False, direct)
            # The statement's own wait is its only scheduling point.
            assert direct[0] == borrowed[0] - 1
