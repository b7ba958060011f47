"""Opening libpq connections from Trio (Trio driver, part of `._driver`).

`build_conninfo` turns a DSN plus the driver's own parameters into libpq
connection parameters; `connect_pgconn` opens a non-blocking ``PGconn``
without ever blocking the event loop (the host name is resolved by Trio, the
connection handshake is polled with ``trio.lowlevel.wait_readable`` /
``wait_writable``). Errors are translated as everywhere in the driver
(``._errors``).
"""

from __future__ import annotations

import errno
import ipaddress
import re
import socket
from contextlib import suppress
from typing import TYPE_CHECKING, Any

import psycopg
import trio
from psycopg import pq
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from trio_cluster._core._checks import positive_seconds
from trio_cluster._errors import ConfigError

from ._errors import map_errors

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping

__all__ = [
    "build_conninfo",
    "connect_pgconn",
    "finish_pgconn",
    "quote_ident",
    "resolve_host",
    "wait_readable_or_writable",
]

_POLL = pq.PollingStatus
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
    for port in params.get("port", "").split(","):
        if port and not (port.isdigit() and 0 < int(port) < 65536):
            raise ConfigError(f"invalid PostgreSQL DSN: port {port!r} is not 1-65535")
    params.update(application_name=application_name, client_encoding="UTF8")
    extra = dict(settings or {})
    if idle_session_timeout is not None:
        idle_session_timeout = positive_seconds(
            "idle_session_timeout", idle_session_timeout
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


async def resolve_host(params: dict[str, str]) -> None:
    """Resolve a single host name with Trio (libpq would block the event loop)."""
    host = params.get("host", "")
    if not host or "hostaddr" in params or "," in host or host.startswith("/"):
        return
    with suppress(ValueError):
        ipaddress.ip_address(host)
        return
    port = params.get("port") or 5432
    try:
        infos = await trio.socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        # The resolver's own text does not name the host.
        raise socket.gaierror(
            exc.errno, f"cannot resolve host {host!r}: {exc.strerror}"
        ) from exc
    addresses = list(dict.fromkeys(str(info[4][0]) for info in infos))
    # One host entry per address, so that libpq still tries each in turn.
    params.update(host=",".join([host] * len(addresses)), hostaddr=",".join(addresses))


async def connect_pgconn(params: dict[str, str]) -> pq.abc.PGconn:
    """Open a non-blocking ``PGconn``; closed again on error or cancellation."""
    await trio.lowlevel.checkpoint_if_cancelled()
    with map_errors(lost=True):
        await resolve_host(params)
        pgconn = pq.PGconn.connect_start(make_conninfo("", **params).encode())
    try:
        with map_errors(lost=True):
            if not await poll_until_ok(pgconn.connect_poll, lambda: pgconn.socket):
                raise psycopg.OperationalError(pgconn.get_error_message())
            pgconn.nonblocking = 1
    except BaseException:
        finish_pgconn(pgconn)
        raise
    return pgconn


async def poll_until_ok(poll: Callable[[], int], socket_of: Callable[[], int]) -> bool:
    """Drive a libpq polling loop (connect, cancel) until it is done.

    Returns whether it succeeded (``False``: it failed, see the libpq object's
    error message).
    """
    while (status := poll()) != _POLL.OK:
        # The socket can change between attempts: read it every time.
        if status == _POLL.READING:
            await trio.lowlevel.wait_readable(socket_of())
        elif status == _POLL.WRITING:
            await trio.lowlevel.wait_writable(socket_of())
        else:
            return False
    return True


def finish_pgconn(pgconn: pq.abc.PGconn) -> None:
    """Close a ``PGconn``, first waking any task parked on its socket."""
    with suppress(psycopg.OperationalError):  # raised if there is no socket
        trio.lowlevel.notify_closing(pgconn.socket)
    pgconn.finish()


async def wait_readable_or_writable(sock: int) -> None:
    """Return once ``sock`` is readable or writable: reading while the send
    buffer is full avoids a deadlock with a server busy sending results.

    Raises:
        trio.ClosedResourceError: the socket was closed (`finish_pgconn`),
            before or while waiting.
    """

    async def wait(waiter: Callable[[int], Any], scope: trio.CancelScope) -> None:
        try:
            await waiter(sock)
        except OSError as exc:
            if exc.errno != errno.EBADF:
                raise
            # Closed (`finish_pgconn`, from another task) before this waiter
            # started: the socket is gone, as for the waiters it woke.
            raise trio.ClosedResourceError("the connection was closed") from None
        scope.cancel()

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(wait, trio.lowlevel.wait_readable, nursery.cancel_scope)
            nursery.start_soon(wait, trio.lowlevel.wait_writable, nursery.cancel_scope)
    except BaseExceptionGroup as group:
        # The waiters raise only Trio's Cancelled or ClosedResourceError.
        raise group.exceptions[0] from None


def quote_ident(name: str) -> str:
    if not name or "\x00" in name:
        raise ValueError(f"invalid PostgreSQL identifier {name!r}")
    return '"' + name.replace('"', '""') + '"'
