"""`PostgresStorage`: the storage contract on PostgreSQL (edge adapter).

A runner's session (`PostgresStorage.open_session`) owns five kinds of
connections, each with its own ``application_name``:

* a small pool (``trio_cluster <name>``) for message traffic
  (`._messages`): one statement per batch call;
* a pool for the transactions of transactional handlers
  (``trio_cluster tx <name>``), opened lazily, so that handlers holding
  transactions open never starve message traffic;
* the dedicated lock connection (``trio_cluster lock <name>``) that holds the
  session advisory locks (`._locks`, `._runners`), with the lease as its
  ``idle_session_timeout`` so a frozen runner loses its locks on the server;
* a LISTEN connection (``trio_cluster listen <name>``) for notifications
  (`._notify`);
* a LISTEN connection for the event bus's wake-ups (``trio_cluster bus
  <name>``, `._events`), opened only when a subscriber first waits.

Opening a session applies the schema migrations (`._schema`) unless told
not to. Several clusters can share a database under different table
prefixes: tables, channel and advisory-lock namespace are all derived from the
prefix (which must therefore be unique per database, not per schema).
"""

from __future__ import annotations

from contextlib import asynccontextmanager
from functools import partial
from typing import TYPE_CHECKING

import attrs

from trio_cluster._core._checks import positive_count, positive_seconds
from trio_cluster._errors import ConfigError
from trio_cluster._storage_abc import NotificationsMissed, Storage, StorageSession
from trio_cluster._storage_webhooks import WebhookStorageProvider

from .._validation import check_open_session
from ._dead_letters import PgDeadLetters
from ._driver._driver import PgConnection, build_conninfo
from ._driver._pool import open_pool
from ._events import EventQueries, PgEvents, parse_heads
from ._messages import PgMessages
from ._notify import Listener
from ._queries import MessageQueries
from ._runners import PgRunners
from ._schema import PgNames, migrate_connection
from ._state import StateQueries
from ._status import cluster_status
from ._webhooks import PgWebhooks

if TYPE_CHECKING:
    from collections.abc import AsyncIterator
    from contextlib import AbstractAsyncContextManager

__all__ = ["PostgresStatistics", "PostgresStorage", "cluster_status"]


@attrs.frozen
class PostgresStatistics:
    """Counters of every session a `PostgresStorage` opened (open or closed)."""

    sessions: int
    """Sessions open now."""
    statements: int
    """SQL statements sent on the message connections (``BEGIN``/``COMMIT``
    included): the cost that group commit amortises."""
    round_trips: int
    """Round trips on the message connections."""
    lock_statements: int
    """Statements sent on the lock connections (leases, registry)."""
    lock_round_trips: int
    """Round trips on the lock connections."""


def _optional_seconds(name: str, value: object) -> float | None:
    return None if value is None else positive_seconds(name, value)


class PostgresStorage(Storage, WebhookStorageProvider):
    """A PostgreSQL storage backend (PostgreSQL 15 or later) for
    `trio_cluster.open_runner`.

    Every runner opens its own session with `open_session`. The object itself
    holds no connection and can be shared by any number of sessions.

    Args:
        dsn: A libpq connection string or URI (``"postgresql://..."``).
        table_prefix: Prefix of every table, index, channel and advisory-lock
            namespace: clusters sharing a database need different prefixes.
            A lower-case SQL identifier of at most 40 characters.
        pool_size: Connections for message traffic per runner.
        transaction_pool_size: Most transactions of transactional handlers
            open at once per runner, each on its own connection (opened when
            first needed). Kept apart from message traffic, which slow
            handlers therefore never starve.
        lock_operation_timeout: Deadline of each lock-connection operation,
            in seconds; default a third of the session's lease. On expiry the
            lock connection is reset (the runner's locks are freed).
        transaction_idle_timeout: The server aborts a transaction of a
            transactional handler that stays idle this long (so a frozen
            runner cannot hold row locks forever); None for no limit.
        auto_migrate: Apply missing schema migrations when a session opens;
            if False, an outdated schema fails with `PersistenceError` (run
            ``trio-cluster migrate``).

    Raises:
        ConfigError: a malformed DSN, table prefix or option.
    """

    def __init__(
        self,
        dsn: str,
        *,
        table_prefix: str = "trio_cluster",
        pool_size: int = 4,
        transaction_pool_size: int = 4,
        lock_operation_timeout: float | None = None,
        transaction_idle_timeout: float | None = 60.0,
        auto_migrate: bool = True,
    ) -> None:
        if not isinstance(dsn, str):
            raise ConfigError(f"dsn must be a str, got {dsn!r}")
        build_conninfo(dsn, application_name="trio_cluster")  # validates the DSN
        self.names = PgNames.for_prefix(table_prefix)
        """The cluster's table, channel and lock names."""
        self._dsn = dsn
        self._pool_size = positive_count("pool_size", pool_size)
        self._transaction_pool_size = positive_count(
            "transaction_pool_size", transaction_pool_size
        )
        self._lock_timeout = _optional_seconds(
            "lock_operation_timeout", lock_operation_timeout
        )
        self._transaction_idle = _optional_seconds(
            "transaction_idle_timeout", transaction_idle_timeout
        )
        self._auto_migrate = bool(auto_migrate)
        self._queries = MessageQueries.build(self.names)
        self._state_queries = StateQueries.build(self.names)
        self._event_queries = EventQueries.build(self.names)
        self._sessions: list[StorageSession] = []
        self._retired = [0, 0, 0, 0]

    def statistics(self) -> PostgresStatistics:
        """Statement and round-trip counters summed over every session this
        storage opened (e.g. to measure statements per persisted request)."""
        totals = self._retired.copy()
        for session in self._sessions:
            for i, count in enumerate(_session_counts(session)):
                totals[i] += count
        return PostgresStatistics(len(self._sessions), *totals)

    def open_session(
        self, *, name: str, lease_duration: float
    ) -> AbstractAsyncContextManager[StorageSession]:
        """Open one runner's session (see `Storage.open_session`).

        Args:
            name: shown in ``pg_stat_activity.application_name``.
            lease_duration: the lock connection's ``idle_session_timeout``:
                without a `RunnerStorage` call for this long, the server ends
                the lock session and its locks are freed.

        Raises:
            TypeError: ``name`` is not a str or ``lease_duration`` not a number.
            ValueError: ``lease_duration`` is not positive and finite.
            PersistenceError: (on entry) the database could not be reached,
                or its schema is newer than this code (or older, with
                ``auto_migrate=False``).

        On exit (also on cancellation or an error in the body) the session
        unregisters its runner, releases every lock and closes its
        connections, shielded from cancellation and bounded by the lock
        operation deadline; if the database cannot be reached then, the
        closed lock connection frees the locks on the server anyway. The
        body's exception propagates unchanged.
        """
        return self._session(name, check_open_session(name, lease_duration))

    @asynccontextmanager
    async def open_webhook_storage(
        self, *, name: str, pool_size: int = 2
    ) -> AsyncIterator[PgWebhooks]:
        """Open a pool of ``pool_size`` connections (``trio_cluster webhooks
        <name>``) for the webhooks part's endpoints and attempts (see
        `trio_cluster.abc.WebhookStorageProvider`), applying the schema
        migrations first unless ``auto_migrate`` is False.

        Raises:
            PersistenceError: (on entry) the database could not be reached,
                or its schema is newer than this code (or older, with
                ``auto_migrate=False``).

        On exit (also on cancellation) the pool is closed.
        """
        if not isinstance(name, str):
            raise TypeError(f"name must be a str, got {name!r}")
        async with open_pool(
            self._dsn,
            size=positive_count("pool_size", pool_size),
            application_name=f"trio_cluster webhooks {name}",
            settings={"plan_cache_mode": "force_generic_plan"},
        ) as pool:
            async with pool.connection() as conn:
                await migrate_connection(conn, self.names, apply=self._auto_migrate)
            yield PgWebhooks(pool, self.names)

    @asynccontextmanager
    async def _session(
        self, name: str, lease_duration: float
    ) -> AsyncIterator[StorageSession]:
        timeout = self._lock_timeout or lease_duration / 3
        # The statements are written to run well on generic plans (joins are
        # index lookups or hashes, never nested loops over two CTEs), and
        # PostgreSQL's default would re-plan them on every call (~0.5 ms).
        settings = {"plan_cache_mode": "force_generic_plan"}
        if self._transaction_idle is not None:
            settings["idle_in_transaction_session_timeout"] = (
                f"{max(1, round(self._transaction_idle * 1000))}"
            )
        async with (
            open_pool(
                self._dsn,
                size=self._pool_size,
                application_name=f"trio_cluster {name}",
                settings=settings,
            ) as pool,
            open_pool(
                self._dsn,
                size=self._transaction_pool_size,
                application_name=f"trio_cluster tx {name}",
                settings=settings,
                lazy=True,
            ) as transaction_pool,
        ):
            async with pool.connection() as conn:
                await migrate_connection(conn, self.names, apply=self._auto_migrate)
            listener = Listener(
                partial(
                    PgConnection.connect,
                    self._dsn,
                    application_name=f"trio_cluster listen {name}",
                ),
                self.names.channel,
                on_reconnect=lambda: [NotificationsMissed()],
            )
            await listener.open()
            try:
                runners = PgRunners(
                    self.names,
                    lease_duration=lease_duration,
                    connect=partial(
                        PgConnection.connect,
                        self._dsn,
                        application_name=f"trio_cluster lock {name}",
                        idle_session_timeout=lease_duration,
                        settings={
                            "lock_timeout": f"{max(1, round(timeout * 1000))}",
                            "plan_cache_mode": "force_generic_plan",
                            # A statement abandoned by the client (the
                            # connection is closed, not cancelled) must not
                            # keep the session and its locks alive.
                            "client_connection_check_interval": (
                                f"{max(100, round(timeout * 250))}"
                            ),
                        },
                        # An interrupted lock statement has an unknown outcome:
                        # the connection is closed at once, never recovered.
                        recovery_timeout=0,
                    ),
                    operation_timeout=timeout,
                )
                await runners.connect()
                events = PgEvents(
                    pool=pool,
                    queries=self._event_queries,
                    listener=Listener(
                        partial(
                            PgConnection.connect,
                            self._dsn,
                            application_name=f"trio_cluster bus {name}",
                        ),
                        self.names.event_channel,
                        parse=parse_heads,
                    ),
                    channel=self.names.event_channel,
                    owner=self,
                )
                session = StorageSession(
                    messages=PgMessages(
                        pool=pool,
                        transaction_pool=transaction_pool,
                        queries=self._queries,
                        state_queries=self._state_queries,
                        listener=listener,
                        channel=self.names.channel,
                        owner=self,
                        dead_letters=PgDeadLetters(
                            pool=pool,
                            queries=self._queries.retries,
                            channel=self.names.channel,
                        ),
                    ),
                    runners=runners,
                    events=events,
                )
                self._sessions.append(session)
                try:
                    yield session
                finally:
                    events.close()
                    try:
                        await runners.aclose()
                    finally:
                        self._sessions.remove(session)
                        for i, count in enumerate(_session_counts(session)):
                            self._retired[i] += count
            finally:
                listener.close()


def _session_counts(session: StorageSession) -> tuple[int, int, int, int]:
    messages, runners = session.messages, session.runners
    assert isinstance(messages, PgMessages)
    assert isinstance(runners, PgRunners)
    pool, lock = messages.statistics(), runners.statistics()
    tx = messages.transaction_statistics()
    return (
        pool.statements + tx.statements,
        pool.round_trips + tx.round_trips,
        lock.statements,
        lock.round_trips,
    )
