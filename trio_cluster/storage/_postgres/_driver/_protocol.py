"""The libpq protocol engine under `PgConnection` (Trio driver, part of `._driver`).

`PgProtocol` holds one non-blocking ``PGconn`` and its state (prepared
statements, counters, queued notifications) and implements the wire-level
steps: planning statements into libpq commands (binary parameters through
``psycopg.adapt.Transformer``, prepared statements cached by query and
parameter types), sending them (pipelined when several), reading every
result back, and recovering from an interruption: a libpq cancel request,
resent if the server has not answered, and a drain back to idle, shielded
and bounded by ``recovery_timeout``, else the connection is broken (closed).
`PgConnection` adds the public operations and the error translation.
"""

from __future__ import annotations

import enum
import logging
import select
from collections import deque
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from functools import partial
from typing import TYPE_CHECKING, Any, TypeAlias

import attrs
import psycopg
import trio
from psycopg import pq
from psycopg.adapt import PyFormat, Transformer

from ._connect import finish_pgconn, poll_until_ok, wait_readable_or_writable
from ._errors import PgError, error_from_result

if TYPE_CHECKING:
    from collections.abc import Iterator

    from psycopg.abc import Buffer

__all__ = [
    "Command",
    "CommandKind",
    "PgConnectionStatistics",
    "PgNotification",
    "PgProtocol",
    "PgResult",
    "Statements",
]

logger = logging.getLogger("trio_cluster.storage.postgres")

Row: TypeAlias = tuple[Any, ...]
Statements: TypeAlias = Sequence[tuple[str, Sequence[object]]]
_Key: TypeAlias = tuple[str, tuple[int, ...]]
_Result: TypeAlias = pq.abc.PGresult

_ES = pq.ExecStatus
_TS = pq.TransactionStatus
_COPY_STATES = frozenset({_ES.COPY_IN, _ES.COPY_OUT, _ES.COPY_BOTH})
_STATEMENTS_GONE = (b"DISCARD ALL", b"DEALLOCATE ALL")
# Resend the cancel request if the server has not answered by then: the first
# one can overtake the statement and be ignored by a backend not yet busy.
_CANCEL_RESEND_INTERVAL = 0.25
_COUNTERS = ("statements", "round_trips", "prepares", "cancels", "notifications")


@attrs.frozen
class PgResult:
    """The outcome of one statement."""

    rows: list[Row]
    """The rows returned, as tuples (empty for commands without rows)."""
    rowcount: int
    """Rows returned or affected, from the command tag; -1 if it has none."""
    status: str
    """The command tag, for example ``"INSERT 0 10000"``."""
    columns: tuple[str, ...] = ()
    """The column names of ``rows``."""


@attrs.frozen
class PgNotification:
    """A ``NOTIFY`` received on a channel the connection listens to."""

    channel: str
    """The channel name."""
    payload: str
    """The payload (empty string if none)."""
    pid: int
    """Backend process id of the notifying session."""


@attrs.frozen
class PgConnectionStatistics:
    """A snapshot of a connection's counters (`PgConnection.statistics`)."""

    statements: int
    """Statements sent: one per `PgConnection.execute`, per pipeline item and
    per statement of a script, ``BEGIN``/``COMMIT``/``ROLLBACK`` included."""
    round_trips: int
    """Request/response exchanges with the server; a pipeline counts once."""
    prepares: int
    """Statements prepared on the server."""
    cancels: int
    """Cancel requests sent after interrupted operations."""
    notifications: int
    """Notifications received."""


class CommandKind(enum.Enum):
    """What a `Command` sends, so what its results mean."""

    STATEMENT = enum.auto()
    """One statement (prepared or not): its results are returned."""
    SCRIPT = enum.auto()
    """A script of statements (simple query protocol)."""
    PREPARE = enum.auto()
    """Prepares a statement on the server (no rows)."""


@attrs.frozen
class Command:
    """One command queued in libpq, and what its results mean."""

    kind: CommandKind
    send: Callable[[], None]
    key: _Key | None = None
    name: bytes | None = None


class PgProtocol:
    """One ``PGconn`` and the wire-level steps of `PgConnection` (see the
    module docstring); not used on its own."""

    def __init__(
        self, pgconn: pq.abc.PGconn, *, recovery_timeout: float, max_prepared: int
    ) -> None:
        self._pgconn = pgconn
        self._tx = Transformer(None)
        self._recovery_timeout = recovery_timeout
        self._max_prepared = max_prepared
        self._nonblocking_cancel = psycopg.capabilities.has_cancel_safe()
        self._closed = False
        self._broken: str | None = None
        self._busy = False
        self._in_transaction = False
        self._sync_pending = False
        self._prepared: dict[_Key, bytes] = {}
        self._names = 0
        self._notifications: deque[PgNotification] = deque()
        self._counts = dict.fromkeys(_COUNTERS, 0)
        # Whether the idle socket has anything to read: one system call, where
        # reading it (libpq's) takes two when there is nothing.
        self._idle_poll = select.poll()
        self._idle_poll.register(pgconn.socket, select.POLLIN)
        self.backend_pid: int = pgconn.backend_pid
        """The server process id of the session (for ``pg_terminate_backend``)."""
        pgconn.notice_handler = self._log_notice

    def _mark_broken(self, reason: str) -> None:
        if self._broken is None and not self._closed:
            logger.warning("PostgreSQL session %d broken: %s", self.backend_pid, reason)
            self._broken = reason
            finish_pgconn(self._pgconn)

    def _log_notice(self, result: _Result) -> None:
        severity = result.error_field(pq.DiagnosticField.SEVERITY_NONLOCALIZED)
        level = logging.WARNING if severity == b"WARNING" else logging.DEBUG
        logger.log(level, "PostgreSQL %s", result.get_error_message().strip())

    def _plan(self, statements: Statements, prepare: bool) -> list[Command]:
        """Dump the parameters and turn the statements into libpq commands."""
        pgconn, commands, new = self._pgconn, list[Command](), dict[_Key, bytes]()
        for query, params in statements:
            values: list[Buffer | None] | None = None
            types: tuple[int, ...] = ()
            formats: list[pq.Format] | None = None
            if params:
                dumped = self._tx.dump_sequence(params, [PyFormat.BINARY] * len(params))
                values, types = list(dumped), tuple(self._tx.types or ())
                formats = list(self._tx.formats or ())
            text, key = query.encode(), (query, types)
            name = (self._prepared.get(key) or new.get(key)) if prepare else None
            room = len(self._prepared) + len(new) < self._max_prepared
            if prepare and name is None and room:
                self._names += 1
                name = new[key] = b"_tc%d" % self._names
                send = partial(pgconn.send_prepare, name, text, types or None)
                commands.append(Command(CommandKind.PREPARE, send, key, name))
            if name is None:
                send = partial(pgconn.send_query_params, text, values, types or None)
            else:
                send = partial(pgconn.send_query_prepared, name, values)
            send = partial(send, param_formats=formats, result_format=pq.Format.BINARY)
            commands.append(Command(CommandKind.STATEMENT, send, key, name))
        return commands

    async def _execute_commands(
        self, statements: Statements, prepare: bool
    ) -> list[list[_Result]]:
        """Plan, run and check statements; return the statements' result groups.

        If the server lost a cached statement (SQLSTATE 26000, e.g. after a
        ``DEALLOCATE``), forget it and retry, unless a transaction was (or
        still is) open: a failed statement or pipeline took no effect.
        """
        while True:
            was_idle = self._pgconn.transaction_status == _TS.IDLE
            commands = self._plan(statements, prepare)
            groups = await self._run(commands)
            if not (failed := self._absorb(commands, groups)):
                pairs = zip(commands, groups, strict=True)
                return [g for c, g in pairs if c.kind is CommandKind.STATEMENT]
            error = error_from_result(failed[1], self._tx.encoding)
            key = failed[0].key if failed[0].kind is CommandKind.STATEMENT else None
            stale = error.sqlstate == "26000" and key in self._prepared
            if stale and key is not None:
                del self._prepared[key]
            if not (stale and was_idle and self._pgconn.transaction_status == _TS.IDLE):
                raise error

    def _absorb(
        self, commands: Sequence[Command], groups: Sequence[list[_Result]]
    ) -> tuple[Command, _Result] | None:
        """Update the statement cache and the counters; return the first error."""
        failed: tuple[Command, _Result] | None = None
        for command, group in zip(commands, groups, strict=True):
            ok = True
            for result in group:
                if result.status in (_ES.FATAL_ERROR, _ES.PIPELINE_ABORTED):
                    ok = False
                    if result.status == _ES.FATAL_ERROR and failed is None:
                        failed = (command, result)
                elif result.command_status in _STATEMENTS_GONE:
                    self._prepared.clear()
            if command.kind is CommandKind.STATEMENT:
                self._counts["statements"] += 1
            elif command.kind is CommandKind.SCRIPT:
                self._counts["statements"] += len(group)
            elif ok and command.key and command.name:  # a PREPARE that succeeded
                self._prepared[command.key] = command.name
                self._counts["prepares"] += 1
        return failed

    def _make_result(self, result: _Result) -> PgResult:
        if result.status in _COPY_STATES:
            raise psycopg.NotSupportedError("COPY is not supported by this driver")
        rows: list[Row] = []
        if result.status == _ES.TUPLES_OK:
            self._tx.set_pgresult(result)
            try:
                rows = self._tx.load_rows(0, result.ntuples, tuple)
            finally:
                self._tx.set_pgresult(None)
        count = result.command_tuples
        names = [result.fname(i) or b"" for i in range(result.nfields)]
        return PgResult(
            rows=rows,
            rowcount=-1 if count is None else count,
            status=(result.command_status or b"").decode(),
            columns=tuple(name.decode() for name in names),
        )

    def _collect_notifications(self) -> None:
        while (notify := self._pgconn.notifies()) is not None:
            channel, payload = notify.relname.decode(), notify.extra.decode()
            self._notifications.append(PgNotification(channel, payload, notify.be_pid))
            self._counts["notifications"] += 1

    async def _run(self, commands: Sequence[Command]) -> list[list[_Result]]:
        """Send the commands (pipelined if several) and read all the results;
        if interrupted, recover (cancel and drain) before re-raising."""
        pgconn, pipeline = self._pgconn, len(commands) > 1
        try:
            if pipeline:
                pgconn.enter_pipeline_mode()
            for command in commands:
                command.send()
            if pipeline:
                pgconn.pipeline_sync()
                self._sync_pending = True
            self._counts["round_trips"] += 1
            await self._flush()
            groups = [await self._read_command() for _ in commands]
            if pipeline:
                await self._drain_pipeline()
        except (psycopg.Error, OSError):
            self._mark_broken("I/O failure")  # the socket or libpq's state failed
            raise
        except BaseException:
            await self._recover()
            raise
        return groups

    async def _flush(self) -> None:
        while self._pgconn.flush():
            await wait_readable_or_writable(self._pgconn.socket)
            self._pgconn.consume_input()

    async def _wait_result(self) -> _Result | None:
        while self._pgconn.is_busy():
            await trio.lowlevel.wait_readable(self._pgconn.socket)
            self._pgconn.consume_input()
        return self._pgconn.get_result()

    async def _read_command(self) -> list[_Result]:
        """Read the results of the current command, up to libpq's end marker."""
        pgconn, results = self._pgconn, list[_Result]()
        while (result := await self._wait_result()) is not None:
            results.append(result)
            if result.status == _ES.COPY_OUT:  # unsupported: discard the data
                while (size := pgconn.get_copy_data(1)[0]) != -1:
                    if size == 0:
                        await trio.lowlevel.wait_readable(pgconn.socket)
                        pgconn.consume_input()
            elif result.status in _COPY_STATES:  # unsupported: make it fail
                pgconn.put_copy_end(b"COPY FROM STDIN is not supported by this driver")
                await self._flush()
        self._collect_notifications()
        return results

    async def _drain_pipeline(self) -> None:
        """Read (and drop) results up to the pipeline's Sync; leave pipeline mode."""
        ends = 0
        while self._sync_pending:
            result = await self._wait_result()
            ends = ends + 1 if result is None else 0
            if ends > 1:  # pragma: no cover  # libpq would be out of sync
                raise psycopg.OperationalError("pipeline out of sync")
            if result is not None and result.status == _ES.PIPELINE_SYNC:
                self._sync_pending = False
        self._pgconn.exit_pipeline_mode()
        self._collect_notifications()

    @contextmanager
    def _bounded_cleanup(self, what: str) -> Iterator[None]:
        """Shield a cleanup from outer cancellation, bound it by
        ``recovery_timeout``, and break the connection if it fails or expires."""
        deadline = trio.current_time() + self._recovery_timeout
        with trio.CancelScope(shield=True, deadline=deadline) as scope:
            try:
                yield
            except (psycopg.Error, OSError, PgError) as exc:
                self._mark_broken(f"{what} failed: {exc}")
            except trio.ClosedResourceError:
                return  # closed by another task meanwhile
        if scope.cancelled_caught:
            self._mark_broken(f"{what} did not finish in {self._recovery_timeout} s")

    async def _recover(self) -> None:
        """Cancel and drain an interrupted operation, back to idle."""
        if self._closed or self._broken is not None:
            return
        if self._recovery_timeout == 0:
            self._mark_broken("operation interrupted and recovery_timeout is 0")
            return
        with self._bounded_cleanup("recovering from an interruption"):
            pgconn = self._pgconn
            await self._flush()  # a half-sent message would desynchronise the protocol
            pgconn.consume_input()
            in_flight = bool(pgconn.is_busy()) or self._sync_pending
            interval = _CANCEL_RESEND_INTERVAL
            while True:
                if in_flight:
                    await self._send_cancel()
                with trio.move_on_after(interval) as waited:
                    if pgconn.pipeline_status != pq.PipelineStatus.OFF:
                        await self._drain_pipeline()
                    else:
                        await self._read_command()
                if not waited.cancelled_caught:
                    break
                in_flight, interval = True, interval * 2
            if pgconn.transaction_status == _TS.INERROR and not self._in_transaction:
                await self._rollback_now()

    async def _send_cancel(self) -> None:
        self._counts["cancels"] += 1
        if not self._nonblocking_cancel:  # libpq < 17 only has the blocking PQcancel
            cancel_now = self._pgconn.get_cancel().cancel
            await trio.to_thread.run_sync(cancel_now, abandon_on_cancel=True)
            return
        cancel = self._pgconn.cancel_conn()
        try:
            cancel.start()
            if not await poll_until_ok(cancel.poll, lambda: cancel.socket):
                msg = cancel.get_error_message()
                raise psycopg.OperationalError(f"cancel request failed: {msg}")
        finally:
            cancel.finish()

    async def _rollback_now(self) -> None:
        self._pgconn.send_query(b"ROLLBACK")
        self._counts["round_trips"] += 1
        self._counts["statements"] += 1
        await self._flush()
        await self._read_command()
