"""A trio-native PostgreSQL connection over psycopg's libpq wrapper (Trio driver).

Theory of operation: `PgConnection` drives one ``psycopg.pq.PGconn`` in
non-blocking mode, waiting with ``trio.lowlevel.wait_readable/wait_writable``
(``reference/postgres-from-trio.md`` §2). Parameters (``$n``) are dumped by
``psycopg.adapt.Transformer`` in binary, typed by their Python type (int ->
int2/4/8 by value, str -> text, bytes -> bytea, aware datetime -> timestamptz,
list -> array; cast in SQL where needed); results are loaded from binary.
Prepared statements are cached per connection by query and parameter types; a
new one is prepared and run in one round trip (pipeline mode), and one the
server lost (``DISCARD ALL``) is prepared again and retried once when that is
safe. An interrupted operation (Trio cancellation or any exception) sends a
libpq cancel request and drains the results back to idle, shielded and bounded
by ``recovery_timeout``; past that (hung server) the connection is closed and
broken: it is never left half-read. One operation at a time: a second task
using a busy connection gets ``trio.BusyResourceError``, as with Trio streams.

The module is in three parts: `PgConnection` (here) has the public
operations and translates errors, ``._protocol`` has the wire-level steps
(planning, sending, reading, cancel-and-drain recovery), ``._connect``
opens connections.

Errors leave as `PgError`/`ConnectionLostError` (``._errors``) with the
psycopg exception as ``__cause__``. A closed connection raises
``trio.ClosedResourceError`` ("you closed it"), a broken one
`ConnectionLostError` ("it broke").
"""

from __future__ import annotations

from contextlib import asynccontextmanager, contextmanager
from functools import partial
from typing import TYPE_CHECKING

import psycopg
import trio
from psycopg import pq

from trio_cluster._core._checks import count, non_negative_seconds
from trio_cluster._errors import ClusterInternalError

from ._connect import build_conninfo, connect_pgconn, finish_pgconn, quote_ident
from ._errors import (
    ConnectionLostError,
    PgError,
    error_from_result,
    is_session_fatal,
    translate,
)
from ._protocol import (
    Command,
    CommandKind,
    PgConnectionStatistics,
    PgNotification,
    PgProtocol,
    PgResult,
    Statements,
)

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Iterator, Mapping, Sequence

__all__ = [
    "PgConnection",
    "PgConnectionStatistics",
    "PgNotification",
    "PgResult",
    "build_conninfo",
]

_TS = pq.TransactionStatus
_IN_TX = (_TS.INTRANS, _TS.INERROR)


class PgConnection(PgProtocol, trio.abc.AsyncResource):
    """One PostgreSQL session driven from Trio; open it with `connect`.

    ``async with await PgConnection.connect(...) as conn:`` closes it on exit.
    Not for concurrent use: see the module docstring.
    """

    @classmethod
    async def connect(
        cls,
        dsn: str,
        *,
        application_name: str,
        idle_session_timeout: float | None = None,
        settings: Mapping[str, str] | None = None,
        recovery_timeout: float = 2.0,
        max_prepared: int = 128,
    ) -> PgConnection:
        """Open a connection.

        Args:
            dsn: A libpq connection string or URI (a host name is resolved
                with Trio).
            application_name: Shown in ``pg_stat_activity``.
            idle_session_timeout: The server ends the session once it has been
                idle this long (s): a frozen runner loses its advisory locks.
            settings: More session settings, e.g. ``{"lock_timeout": "1s"}``.
            recovery_timeout: Seconds allowed to cancel and drain an
                interrupted operation; past that (``0``: at once, without a
                cancel request) the connection is closed and broken.
            max_prepared: Statements kept prepared; beyond, run unprepared.

        Raises:
            ConfigError: a malformed DSN or a bad argument.
            ConnectionLostError: the server could not be reached or refused.

        On cancellation the half-open connection is closed; nothing leaks.
        """
        non_negative_seconds("recovery_timeout", recovery_timeout)
        count("max_prepared", max_prepared)
        params = build_conninfo(
            dsn,
            application_name=application_name,
            idle_session_timeout=idle_session_timeout,
            settings=settings,
        )
        pgconn = await connect_pgconn(params)
        return cls(pgconn, recovery_timeout=recovery_timeout, max_prepared=max_prepared)

    @property
    def is_broken(self) -> bool:
        """Whether the connection failed (operations raise `ConnectionLostError`)."""
        return self._broken is not None

    @property
    def recovery_timeout(self) -> float:
        """Seconds allowed to cancel and drain an interrupted operation, or
        to run a cleanup (``ROLLBACK``) shielded from cancellation."""
        return self._recovery_timeout

    @property
    def is_idle(self) -> bool:
        """Open, not broken, not in use, and no transaction open on the server."""
        usable = not self._closed and self._broken is None and not self._busy
        return usable and self._pgconn.transaction_status == _TS.IDLE

    def statistics(self) -> PgConnectionStatistics:
        """A snapshot of the statement, round-trip and cancel counters."""
        return PgConnectionStatistics(**self._counts)

    def close(self) -> None:
        """Close now (idempotent). An operation in progress in another task
        raises ``trio.ClosedResourceError``."""
        if not self._closed:
            self._closed = True
            finish_pgconn(self._pgconn)

    async def aclose(self) -> None:
        """Close (see `close`); a checkpoint that never blocks."""
        self.close()
        await trio.lowlevel.checkpoint()

    def check_alive_nowait(self) -> bool:
        """Read, without blocking, what the server sent to the idle connection.

        Returns:
            False (the connection is now broken) if the server closed the
            session, e.g. ``pg_terminate_backend`` or a restart; else True.
        """
        if self._closed or self._broken is not None:
            return False
        if self._busy or not self._idle_poll.poll(0):
            return True  # in use, or the server sent nothing (nor closed)
        try:
            # The first read may only get the server's goodbye message; the
            # second one sees the end of the stream.
            self._pgconn.consume_input()
            self._pgconn.consume_input()
            if self._pgconn.status == pq.ConnStatus.BAD:
                raise psycopg.OperationalError("connection closed")
        except psycopg.OperationalError as exc:
            self._mark_broken(f"server closed the connection: {exc}")
            return False
        self._collect_notifications()
        return True

    @contextmanager
    def _operation(self) -> Iterator[None]:
        """Claim the connection for one operation and translate its errors."""
        if self._closed:
            raise trio.ClosedResourceError("the PostgreSQL connection was closed")
        if self._broken is not None:
            raise ConnectionLostError(f"PostgreSQL connection broken: {self._broken}")
        if self._busy:
            msg = "another task is using this PostgreSQL connection (borrow your own)"
            raise trio.BusyResourceError(msg)
        self._busy = True
        try:
            yield
        except (psycopg.Error, OSError) as exc:
            lost = self.is_broken or is_session_fatal(exc)
            if lost or self._pgconn.status == pq.ConnStatus.BAD:
                self._mark_broken(str(exc).strip() or type(exc).__name__)
            raise translate(exc, lost=self.is_broken) from exc
        finally:
            self._busy = False

    async def execute(
        self, query: str, params: Sequence[object] = (), *, prepare: bool = True
    ) -> PgResult:
        """Run one statement with ``$n`` parameters, in one round trip.

        Args:
            query: One SQL statement; the parameters are ``$1``, ``$2``...
            params: The parameter values.
            prepare: Keep the statement prepared for later calls; False for
                statements built dynamically.

        Returns:
            The rows, row count and command tag.

        Raises:
            PgError: the statement failed (see ``sqlstate``).
            ConnectionLostError: the connection failed and is now broken.
            trio.BusyResourceError: another task is using the connection.
            trio.ClosedResourceError: the connection was closed.

        On cancellation the statement is cancelled and the connection drained
        back to idle (within ``recovery_timeout``, else it is broken); whether
        the statement took effect is unknown. An aborted transaction stays
        aborted inside `transaction`, and is rolled back outside.
        """
        await trio.lowlevel.checkpoint_if_cancelled()
        with self._operation():
            groups = await self._execute_commands([(query, params)], prepare)
            return self._make_result(groups[0][0])

    async def execute_pipeline(
        self, statements: Statements, *, prepare: bool = True
    ) -> list[PgResult]:
        """Run several ``(query, params)`` statements in one round trip.

        Uses libpq pipeline mode with one Sync: outside a transaction the
        statements form one implicit transaction, so if one fails none takes
        effect. Do not put ``BEGIN``/``COMMIT`` in a pipeline.

        Returns:
            One result per statement, in order.

        Raises:
            PgError: the first failing statement (the server skipped the later
                ones); the connection stays usable. Otherwise as `execute`.

        Arguments and cancellation: as for `execute`.
        """
        await trio.lowlevel.checkpoint_if_cancelled()
        if not statements:
            await trio.lowlevel.cancel_shielded_checkpoint()
            return []
        with self._operation():
            groups = await self._execute_commands(statements, prepare)
            return [self._make_result(group[0]) for group in groups]

    async def execute_script(self, sql: str) -> list[PgResult]:
        """Run a multi-statement script (simple query protocol, no parameters).

        For DDL; returns one result per statement, loaded from text format.

        Raises:
            PgError: the first failing statement; those before it took effect
                unless the script runs in a transaction. Otherwise as `execute`.

        Cancellation: as for `execute`.
        """
        await trio.lowlevel.checkpoint_if_cancelled()
        with self._operation():
            send = partial(self._pgconn.send_query, sql.encode())
            command = Command(CommandKind.SCRIPT, send)
            groups = await self._run([command])
            if failed := self._absorb([command], groups):
                raise error_from_result(failed[1], self._tx.encoding)
            return [self._make_result(result) for result in groups[0]]

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[None]:
        """``BEGIN`` ... ``COMMIT``, or ``ROLLBACK`` if the block raises.

        Raises:
            ClusterInternalError: a transaction is already open (no nesting).
            PgError: ``COMMIT`` failed, or found the transaction aborted by an
                error the block caught (``sqlstate`` ``"25P02"``).

        On an exception or cancellation in the block, the transaction is rolled
        back in a shielded scope bounded by ``recovery_timeout`` (if that fails
        the connection is broken), then the exception propagates. If ``COMMIT``
        itself is cancelled, its outcome is unknown.
        """
        if self._in_transaction or self._pgconn.transaction_status in _IN_TX:
            msg = "a transaction is already open: transaction() does not nest"
            raise ClusterInternalError(msg)
        await self.execute("BEGIN", prepare=False)
        self._in_transaction = True
        try:
            yield
        except BaseException:
            self._in_transaction = False
            await self._rollback_quietly()
            raise
        self._in_transaction = False
        try:
            result = await self.execute("COMMIT", prepare=False)
        except BaseException:
            await self._rollback_quietly()
            raise
        if result.status == "ROLLBACK":
            msg = "COMMIT rolled back: a statement in the transaction had failed"
            raise PgError(msg, sqlstate="25P02")

    async def listen(self, channel: str) -> None:
        """``LISTEN`` on ``channel``; notifications queue up for
        `wait_notifications`. Errors and cancellation: as for `execute`."""
        await self.execute(f"LISTEN {quote_ident(channel)}", prepare=False)

    async def wait_notifications(self) -> list[PgNotification]:
        """Wait until at least one notification is pending; return them all.

        Notifications that arrived during other operations return at once.
        The connection is busy while waiting.

        Raises:
            ConnectionLostError: the server ended the session or the socket
                failed (a clean close is noticed within milliseconds).

        Cancellation leaves the connection idle, notifications stay queued.
        """
        await trio.lowlevel.checkpoint_if_cancelled()
        with self._operation():
            if self._notifications:
                await trio.lowlevel.cancel_shielded_checkpoint()
            while not self._notifications:
                await trio.lowlevel.wait_readable(self._pgconn.socket)
                self._pgconn.consume_input()
                if self._pgconn.status == pq.ConnStatus.BAD:
                    raise psycopg.OperationalError(self._pgconn.get_error_message())
                self._collect_notifications()
            notifications = list(self._notifications)
            self._notifications.clear()
            return notifications

    async def _rollback_quietly(self) -> None:
        """ROLLBACK an open transaction, or break the connection."""
        if self._closed or self._broken is not None or self._busy:
            return
        if self._pgconn.transaction_status in _IN_TX:
            with self._bounded_cleanup("ROLLBACK"), self._operation():
                await self._rollback_now()
