"""The dedicated lock connection of a storage session, rebuilt per generation (Trio driver).

Theory of operation. One PostgreSQL session (the *lock connection*) holds a
storage session's advisory locks: the shard locks and the runner's liveness
lock. Its server-side ``idle_session_timeout`` is the lease: a runner that
stops calling (frozen, partitioned) loses its locks on the server after one
lease, without any help from the client.

`LockSession.run` serializes the users of the connection (one statement
stream at a time; a `trio.Lock` hands it over in FIFO order) and runs each
operation under a deadline (``operation_timeout``, of running time: a stall
of the event loop does not count, see `trio_cluster._stalls`). The connection belongs to
a *generation*; the generation state (`Generation`: the shards held and
whether the liveness lock is held) is only valid while that connection lives.
Whenever the connection fails, times out, or is interrupted (the outcome of a
lock statement is then unknown), it is closed and its generation is *lost*:
the server frees its locks as the backend exits. The next operation opens a
new connection, a new generation, after a `Backoff` delay if connecting
failed before or if the lost generation was short-lived (it lived less than
``stable_after``); only one rebuild runs at a time, since operations take
turns. The second rule matters when something keeps ending the runner's
sessions (an operator terminating its backends, a flapping network): a runner
that reconnected at once would take its liveness lock and its shards back
within milliseconds of every loss, the other runners would keep seeing it live,
and none of them would take over. Backing off leaves it without a session for
growing stretches, long enough for the others' membership polls to see it gone;
a single loss after a stable session still reconnects at once.
If an operation fails because the connection was already dead, it is tried
once more on a new connection: the dead session held nothing any more, so a
fresh one answers truthfully (e.g. ``refresh`` reports every shard gone).

Loss detection: `wait_session_lost` parks on the *idle* connection's socket
(``PgConnection.wait_notifications``, which raises the moment the server
closes the session: milliseconds after ``pg_terminate_backend``, a restart or
the idle timeout). An operation that needs the connection first cancels that
wait (both hold the same lock, so they never use the connection at once), and
the waiter resumes watching when the operations are done. A loss found by an
operation is reported the same way. Each generation's loss is reported once.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Awaitable, Callable
from typing import TypeVar

import attrs
import trio

from trio_cluster._core._addresses import ShardId
from trio_cluster._core._retry import Backoff
from trio_cluster._errors import PersistenceError
from trio_cluster._stalls import move_on_after_unstalled

from ._driver._driver import PgConnection
from ._driver._errors import ConnectionLostError

__all__ = ["Generation", "LockSession", "LockSessionStatistics"]

log = logging.getLogger("trio_cluster.storage.postgres")

T = TypeVar("T")

DEFAULT_BACKOFF = Backoff(0.05, 2.0, jitter=0.5)
DEFAULT_STABLE_AFTER = 2.0
"""Seconds a generation must live for its loss to be reconnected at once."""


@attrs.define(eq=False)
class Generation:
    """What one lock connection (one server session) holds."""

    number: int
    held: dict[ShardId, tuple[int, int]] = attrs.Factory(dict)
    """Shards locked by this session: shard -> (lock key, epoch)."""
    live_id: int | None = None
    """Runner row whose liveness lock this session holds."""


@attrs.frozen
class LockSessionStatistics:
    """A snapshot of a lock session's counters."""

    generation: int
    """Lock connections opened so far (the current one's number)."""
    statements: int
    """Statements sent on every lock connection of the session."""
    round_trips: int
    """Round trips made on every lock connection of the session."""
    losses: int
    """Generations lost (connection died, failed or timed out)."""


# NOTE: no slots, so that fault tests can hang one session's `run`.
@attrs.define(eq=False, slots=False)
class LockSession:
    """The lock connection of one storage session (see the module docstring).

    Args:
        connect: opens a new connection (with the lease as its
            ``idle_session_timeout``).
        operation_timeout: deadline of each operation, in seconds.
        on_new_generation: awaited with each new connection and its
            generation before it is used (e.g. to restore the liveness lock).
        backoff: delays between failed connection attempts, and before
            reconnecting after the loss of a short-lived generation.
        stable_after: a generation lost sooner than this many seconds after
            it began counts as a failure for the backoff; one that lived
            longer resets it.
    """

    _connect: Callable[[], Awaitable[PgConnection]]
    _timeout: float = attrs.field(alias="operation_timeout", kw_only=True)
    _on_new_generation: Callable[[PgConnection, Generation], Awaitable[None]] = (
        attrs.field(kw_only=True)
    )
    _backoff: Backoff = attrs.field(default=DEFAULT_BACKOFF, kw_only=True)
    _stable_after: float = attrs.field(
        default=DEFAULT_STABLE_AFTER, kw_only=True, alias="stable_after"
    )
    _random_unit: Callable[[], float] = attrs.field(default=random.random, kw_only=True)
    _conn: PgConnection | None = attrs.field(init=False, default=None)
    state: Generation = attrs.field(init=False, factory=lambda: Generation(0))
    """The current generation (number 0: not connected yet)."""
    _lost: trio.Event = attrs.field(init=False, factory=trio.Event)
    _renewed: trio.Event = attrs.field(init=False, factory=trio.Event)
    _reported: trio.Event | None = attrs.field(init=False, default=None)
    _mutex: trio.Lock = attrs.field(init=False, factory=trio.Lock)
    _ops: int = attrs.field(init=False, default=0)
    _watching: bool = attrs.field(init=False, default=False)
    _watch_scope: trio.CancelScope | None = attrs.field(init=False, default=None)
    _changes: trio.lowlevel.ParkingLot = attrs.field(
        init=False, factory=trio.lowlevel.ParkingLot
    )
    _failures: int = attrs.field(init=False, default=0)
    _retry_at: float = attrs.field(init=False, default=-math.inf)
    _began: float = attrs.field(init=False, default=-math.inf)
    _last_error: str = attrs.field(init=False, default="")
    _closed: bool = attrs.field(init=False, default=False)
    _losses: int = attrs.field(init=False, default=0)
    _retired_statements: int = attrs.field(init=False, default=0)
    _retired_round_trips: int = attrs.field(init=False, default=0)

    @property
    def backend_pid(self) -> int | None:
        """Server pid of the current lock connection, if any (tests, status)."""
        return None if self._conn is None else self._conn.backend_pid

    def statistics(self) -> LockSessionStatistics:
        statements, round_trips = self._retired_statements, self._retired_round_trips
        if self._conn is not None:
            stats = self._conn.statistics()
            statements += stats.statements
            round_trips += stats.round_trips
        return LockSessionStatistics(
            generation=self.state.number,
            statements=statements,
            round_trips=round_trips,
            losses=self._losses,
        )

    # ------------------------------------------------------------------
    # Operations

    async def run(
        self, what: str, operation: Callable[[PgConnection, Generation], Awaitable[T]]
    ) -> T:
        """Run ``operation(connection, generation)`` on the lock connection.

        Raises:
            PersistenceError: the operation failed or did not finish within
                ``operation_timeout``; the connection was then closed and its
                generation lost.
            trio.ClosedResourceError: the session is closed.

        On cancellation the operation's outcome is unknown, so the connection
        is closed and its generation lost (its locks are freed).
        """
        await trio.lowlevel.checkpoint_if_cancelled()
        if self._closed:
            raise trio.ClosedResourceError("the storage session is closed")
        self._ops += 1
        if self._watch_scope is not None:
            self._watch_scope.cancel()  # hand the connection over to us
        try:
            # NOTE: the deadline does not count the time the event loop stood
            # still (a long GC, a burst of runnable tasks): the server's answer
            # may be waiting unread, and abandoning the statement would end
            # the session and every lock (see `trio_cluster._stalls`).
            with move_on_after_unstalled(self._timeout):
                async with self._mutex:
                    return await self._attempt(what, operation)
            raise PersistenceError(
                f"{what} did not finish within {self._timeout} s of running time"
                " (the lock connection is reset if it was in use)"
            )
        finally:
            self._ops -= 1
            self._changes.unpark_all()

    async def _attempt(
        self, what: str, operation: Callable[[PgConnection, Generation], Awaitable[T]]
    ) -> T:
        for attempt in (1, 2):
            conn = await self._ensure()
            try:
                return await operation(conn, self.state)
            except ConnectionLostError as exc:
                self._lose(conn, f"{what} failed: {exc}")
                if attempt == 2 or self._closed:
                    raise
            except BaseException as exc:
                # Unknown outcome (cancelled, timed out, a statement failed):
                # what this session holds is uncertain, so end the session.
                self._lose(conn, f"{what} interrupted: {exc!r}")
                raise
        raise AssertionError("unreachable")  # pragma: no cover

    async def _ensure(self) -> PgConnection:
        """The current connection, or a new one (a new generation)."""
        conn = self._conn
        if conn is not None:
            if conn.check_alive_nowait():
                return conn
            self._lose(conn, "the server ended the lock session")
        if self._closed:
            raise trio.ClosedResourceError("the storage session is closed")
        wait = self._retry_at - trio.current_time()
        if wait > 0:
            if wait > self._timeout:
                raise PersistenceError(
                    f"the lock connection is down (next attempt in {wait:.2f} s):"
                    f" {self._last_error}"
                )
            await trio.sleep(wait)
        try:
            conn = await self._connect()
        except PersistenceError as exc:
            self._failed(str(exc))
            raise
        self._retry_at = -math.inf
        self._began = trio.current_time()
        self._conn = conn
        self.state = Generation(self.state.number + 1)
        if self.state.number > 1:
            self._lost = trio.Event()
            self._renewed.set()
            self._renewed = trio.Event()
        self._changes.unpark_all()
        try:
            await self._on_new_generation(conn, self.state)
        except BaseException as exc:
            self._lose(conn, f"setting up the new lock session failed: {exc!r}")
            raise
        return conn

    def _lose(self, conn: PgConnection, reason: str) -> None:
        """Close ``conn``; if it is the current one, its generation is lost."""
        stats = conn.statistics()
        conn.close()
        if conn is not self._conn:
            return
        self._retired_statements += stats.statements
        self._retired_round_trips += stats.round_trips
        self._conn = None
        self._losses += 1
        if not self._closed:
            log.warning(
                "lock session generation %d lost: %s", self.state.number, reason
            )
            if trio.current_time() - self._began < self._stable_after:
                self._failed(reason)
            else:
                self._failures = 0
        self._lost.set()
        self._changes.unpark_all()

    def _failed(self, reason: str) -> None:
        """A connection attempt failed, or a short-lived generation was lost:
        the next attempt waits for the backoff."""
        self._failures += 1
        self._last_error = reason
        delay = self._backoff.delay(self._failures - 1, self._random_unit())
        self._retry_at = trio.current_time() + delay

    # ------------------------------------------------------------------
    # Loss detection

    async def wait_session_lost(self) -> None:
        """Return once the current generation is lost (reported once each).

        Raises:
            trio.ClosedResourceError: never; a closed session counts as lost.

        Cancellation-safe: the connection is left idle and usable.
        """
        await trio.lowlevel.checkpoint()
        while self._lost is self._reported:
            await self._renewed.wait()
        lost = self._lost
        while not lost.is_set():
            await self._watch_once(lost)
        self._reported = lost

    def _in_use(self, conn: PgConnection) -> bool:
        """Whether an operation wants the connection, or it was replaced."""
        return self._ops > 0 or self._conn is not conn

    async def _watch_once(self, lost: trio.Event) -> None:
        conn = self._conn
        if self._watching or self._ops or conn is None:
            await self._changes.park()  # any change of state unparks us
            return
        self._watching = True
        try:
            async with self._mutex:  # free: no operation is running
                if self._in_use(conn) or lost.is_set():
                    return
                with trio.CancelScope() as scope:
                    self._watch_scope = scope
                    try:
                        await conn.wait_notifications()
                    except PersistenceError as exc:
                        self._lose(conn, f"the lock connection died: {exc}")
                    except trio.ClosedResourceError:
                        pass  # closed meanwhile; whoever closed it reported it
                    finally:
                        self._watch_scope = None
        finally:
            self._watching = False
            self._changes.unpark_all()

    # ------------------------------------------------------------------
    # Closing

    async def aclose(
        self, cleanup: Callable[[PgConnection, Generation], Awaitable[None]]
    ) -> None:
        """Run ``cleanup`` (bounded, shielded from cancellation), then close.

        ``cleanup`` should unlock everything; if it fails (e.g. the server is
        down), closing the connection frees the locks on the server anyway.
        """
        if self._closed:
            await trio.lowlevel.checkpoint()
            return
        with trio.CancelScope(shield=True):
            try:
                await self.run("closing the lock session", cleanup)
            except (PersistenceError, trio.ClosedResourceError) as exc:
                log.warning("could not release the locks cleanly: %s", exc)
        self._closed = True
        if self._conn is not None:
            self._lose(self._conn, "closed")
        self._lost.set()
        self._changes.unpark_all()
