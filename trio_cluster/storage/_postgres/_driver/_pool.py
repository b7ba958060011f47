"""A small pool of PostgreSQL connections for message traffic (Trio driver).

Theory of operation: the pool lends at most ``size`` `PgConnection` s at a
time. A borrower first takes one of ``size`` slots (FIFO: a released slot goes
to the longest waiter, and waiting is cancellable), then the most recently
returned idle connection, or opens a new one if none is left.

Connections are replaced lazily. A connection returned broken is discarded,
and if it belonged to the current *generation* the generation is incremented
and every idle connection of the old generation is closed too: the failure
(server restart, network loss, hung server) most likely hit them as well. The
broken connections of the same generation that come back afterwards do not
trigger another rebuild. Before a connection is lent, a non-blocking read
notices a session the server already closed. Failed connection attempts are
spaced by a `Backoff` schedule; each borrow makes at most one attempt, so a
database outage surfaces as `ConnectionLostError` at a bounded rate.
"""

from __future__ import annotations

import random
from collections.abc import Awaitable, Callable
from contextlib import asynccontextmanager
from functools import partial
from typing import TYPE_CHECKING

import attrs
import trio

from trio_cluster._core._checks import non_negative_seconds, positive_count
from trio_cluster._core._retry import Backoff
from trio_cluster._errors import ClusterError, PersistenceError

from ._driver import PgConnection

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Mapping, Sequence

    from ._driver import PgResult

__all__ = ["PgPool", "PgPoolStatistics", "open_pool"]

_DEFAULT_BACKOFF = Backoff(0.05, 5.0, jitter=0.5)


@attrs.frozen
class PgPoolStatistics:
    """A snapshot of a pool's state and counters (`PgPool.statistics`)."""

    size: int
    """Most connections lent at once."""
    idle: int
    """Open connections waiting to be lent."""
    borrowed: int
    """Connections lent right now."""
    waiting: int
    """Tasks waiting for a connection."""
    generation: int
    """Rebuilds so far: incremented when a connection of the current
    generation comes back broken."""
    connects: int
    """Connections opened (initial ones included)."""
    connect_failures: int
    """Failed connection attempts."""
    discarded: int
    """Connections closed because they broke, were stale or left dirty."""
    statements: int
    """Statements sent by every connection the pool ever had."""
    round_trips: int
    """Round trips made by every connection the pool ever had."""


@attrs.define(eq=False)
class _Entry:
    connection: PgConnection
    generation: int


@attrs.define(eq=False)
class PgPool:
    """Up to ``size`` PostgreSQL connections shared by many tasks.

    Create it with `open_pool`; borrow with ``async with pool.connection()``.
    """

    _connect_fn: Callable[[], Awaitable[PgConnection]] = attrs.field(alias="connect")
    _size: int = attrs.field(kw_only=True)
    _backoff: Backoff = attrs.field(kw_only=True)
    _close_grace: float = attrs.field(kw_only=True)
    _random_unit: Callable[[], float] = attrs.field(default=random.random, kw_only=True)
    _idle: list[_Entry] = attrs.field(init=False, factory=list)
    _borrowed: set[_Entry] = attrs.field(init=False, factory=set)
    _free_slots: int = attrs.field(
        init=False, default=attrs.Factory(lambda self: self._size, takes_self=True)
    )
    _lot: trio.lowlevel.ParkingLot = attrs.field(
        init=False, factory=trio.lowlevel.ParkingLot
    )
    _closed: bool = attrs.field(init=False, default=False)
    _all_returned: trio.Event = attrs.field(init=False, factory=trio.Event)
    _generation: int = attrs.field(init=False, default=0)
    _failures: int = attrs.field(init=False, default=0)
    _retry_at: float = attrs.field(init=False, default=0.0)
    _connects: int = attrs.field(init=False, default=0)
    _connect_failures: int = attrs.field(init=False, default=0)
    _discarded: int = attrs.field(init=False, default=0)
    _retired_statements: int = attrs.field(init=False, default=0)
    _retired_round_trips: int = attrs.field(init=False, default=0)

    @property
    def generation(self) -> int:
        """The current generation (see the module docstring)."""
        return self._generation

    def statistics(self) -> PgPoolStatistics:
        """A snapshot of the pool's state and counters."""
        live = [e.connection.statistics() for e in [*self._idle, *self._borrowed]]
        return PgPoolStatistics(
            size=self._size,
            idle=len(self._idle),
            borrowed=len(self._borrowed),
            waiting=len(self._lot),
            generation=self._generation,
            connects=self._connects,
            connect_failures=self._connect_failures,
            discarded=self._discarded,
            statements=self._retired_statements + sum(s.statements for s in live),
            round_trips=self._retired_round_trips + sum(s.round_trips for s in live),
        )

    @asynccontextmanager
    async def connection(self) -> AsyncIterator[PgConnection]:
        """Borrow a connection for the duration of the block.

        Waiting is FIFO and cancellable. On exit (also on error or
        cancellation, after which the connection has drained itself back to
        idle) the connection goes back to the pool if it is idle; a broken one
        is discarded (see the module docstring); one left inside a transaction
        or still busy is closed.

        Raises:
            trio.ClosedResourceError: the pool is closed (also while waiting),
                or it was closed while the block used the connection.
            ConnectionLostError: a replacement connection could not be opened
                (after waiting out the reconnect backoff).
        """
        entry = await self._lend(checkpoint=True)
        try:
            yield entry.connection
        finally:
            self._return(entry)

    async def execute(self, query: str, params: Sequence[object] = ()) -> PgResult:
        """`PgConnection.execute` on a borrowed connection, given back at
        once. A free connection is lent without the scheduling point of
        `connection`: the statement's wait for its reply is one (a lone
        statement then wakes its task once, not twice).

        Raises:
            as `connection` and `PgConnection.execute`.

        Cancellation: as for both.
        """
        entry = await self._lend(checkpoint=False)
        try:
            return await entry.connection.execute(query, params)
        finally:
            self._return(entry)

    async def _lend(self, *, checkpoint: bool) -> _Entry:
        """Take a slot and a connection (see `connection`)."""
        await self._acquire_slot(checkpoint=checkpoint)
        try:
            entry = await self._take()
        except BaseException:
            self._release_slot()
            raise
        self._borrowed.add(entry)
        return entry

    def _return(self, entry: _Entry) -> None:
        self._borrowed.discard(entry)
        self._give_back(entry)
        self._release_slot()

    async def aclose(self) -> None:
        """Close the pool and all its connections.

        Tasks waiting for a connection get ``trio.ClosedResourceError``. Idle
        connections are closed at once. Borrowed ones get up to
        ``close_grace`` seconds to come back (shielded from cancellation);
        then they are closed too, and their operation in progress raises
        ``trio.ClosedResourceError``. Idempotent.
        """
        if self._closed:
            await trio.lowlevel.checkpoint()
            return
        self._closed = True
        self._lot.unpark_all()
        for entry in self._idle:
            self._discard(entry)
        self._idle.clear()
        if self._borrowed:
            with trio.CancelScope(shield=True) as scope:
                scope.deadline = trio.current_time() + self._close_grace
                await self._all_returned.wait()
            for entry in self._borrowed:
                entry.connection.close()
        else:
            await trio.lowlevel.checkpoint()

    async def _fill(self) -> None:
        """Open ``size`` connections concurrently; raise the first failure."""
        failures: list[ClusterError] = []

        async def open_one() -> None:
            try:
                self._idle.append(await self._connect())
            except ClusterError as exc:  # ConfigError, or the connection failed
                failures.append(exc)

        try:
            async with trio.open_nursery() as nursery:
                for _ in range(self._size):
                    nursery.start_soon(open_one)
            if failures:
                raise failures[0]
        except BaseException:
            await self.aclose()
            raise

    async def _acquire_slot(self, *, checkpoint: bool = True) -> None:
        """Take a slot; a free one at once (``checkpoint``: after a
        scheduling point), else wait for one (FIFO)."""
        await trio.lowlevel.checkpoint_if_cancelled()
        if self._closed:
            raise trio.ClosedResourceError("the PostgreSQL pool is closed")
        if self._free_slots and not self._lot:
            self._free_slots -= 1
            if checkpoint:
                await trio.lowlevel.cancel_shielded_checkpoint()
            return
        await self._lot.park()  # a releasing task hands its slot over to us
        if self._closed:
            raise trio.ClosedResourceError("the PostgreSQL pool was closed")

    def _release_slot(self) -> None:
        if self._lot:
            self._lot.unpark()
        else:
            self._free_slots += 1

    async def _take(self) -> _Entry:
        while self._idle:
            entry = self._idle.pop()
            current = entry.generation == self._generation
            if current and entry.connection.check_alive_nowait():
                return entry
            self._discard(entry)
        return await self._connect()

    async def _connect(self) -> _Entry:
        """One connection attempt, after the backoff delay of earlier failures."""
        if self._failures:
            await trio.sleep_until(self._retry_at)
        try:
            connection = await self._connect_fn()
        except PersistenceError:
            self._failures += 1
            self._connect_failures += 1
            delay = self._backoff.delay(self._failures - 1, self._random_unit())
            self._retry_at = trio.current_time() + delay
            raise
        self._failures = 0
        self._connects += 1
        return _Entry(connection, self._generation)

    def _give_back(self, entry: _Entry) -> None:
        connection = entry.connection
        if connection.is_broken and entry.generation == self._generation:
            # Rebuild: the other connections of this generation are suspect.
            self._generation += 1
            for idle in self._idle:
                self._discard(idle)
            self._idle.clear()
        if (
            self._closed
            or not connection.is_idle
            or entry.generation != self._generation
        ):
            self._discard(entry)
        else:
            self._idle.append(entry)
        if self._closed and not self._borrowed:
            self._all_returned.set()

    def _discard(self, entry: _Entry) -> None:
        stats = entry.connection.statistics()
        self._retired_statements += stats.statements
        self._retired_round_trips += stats.round_trips
        self._discarded += 1
        entry.connection.close()


@asynccontextmanager
async def open_pool(
    dsn: str,
    *,
    size: int,
    application_name: str,
    idle_session_timeout: float | None = None,
    settings: Mapping[str, str] | None = None,
    recovery_timeout: float = 2.0,
    max_prepared: int = 128,
    backoff: Backoff = _DEFAULT_BACKOFF,
    close_grace: float = 1.0,
    lazy: bool = False,
) -> AsyncIterator[PgPool]:
    """Open a pool of ``size`` connections for the duration of the block.

    The connections are opened concurrently before the block starts, or
    with ``lazy=True`` one by one when first needed.

    Args:
        dsn: A libpq connection string or URI.
        size: Most connections lent at once (>= 1).
        application_name: Shown in ``pg_stat_activity`` for every connection.
        idle_session_timeout: See `PgConnection.connect`.
        settings: See `PgConnection.connect`.
        recovery_timeout: See `PgConnection.connect`.
        max_prepared: See `PgConnection.connect`.
        backoff: Delays between failed connection attempts.
        close_grace: Seconds borrowed connections get to come back when the
            pool closes (see `PgPool.aclose`).
        lazy: Open no connection before the block (for a pool that may
            never be used).

    Raises:
        ConfigError: a bad argument or DSN (raised before any connection).
        ConnectionLostError: the initial connections could not be opened
            (those that were are closed again); never with ``lazy=True``.

    On cancellation while opening, the connections opened so far are closed.
    On exit (normal, error or cancellation) the pool is closed as `PgPool.aclose`
    describes.
    """
    positive_count("pool size", size)
    non_negative_seconds("close_grace", close_grace)
    connect = partial(
        PgConnection.connect,
        dsn,
        application_name=application_name,
        idle_session_timeout=idle_session_timeout,
        settings=settings,
        recovery_timeout=recovery_timeout,
        max_prepared=max_prepared,
    )
    pool = PgPool(connect, size=size, backoff=backoff, close_grace=close_grace)
    if lazy:
        await trio.lowlevel.checkpoint()
    else:
        await pool._fill()
    try:
        yield pool
    finally:
        await pool.aclose()
