"""`LockSession` reconnects at once after a stable generation is lost, and
backs off when its generations keep dying young (no server)."""

from __future__ import annotations

from typing import cast

import pytest
import trio

from trio_cluster import PersistenceError
from trio_cluster._core._retry import Backoff
from trio_cluster.storage._postgres._driver._driver import PgConnection
from trio_cluster.storage._postgres._driver._protocol import PgConnectionStatistics
from trio_cluster.storage._postgres._locks import Generation, LockSession


class FakeConnection:
    """What `LockSession` uses of a `PgConnection`: the server can end it."""

    def __init__(self) -> None:
        self.alive = True

    def check_alive_nowait(self) -> bool:
        return self.alive

    def close(self) -> None:
        self.alive = False

    def statistics(self) -> PgConnectionStatistics:
        return PgConnectionStatistics(0, 0, 0, 0, 0)


class Server:
    """Hands out connections and can end the current one."""

    def __init__(self) -> None:
        self.connects: list[float] = []
        self.current: FakeConnection | None = None

    async def connect(self) -> PgConnection:
        await trio.lowlevel.checkpoint()
        self.connects.append(trio.current_time())
        self.current = FakeConnection()
        return cast("PgConnection", self.current)

    def terminate(self) -> None:
        assert self.current is not None
        self.current.alive = False


async def _nothing(conn: PgConnection, state: Generation) -> int:
    await trio.lowlevel.checkpoint()
    return state.number


async def _restore(conn: PgConnection, state: Generation) -> None:
    await trio.lowlevel.checkpoint()


def session(server: Server, *, timeout: float = 3.0) -> LockSession:
    return LockSession(
        server.connect,
        operation_timeout=timeout,
        on_new_generation=_restore,
        backoff=Backoff(1.0, 4.0),
        stable_after=10.0,
        random_unit=lambda: 0.0,
    )


async def test_a_stable_generation_is_replaced_at_once(autojump_clock):
    server = Server()
    locks = session(server)
    assert await locks.run("op", _nothing) == 1
    await trio.sleep(30)
    server.terminate()
    assert await locks.run("op", _nothing) == 2
    await trio.sleep(30)
    server.terminate()
    assert await locks.run("op", _nothing) == 3
    assert server.connects == [0.0, 30.0, 60.0]


async def test_generations_that_die_young_are_replaced_after_a_backoff(
    autojump_clock,
):
    # Regression: something ending every new session within milliseconds (a
    # flapping network, an operator terminating the backends) made the runner
    # reconnect, take its liveness lock and its shards back at once, again
    # and again: the other runners kept seeing it live and never took over.
    server = Server()
    locks = session(server)
    start = trio.current_time()
    await locks.run("op", _nothing)
    await trio.sleep(20)  # a stable generation: its loss reconnects at once
    for _ in range(3):
        server.terminate()
        await locks.run("op", _nothing)
    assert [t - start for t in server.connects] == [0.0, 20.0, 21.0, 23.0]
    # The next wait (4 s) is longer than an operation may take: it fails
    # fast, saying why, without connecting.
    server.terminate()
    with pytest.raises(PersistenceError, match=r"down \(next attempt in 4\.00 s\)"):
        await locks.run("op", _nothing)
    assert len(server.connects) == 4
    await trio.sleep(4)
    assert await locks.run("op", _nothing) == 5
    assert server.connects[-1] - start == 27.0
    # A generation that lives long enough resets the backoff.
    await trio.sleep(10)
    server.terminate()
    await locks.run("op", _nothing)
    server.terminate()
    await locks.run("op", _nothing)
    assert [t - start for t in server.connects[-2:]] == [37.0, 38.0]


async def test_a_stalled_event_loop_does_not_lose_the_generation(autojump_clock):
    # Regression (W12): a burst of 100,000 stored workflow starts held the
    # event loop for seconds at a time (GC pauses, thousands of runnable
    # tasks); a lock operation whose answer waited unread past its deadline
    # was abandoned, the lock session ended and every shard was lost. Time
    # the loop stood still does not count against the deadline.
    server = Server()
    locks = session(server, timeout=1.0)

    async def stalled(conn: PgConnection, state: Generation) -> int:
        autojump_clock.jump(5.0)  # the loop stands still (a long GC)
        await trio.lowlevel.checkpoint()
        return state.number

    assert await locks.run("op", _nothing) == 1
    assert await locks.run("stalled op", stalled) == 1
    assert locks.statistics().losses == 0
    assert len(server.connects) == 1


async def test_an_operation_that_hangs_still_times_out(autojump_clock):
    server = Server()
    locks = session(server, timeout=1.0)
    assert await locks.run("op", _nothing) == 1

    async def hangs(conn: PgConnection, state: Generation) -> int:
        await trio.sleep_forever()
        raise AssertionError("unreachable")  # pragma: no cover

    start = trio.current_time()
    with pytest.raises(PersistenceError, match=r"did not finish within 1\.0 s"):
        await locks.run("hanging op", hangs)
    assert trio.current_time() - start == pytest.approx(1.0)
    assert locks.statistics().losses == 1
