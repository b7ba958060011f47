"""Translation of psycopg and socket errors into trio_cluster errors (edge adapter).

The PostgreSQL driver (`._driver`) is the one edge where psycopg meets
trio_cluster. Every ``psycopg.Error`` and ``OSError`` raised there goes through
`map_errors` (or `error_from_result` for a failed statement) and leaves the
driver as a `PgError`, a private subclass of the public `PersistenceError`,
with the original exception as ``__cause__``. No psycopg type escapes.

`ConnectionLostError` is the connection-level kind: the server ended the
session (``FATAL``), the socket failed, or the connection could not be
established. A connection that raised it is marked broken and never used
again; the pool replaces it. `PgRefusedError` is the statement-level kind
for data the server refuses (SQLSTATE classes 22 and 23): it is also the
public `StorageRefusedError`, so the runtime can write a refused batch's
items apart and fail only the one at fault.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import TYPE_CHECKING

import psycopg
from psycopg import errors as pg_errors

from trio_cluster._errors import PersistenceError, StorageRefusedError

if TYPE_CHECKING:
    from collections.abc import Iterator

__all__ = [
    "ConnectionLostError",
    "PgError",
    "PgRefusedError",
    "error_from_result",
    "is_session_fatal",
    "is_storage_failure",
    "map_errors",
    "translate",
]

# SQLSTATEs that end the session: connection exceptions (class 08) and the
# operator-intervention codes the server sends right before closing.
_SESSION_FATAL_STATES = frozenset({"57P01", "57P02", "57P03", "57P05"})

# SQLSTATEs of a statement that failed through no fault of its own: the
# server aborted the transaction for concurrency (serialization failure,
# deadlock, lock or statement timeout, outcome unknown) or lacks resources.
_TRANSIENT_STATES = frozenset({"40001", "40003", "40P01", "55P03", "57014"})
_TRANSIENT_CLASSES = ("08", "53", "57P")

# SQLSTATE classes of a statement refused for its data: data exception and
# integrity constraint violation (see `PgRefusedError`).
_REFUSED_CLASSES = ("22", "23")


class PgError(PersistenceError):
    """A PostgreSQL operation failed.

    The psycopg exception is the ``__cause__``. ``sqlstate`` lets the storage
    layer react to specific conditions, for example ``"40001"``
    (serialization failure) or ``"23505"`` (unique violation).
    """

    sqlstate: str | None
    """The five-character SQLSTATE reported by the server, or ``None`` for
    client-side failures (socket errors, adaptation errors)."""

    def __init__(self, message: str, *, sqlstate: str | None = None) -> None:
        super().__init__(message)
        self.sqlstate = sqlstate

    def __str__(self) -> str:
        text = super().__str__()
        return f"{text} (SQLSTATE {self.sqlstate})" if self.sqlstate else text


class PgRefusedError(PgError, StorageRefusedError):
    """A statement the server refused for the data it carries: SQLSTATE
    class ``22`` (data exception: a NUL in text, a value out of range, ...)
    or ``23`` (integrity constraint violation). The same statement fails
    again; a batch of other items without the one at fault would not.
    """


class ConnectionLostError(PgError):
    """The connection failed, was closed by the server, or could not be opened.

    The connection is broken for good: every later operation on it raises this
    error again. Open a new connection (the pool does so with backoff).
    """


def is_session_fatal(exc: psycopg.Error | OSError) -> bool:
    """Whether ``exc`` means the session is gone (rather than one statement failed).

    Args:
        exc: A psycopg or socket exception.

    Returns:
        True for socket errors, for libpq-level failures without a SQLSTATE
        (``consume_input`` on a closed socket, for instance), for
        ``FATAL``/``PANIC`` server errors and for SQLSTATE class ``08``.
    """
    if isinstance(exc, OSError):
        return True
    sqlstate = exc.sqlstate
    if sqlstate is None:
        return isinstance(exc, psycopg.OperationalError)
    if sqlstate.startswith("08") or sqlstate in _SESSION_FATAL_STATES:
        return True
    return exc.diag.severity_nonlocalized in ("FATAL", "PANIC")


def is_storage_failure(error: PersistenceError) -> bool:
    """Whether ``error`` (from a statement) is a failure of storage rather
    than of the statement: the connection was lost, or the server aborted the
    transaction for a reason that running it again may not meet (see
    ``_TRANSIENT_STATES``). A syntax error or a violated constraint is not.
    """
    if isinstance(error, ConnectionLostError):
        return True
    sqlstate = getattr(error, "sqlstate", None)
    if sqlstate is None:
        return False
    return sqlstate in _TRANSIENT_STATES or sqlstate.startswith(_TRANSIENT_CLASSES)


def translate(exc: psycopg.Error | OSError, *, lost: bool) -> PgError:
    """Build the trio_cluster error for ``exc`` (without raising it).

    Args:
        exc: The foreign exception.
        lost: Whether the connection is gone; selects `ConnectionLostError`.

    Returns:
        A `PgError` (`ConnectionLostError` if ``lost``, `PgRefusedError` for
        a statement refused for its data) whose ``__cause__`` is ``exc``.
    """
    sqlstate = exc.sqlstate if isinstance(exc, psycopg.Error) else None
    message = str(exc).strip() or type(exc).__name__
    cls: type[PgError] = PgError
    if lost:
        cls = ConnectionLostError
    elif sqlstate is not None and sqlstate.startswith(_REFUSED_CLASSES):
        cls = PgRefusedError
    error = cls(message, sqlstate=sqlstate)
    error.__cause__ = exc
    return error


def error_from_result(result: psycopg.pq.abc.PGresult, encoding: str) -> psycopg.Error:
    """The psycopg exception (with SQLSTATE and diagnostics) for a failed result.

    It is only ever raised inside `map_errors`, which translates it.
    """
    return pg_errors.error_from_result(result, encoding=encoding)


@contextmanager
def map_errors(*, lost: bool = False) -> Iterator[None]:
    """Translate psycopg and socket errors raised in the block.

    Args:
        lost: Treat every error as connection-level (used while connecting).

    Raises:
        ConnectionLostError: for session-fatal errors (see `is_session_fatal`).
        PgError: for every other ``psycopg.Error``.

    ``trio.Cancelled`` and every other exception pass through untouched.
    """
    try:
        yield
    except (psycopg.Error, OSError) as exc:
        raise translate(exc, lost=lost or is_session_fatal(exc)) from exc
