"""Storage notifications over LISTEN/NOTIFY (Trio driver).

Theory of operation: each storage session keeps one connection that LISTENs
on the cluster's channel (`PgNames.channel`). The message statements
``pg_notify`` small JSON payloads (see `._queries`) that PostgreSQL
delivers at commit to every listening session, the writer's own included.
`Listener.wait` returns them coalesced by kind, like `MemoryStorage` does.

The connection is opened with the session, so notifications of the first
writes are not missed. If it dies (the server restarted, an administrator
terminated it), `Listener.wait` raises `PersistenceError` at once, and the
next call opens a new connection (after a `Backoff` delay if connecting
failed before): notifications sent in between are lost. That call returns at
once, once it LISTENs again, with what ``on_reconnect`` gives (for messages:
`NotificationsMissed`, so the runtime reads everything again; notifications
are otherwise never lost, so it does not poll).
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Awaitable, Callable, Iterable
from typing import TYPE_CHECKING, Any, Final

import attrs
import trio

from trio_cluster._core._addresses import ShardId
from trio_cluster._core._retry import Backoff
from trio_cluster._errors import PersistenceError

from .._coalesce import Coalescer
from ._driver._driver import PgConnection, PgNotification

if TYPE_CHECKING:
    from trio_cluster._storage_abc import (
        Notification,
    )

__all__ = ["MALFORMED", "Listener", "coalesce", "skip_malformed"]

log = logging.getLogger("trio_cluster.storage.postgres")

DEFAULT_BACKOFF = Backoff(0.05, 2.0, jitter=0.5)


class _Inbox(Coalescer):
    """Notifications from JSON payloads, coalesced by kind."""

    def add(self, payload: str) -> None:
        data = json.loads(payload)
        if not isinstance(data, dict):
            raise TypeError("not a JSON object")
        if "i" in data:
            ids = {int(i) for i in data["i"]}
            shards = {ShardId(str(g), int(n)) for g, n in data["s"]}
            self.add_interrupts(ids, shards)
            # An interrupt also makes its requests claimable (as interrupted).
            self.add_messages(shards)
        elif "m" in data:
            shards = {ShardId(str(g), int(n)) for g, n in data["m"]}
            when = data.get("d")
            self.add_messages(shards, None if when is None else float(when))
        elif "r" in data:
            self.add_replies(int(i) for i in data["r"])
        elif "j" in data:
            self.add_runners_changed()
        else:
            raise ValueError("unknown notification kind")


MALFORMED: Final = (ValueError, TypeError, KeyError, ArithmeticError, RecursionError)
"""What parsing a payload someone else wrote on a channel may raise (an int
out of range, JSON nested too deep, a missing key...)."""


def skip_malformed(notification: PgNotification, exc: Exception) -> None:
    """Log a notification whose payload did not parse (it is skipped)."""
    log.warning(
        "ignoring a malformed notification on %s: %r (%s)",
        notification.channel,
        notification.payload[:200],
        exc,
    )


def coalesce(raw: Iterable[PgNotification]) -> list[Notification]:
    """Parse and coalesce notifications; payloads we did not write are
    logged and skipped."""
    inbox = _Inbox()
    for notification in raw:
        try:
            inbox.add(notification.payload)
        # NOTE: anyone may NOTIFY on the channel: a payload that fails to
        # parse in any way (an int out of range, JSON nested too deep) is
        # skipped, never raised into the runner's notification loop.
        except MALFORMED as exc:
            skip_malformed(notification, exc)
    return inbox.take()


@attrs.define(eq=False)
class Listener:
    """The LISTEN connection of one storage session.

    Args:
        connect: opens a new connection (not yet listening).
        channel: the channel to LISTEN on.
        backoff: delays between failed connection attempts.
    """

    _connect: Callable[[], Awaitable[PgConnection]]
    _channel: str
    _backoff: Backoff = attrs.field(default=DEFAULT_BACKOFF, kw_only=True)
    _parse: Callable[[Iterable[PgNotification]], list[Any]] = attrs.field(
        default=coalesce, kw_only=True
    )
    """Turns raw notifications into what `wait` returns (nothing: wait on)."""
    _on_reconnect: Callable[[], list[Any]] | None = attrs.field(
        default=None, kw_only=True
    )
    """What `wait` returns at once after opening a new connection (once it
    listens): notifications may have been lost before. None: waits on."""
    _random_unit: Callable[[], float] = attrs.field(default=random.random, kw_only=True)
    _failures: int = attrs.field(init=False, default=0)
    _retry_at: float = attrs.field(init=False, default=0.0)
    _conn: PgConnection | None = attrs.field(init=False, default=None)
    _mutex: trio.Lock = attrs.field(init=False, factory=trio.Lock)
    _closed: bool = attrs.field(init=False, default=False)
    reconnects: int = attrs.field(init=False, default=0)
    """Connections opened after the first one."""

    async def open(self) -> None:
        """Connect and LISTEN (at session start).

        Raises:
            PersistenceError: the connection failed.
        """
        async with self._mutex:
            await self._ensure()

    async def _ensure(self) -> PgConnection:
        conn = self._conn
        if conn is not None and not conn.is_broken:
            return conn
        self._conn = None
        if self._failures:
            await trio.sleep_until(self._retry_at)
        try:
            conn = await self._connect()
            try:
                await conn.listen(self._channel)
            except BaseException:
                conn.close()
                raise
        except PersistenceError:
            self._failures += 1
            delay = self._backoff.delay(self._failures - 1, self._random_unit())
            self._retry_at = trio.current_time() + delay
            raise
        self._failures = 0
        if self._closed:  # pragma: no cover - closed while connecting
            conn.close()
            raise trio.ClosedResourceError("the storage session is closed")
        self._conn = conn
        return conn

    async def wait(self) -> list[Any]:
        """Wait for notifications; return them coalesced (at least one), or,
        when it had to open a new connection, what ``on_reconnect`` gives.

        Raises:
            PersistenceError: the connection died (or could not be opened
                again); the next call opens a new one.
            trio.ClosedResourceError: the session is closed.

        Concurrent callers take turns. On cancellation nothing that was
        received is lost: it is returned by the next call.
        """
        await trio.lowlevel.checkpoint_if_cancelled()
        async with self._mutex:
            while True:
                if self._closed:
                    raise trio.ClosedResourceError("the storage session is closed")
                reconnect = self._conn is None or self._conn.is_broken
                conn = await self._ensure()
                if reconnect:
                    self.reconnects += 1
                    if self._on_reconnect is not None:
                        return self._on_reconnect()
                try:
                    raw = await conn.wait_notifications()
                except PersistenceError as exc:
                    conn.close()
                    self._conn = None
                    raise PersistenceError(
                        f"the notification connection failed: {exc}"
                    ) from exc
                notifications = self._parse(raw)
                if notifications:
                    return notifications

    def close(self) -> None:
        """Close the connection; a waiting `wait` raises
        ``trio.ClosedResourceError``."""
        self._closed = True
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    @property
    def is_listening(self) -> bool:
        """Whether a connection is open (notifications are not being missed)."""
        return self._conn is not None and not self._conn.is_broken

    @property
    def backend_pid(self) -> int | None:
        """The server pid of the current connection (for tests and status)."""
        return None if self._conn is None else self._conn.backend_pid
