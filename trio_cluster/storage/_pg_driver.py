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

Errors leave as `PgError`/`ConnectionLostError` (``._pg_errors``) with the
psycopg exception as ``__cause__``. A closed connection raises
``trio.ClosedResourceError`` ("you closed it"), a broken one
`ConnectionLostError` ("it broke").
"""

from __future__ import annotations

import ipaddress
import logging
import math
import re
import socket
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from contextlib import asynccontextmanager, contextmanager, suppress
from functools import partial
from typing import TYPE_CHECKING, Any, TypeAlias

import attrs
import psycopg
import trio
from psycopg import pq
from psycopg.adapt import PyFormat, Transformer
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from trio_cluster._errors import ClusterInternalError, ConfigError

from ._pg_errors import (
    ConnectionLostError,
    PgError,
    error_from_result,
    is_session_fatal,
    map_errors,
    translate,
)

if TYPE_CHECKING:
    from psycopg.abc import Buffer

__all__ = [
    "PgConnection",
    "PgConnectionStatistics",
    "PgNotification",
    "PgResult",
    "build_conninfo",
]

logger = logging.getLogger("trio_cluster.storage.postgres")

Row: TypeAlias = tuple[Any, ...]
Statements: TypeAlias = Sequence[tuple[str, Sequence[object]]]
_Key: TypeAlias = tuple[str, tuple[int, ...]]
_Result: TypeAlias = pq.abc.PGresult

_ES = pq.ExecStatus
_TS = pq.TransactionStatus
_POLL = pq.PollingStatus
_IN_TX = (_TS.INTRANS, _TS.INERROR)
_COPY_STATES = frozenset({_ES.COPY_IN, _ES.COPY_OUT, _ES.COPY_BOTH})
_STATEMENTS_GONE = (b"DISCARD ALL", b"DEALLOCATE ALL")
_SETTING_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.]*\Z")
# TCP keepalives unless the DSN sets them: a vanished idle peer (network
# partition) is noticed after about idle + interval * count = 11 s.
_KEEPALIVES = {
    "keepalives": "1",
    "keepalives_idle": "5",
    "keepalives_interval": "2",
    "keepalives_count": "3",
}
# Resend the cancel request if the server has not answered by then: the first
# one can overtake the statement and be ignored by a backend not yet busy.
_CANCEL_RESEND_INTERVAL = 0.25
_STATEMENT, _SCRIPT, _PREPARE = range(3)
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


@attrs.frozen
class _Command:
    """One command queued in libpq, and what its results mean."""

    kind: int  # _STATEMENT, _SCRIPT or _PREPARE
    send: Callable[[], None]
    key: _Key | None = None
    name: bytes | None = None


def build_conninfo(
    dsn: str,
    *,
    application_name: str,
    idle_session_timeout: float | None = None,
    settings: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """The libpq connection parameters: ``dsn`` plus the driver's own.

    Adds ``application_name``, ``client_encoding=UTF8`` (the Transformer
    decodes UTF-8), TCP keepalives unless the DSN sets them, and the settings
    as ``-c name=value`` startup options (no extra round trip). Arguments as
    for `PgConnection.connect`.

    Raises:
        ConfigError: the DSN is malformed, or a setting is invalid.
    """
    try:
        raw = conninfo_to_dict(dsn)
    except psycopg.Error as exc:
        raise ConfigError(f"invalid PostgreSQL DSN: {exc}") from exc
    params = _KEEPALIVES | {k: str(v) for k, v in raw.items() if v is not None}
    params.update(application_name=application_name, client_encoding="UTF8")
    extra = dict(settings or {})
    if idle_session_timeout is not None:
        if not (math.isfinite(idle_session_timeout) and idle_session_timeout > 0):
            raise ConfigError(
                "idle_session_timeout must be a positive number of seconds,"
                f" got {idle_session_timeout!r}"
            )
        extra["idle_session_timeout"] = f"{max(1, round(idle_session_timeout * 1e3))}"
    options = [params["options"]] if params.get("options") else []
    for name, value in extra.items():
        if not _SETTING_NAME.match(name):
            raise ConfigError(f"invalid PostgreSQL setting name {name!r}")
        value = value.replace("\\", "\\\\").replace(" ", "\\ ")
        options.append(f"-c {name}={value}")
    if options:
        params["options"] = " ".join(options)
    return params


async def _resolve_host(params: dict[str, str]) -> None:
    """Resolve a single host name with Trio (libpq would block the event loop)."""
    host = params.get("host", "")
    if not host or "hostaddr" in params or "," in host or host.startswith("/"):
        return
    with suppress(ValueError):
        ipaddress.ip_address(host)
        return
    port = params.get("port") or 5432
    infos = await trio.socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    addresses = list(dict.fromkeys(str(info[4][0]) for info in infos))
    # One host entry per address, so that libpq still tries each in turn.
    params.update(host=",".join([host] * len(addresses)), hostaddr=",".join(addresses))


async def _connect_pgconn(params: dict[str, str]) -> pq.abc.PGconn:
    """Open a non-blocking ``PGconn``; closed again on error or cancellation."""
    await trio.lowlevel.checkpoint_if_cancelled()
    with map_errors(lost=True):
        await _resolve_host(params)
        pgconn = pq.PGconn.connect_start(make_conninfo("", **params).encode())
    try:
        with map_errors(lost=True):
            while (status := pgconn.connect_poll()) != _POLL.OK:
                # The socket can change between attempts: read it every time.
                if status == _POLL.READING:
                    await trio.lowlevel.wait_readable(pgconn.socket)
                elif status == _POLL.WRITING:
                    await trio.lowlevel.wait_writable(pgconn.socket)
                else:
                    raise psycopg.OperationalError(pgconn.get_error_message())
            pgconn.nonblocking = 1
    except BaseException:
        _finish(pgconn)
        raise
    return pgconn


def _finish(pgconn: pq.abc.PGconn) -> None:
    """Close a ``PGconn``, first waking any task parked on its socket."""
    with suppress(psycopg.OperationalError):  # raised if there is no socket
        trio.lowlevel.notify_closing(pgconn.socket)
    pgconn.finish()


async def _wait_readable_or_writable(sock: int) -> None:
    """Return once ``sock`` is readable or writable: reading while the send
    buffer is full avoids a deadlock with a server busy sending results."""

    async def wait(waiter: Callable[[int], Any], scope: trio.CancelScope) -> None:
        await waiter(sock)
        scope.cancel()

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(wait, trio.lowlevel.wait_readable, nursery.cancel_scope)
            nursery.start_soon(wait, trio.lowlevel.wait_writable, nursery.cancel_scope)
    except BaseExceptionGroup as group:
        # The waiters raise only Trio's Cancelled or ClosedResourceError.
        raise group.exceptions[0] from None


def _quote_ident(name: str) -> str:
    if not name or "\x00" in name:
        raise ValueError(f"invalid PostgreSQL identifier {name!r}")
    return '"' + name.replace('"', '""') + '"'


class PgConnection(trio.abc.AsyncResource):
    """One PostgreSQL session driven from Trio; open it with `connect`.

    ``async with await PgConnection.connect(...) as conn:`` closes it on exit.
    Not for concurrent use: see the module docstring.
    """

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
        self.backend_pid: int = pgconn.backend_pid
        """The server process id of the session (for ``pg_terminate_backend``)."""
        pgconn.notice_handler = self._log_notice

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
        if not (math.isfinite(recovery_timeout) and recovery_timeout >= 0):
            raise ConfigError(f"recovery_timeout must be >= 0: {recovery_timeout!r}")
        if max_prepared < 0:
            raise ConfigError(f"max_prepared must be >= 0: {max_prepared!r}")
        params = build_conninfo(
            dsn,
            application_name=application_name,
            idle_session_timeout=idle_session_timeout,
            settings=settings,
        )
        pgconn = await _connect_pgconn(params)
        return cls(pgconn, recovery_timeout=recovery_timeout, max_prepared=max_prepared)

    @property
    def is_broken(self) -> bool:
        """Whether the connection failed (operations raise `ConnectionLostError`)."""
        return self._broken is not None

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
            _finish(self._pgconn)

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
        if self._busy:
            return True
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

    def _mark_broken(self, reason: str) -> None:
        if self._broken is None and not self._closed:
            logger.warning("PostgreSQL session %d broken: %s", self.backend_pid, reason)
            self._broken = reason
            _finish(self._pgconn)

    def _log_notice(self, result: _Result) -> None:
        severity = result.error_field(pq.DiagnosticField.SEVERITY_NONLOCALIZED)
        level = logging.WARNING if severity == b"WARNING" else logging.DEBUG
        logger.log(level, "PostgreSQL %s", result.get_error_message().strip())

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
            command = _Command(_SCRIPT, send)
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
        await self.execute(f"LISTEN {_quote_ident(channel)}", prepare=False)

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

    # --------------------------------------------------------------- internals

    def _plan(self, statements: Statements, prepare: bool) -> list[_Command]:
        """Dump the parameters and turn the statements into libpq commands."""
        pgconn, commands, new = self._pgconn, list[_Command](), dict[_Key, bytes]()
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
                commands.append(_Command(_PREPARE, send, key, name))
            if name is None:
                send = partial(pgconn.send_query_params, text, values, types or None)
            else:
                send = partial(pgconn.send_query_prepared, name, values)
            send = partial(send, param_formats=formats, result_format=pq.Format.BINARY)
            commands.append(_Command(_STATEMENT, send, key, name))
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
                return [g for c, g in pairs if c.kind == _STATEMENT]
            error = error_from_result(failed[1], self._tx.encoding)
            key = failed[0].key if failed[0].kind == _STATEMENT else None
            stale = error.sqlstate == "26000" and key in self._prepared
            if stale and key is not None:
                del self._prepared[key]
            if not (stale and was_idle and self._pgconn.transaction_status == _TS.IDLE):
                raise error

    def _absorb(
        self, commands: Sequence[_Command], groups: Sequence[list[_Result]]
    ) -> tuple[_Command, _Result] | None:
        """Update the statement cache and the counters; return the first error."""
        failed: tuple[_Command, _Result] | None = None
        for command, group in zip(commands, groups, strict=True):
            ok = True
            for result in group:
                if result.status in (_ES.FATAL_ERROR, _ES.PIPELINE_ABORTED):
                    ok = False
                    if result.status == _ES.FATAL_ERROR and failed is None:
                        failed = (command, result)
                elif result.command_status in _STATEMENTS_GONE:
                    self._prepared.clear()
            if command.kind == _STATEMENT:
                self._counts["statements"] += 1
            elif command.kind == _SCRIPT:
                self._counts["statements"] += len(group)
            elif command.kind == _PREPARE and ok and command.key and command.name:
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

    async def _run(self, commands: Sequence[_Command]) -> list[list[_Result]]:
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
            await _wait_readable_or_writable(self._pgconn.socket)
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
            while (status := cancel.poll()) != _POLL.OK:
                if status == _POLL.READING:
                    await trio.lowlevel.wait_readable(cancel.socket)
                elif status == _POLL.WRITING:
                    await trio.lowlevel.wait_writable(cancel.socket)
                else:
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

    async def _rollback_quietly(self) -> None:
        """ROLLBACK an open transaction, or break the connection."""
        if self._closed or self._broken is not None or self._busy:
            return
        if self._pgconn.transaction_status in _IN_TX:
            with self._bounded_cleanup("ROLLBACK"), self._operation():
                await self._rollback_now()
