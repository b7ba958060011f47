"""PostgreSQL schema of the storage backend, and its forward-only migrations (edge adapter).

Theory of operation: every object the backend creates is named after the
*table prefix* (`PgNames`), so several clusters can share one database (and
one schema). The schema version lives in ``<prefix>_schema_version``, one row
per applied migration. `migrate_connection` brings a database to
`LATEST_VERSION`: it reads the version without locking (the common case: up
to date, one round trip), and only if it is behind it applies the missing
migrations in one transaction that first takes the transaction advisory lock
``(namespace, 0)``, so runners starting at the same time apply each migration
exactly once. Migrations only ever move forward; a schema newer than this code
is refused with a `PersistenceError` that says to upgrade.

Tables (see ``_MIGRATIONS``):

* ``runners``: one row per registered runner; its *liveness* is the session
  advisory lock ``(namespace, -id)`` held by the runner's lock connection.
* ``shards``: one row per shard ever acquired; its ``id`` is the key of the
  shard's advisory lock ``(namespace, id)``, ``epoch`` the fencing epoch.
* ``messages``: persisted requests (``seq`` = save order, ``dedup`` = a
  128-bit hash of address, tag and primary key, ``claimed_epoch``,
  ``processed_at`` set with the final reply, ``saved_at`` the saver's clock
  at saving, since version 2; ``metadata`` the call metadata as a JSON
  object, NULL when none, since version 3).
* ``replies``: chunks (``sequence`` >= 0) and the final reply (``sequence``
  NULL), unique per ``(request_id, sequence)`` with NULLs not distinct.
* since version 4, ``messages.attempts`` (claims so far; saved claimed: 1)
  and ``messages.last_error`` (what ended the previous attempt, written by
  ``retry_later``), and ``dead_letters``: copies of dead-lettered requests
  by request id (no foreign key: they outlive the request's retention),
  ``replayed_as`` the id of the request a replay saved from one.
* since version 5, ``entity_state``: the durable state of entities, one
  snapshot per ``(entity_type, entity_id)`` with its ``version`` (1, 2, ...)
  and the shard and ``epoch`` of the write that stored it (`._state`).
* since version 6, the event bus: ``event_log`` (every topic partition's
  events by ``(topic, part, event_offset)``), ``event_heads`` (each
  partition's next offset: the row a publishing transaction locks until it
  commits) and ``event_cursors`` (each subscription's next offset per
  partition, and the events it gave up on).
* since version 7, ``webhook_endpoints`` and ``webhook_attempts``: the
  webhooks part's endpoints and HTTP attempts (`._webhooks`).
* since version 8, ``entity_state.label``: what a snapshot is listed and
  counted by (a workflow's status, a state machine's state), indexed with
  the entity type and id in code-point (``"C"``) order (`._state`).
* since version 9, the ``machine_ids`` sequence: each registration looks
  for a free machine id from the next value on (modulo 1024), so a freed id
  is handed out again only after the others were.

Lock keys: ``(namespace, 0)`` migrations and registrations, ``(namespace, n)``
with ``n > 0`` shard ``n``, ``(namespace, -n)`` the liveness of runner ``n``.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

import attrs

from trio_cluster._core._hashing import advisory_namespace
from trio_cluster._errors import ConfigError, PersistenceError

from ._driver._driver import PgConnection

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

__all__ = [
    "LATEST_VERSION",
    "PgNames",
    "migrate",
    "migrate_connection",
    "schema_version",
]

_PREFIX = re.compile(r"[a-z_][a-z0-9_]*\Z")
_MAX_PREFIX = 40
"""Longest prefix: the longest derived name (an index name) stays within
PostgreSQL's 63-byte identifier limit."""


def _prefixed(suffix: str) -> Any:
    """The default of a `PgNames` field: the prefix, then ``_<suffix>``."""
    return attrs.Factory(lambda names: f"{names.prefix}_{suffix}", takes_self=True)


@attrs.frozen
class PgNames:
    """The names of one cluster's objects, derived from its table prefix."""

    prefix: str
    """The validated table prefix."""
    namespace: int = attrs.field(init=False)
    """First key of every advisory lock of the cluster (`advisory_namespace`)."""

    @namespace.default
    def _namespace(self) -> int:
        return advisory_namespace(self.prefix)

    @classmethod
    def for_prefix(cls, prefix: object) -> PgNames:
        """Validate ``prefix`` and derive the names.

        Raises:
            ConfigError: the prefix is not a lower-case SQL identifier of at
                most 40 characters.
        """
        if not isinstance(prefix, str) or not _PREFIX.match(prefix):
            raise ConfigError(
                f"table_prefix must be a lower-case SQL identifier (letters, digits,"
                f" underscores; not starting with a digit), got {prefix!r}"
            )
        if len(prefix) > _MAX_PREFIX:
            raise ConfigError(
                f"table_prefix must be at most {_MAX_PREFIX} characters, got {prefix!r}"
            )
        return cls(prefix)

    version: str = attrs.field(init=False, default=_prefixed("schema_version"))
    runners: str = attrs.field(init=False, default=_prefixed("runners"))
    shards: str = attrs.field(init=False, default=_prefixed("shards"))
    messages: str = attrs.field(init=False, default=_prefixed("messages"))
    replies: str = attrs.field(init=False, default=_prefixed("replies"))
    dead_letters: str = attrs.field(init=False, default=_prefixed("dead_letters"))
    entity_state: str = attrs.field(init=False, default=_prefixed("entity_state"))
    webhook_endpoints: str = attrs.field(
        init=False, default=_prefixed("webhook_endpoints")
    )
    webhook_attempts: str = attrs.field(
        init=False, default=_prefixed("webhook_attempts")
    )
    machine_ids: str = attrs.field(init=False, default=_prefixed("machine_ids"))
    """The sequence a registration's machine id search starts from."""
    channel: str = attrs.field(init=False, default=_prefixed("events"))
    """The LISTEN/NOTIFY channel of the cluster."""
    events: str = attrs.field(init=False, default=_prefixed("event_log"))
    """The event bus's log (``_events`` would read like the channel)."""
    event_heads: str = attrs.field(init=False, default=_prefixed("event_heads"))
    event_cursors: str = attrs.field(init=False, default=_prefixed("event_cursors"))
    event_channel: str = attrs.field(init=False, default=_prefixed("published"))
    """The LISTEN/NOTIFY channel of the event bus's wake-ups."""

    @property
    def index_names(self) -> dict[str, str]:
        """The indexes of ``messages`` by role (used by the index test)."""
        return {
            role: f"{self.messages}_{role}"
            for role in (
                "dedup",
                "ready",
                "delayed",
                "claimed",
                "processed",
                "address",
            )
        }


def _migration_1(n: PgNames) -> str:
    m = n.messages
    return f"""
CREATE TABLE {n.runners} (
    id integer GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    host text NOT NULL,
    port integer NOT NULL,
    groups text[] NOT NULL,
    weight double precision NOT NULL,
    machine_id integer NOT NULL CHECK (machine_id BETWEEN 0 AND 1023),
    token text NOT NULL UNIQUE,
    lease double precision NOT NULL,
    registered_at timestamptz NOT NULL DEFAULT now(),
    seen_at timestamptz NOT NULL DEFAULT now(),
    UNIQUE (host, port),
    UNIQUE (machine_id)
);
CREATE TABLE {n.shards} (
    id integer GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    shard_group text NOT NULL,
    shard_number integer NOT NULL,
    epoch bigint NOT NULL DEFAULT 0,
    owner text,
    UNIQUE (shard_group, shard_number)
);
CREATE TABLE {m} (
    request_id bigint PRIMARY KEY,
    seq bigint GENERATED ALWAYS AS IDENTITY,
    shard_group text NOT NULL,
    shard_number integer NOT NULL,
    entity_type text NOT NULL,
    entity_id text NOT NULL,
    tag text NOT NULL,
    payload bytea NOT NULL,
    primary_key text,
    dedup bytea,
    deliver_at double precision,
    stream boolean NOT NULL DEFAULT false,
    claimed_epoch bigint,
    interrupted boolean NOT NULL DEFAULT false,
    processed_at double precision,
    next_sequence bigint NOT NULL DEFAULT 0,
    acked_sequence bigint NOT NULL DEFAULT -1
) WITH (fillfactor = 85);
CREATE UNIQUE INDEX {m}_dedup ON {m} (dedup) WHERE dedup IS NOT NULL;
CREATE INDEX {m}_ready ON {m} (shard_group, shard_number, seq)
    WHERE processed_at IS NULL AND claimed_epoch IS NULL AND deliver_at IS NULL;
CREATE INDEX {m}_delayed ON {m} (shard_group, shard_number, deliver_at)
    WHERE processed_at IS NULL AND claimed_epoch IS NULL
      AND deliver_at IS NOT NULL;
CREATE INDEX {m}_claimed ON {m} (shard_group, shard_number, claimed_epoch)
    WHERE processed_at IS NULL AND claimed_epoch IS NOT NULL;
CREATE INDEX {m}_processed ON {m} (processed_at) WHERE processed_at IS NOT NULL;
CREATE INDEX {m}_address ON {m} (entity_id, entity_type);
CREATE TABLE {n.replies} (
    request_id bigint NOT NULL REFERENCES {m} (request_id) ON DELETE CASCADE,
    sequence bigint,
    payload bytea NOT NULL,
    CONSTRAINT {n.replies}_key UNIQUE NULLS NOT DISTINCT (request_id, sequence)
);
"""


def _migration_2(n: PgNames) -> str:
    # When a request was saved (the saver's clock), for the backlog age that
    # `trio-cluster status` shows; NULL for requests saved before version 2.
    return f"ALTER TABLE {n.messages} ADD COLUMN saved_at double precision;"


def _migration_3(n: PgNames) -> str:
    # The call metadata of a request (`with_metadata`, trace context), NULL
    # when it has none (and for requests saved before version 3).
    return f"ALTER TABLE {n.messages} ADD COLUMN metadata jsonb;"


def _migration_4(n: PgNames) -> str:
    # Attempts (one per claim, or save claimed) and the error that ended the
    # previous one; the dead letters, kept until purged (no foreign key to
    # the request: retention deletes requests, never their dead letters).
    # Rows saved before version 4 count no attempts yet.
    m = n.messages
    return f"""
ALTER TABLE {m} ADD COLUMN attempts integer NOT NULL DEFAULT 0;
ALTER TABLE {m} ADD COLUMN last_error text;
CREATE TABLE {n.dead_letters} (
    request_id bigint PRIMARY KEY,
    shard_group text NOT NULL,
    shard_number integer NOT NULL,
    entity_type text NOT NULL,
    entity_id text NOT NULL,
    tag text NOT NULL,
    payload bytea NOT NULL,
    primary_key text,
    metadata jsonb,
    attempts integer NOT NULL,
    error text NOT NULL,
    dead_at double precision NOT NULL,
    replayed_as bigint
);
"""


def _migration_5(n: PgNames) -> str:
    # Durable entity state: one snapshot per entity type and id (not per
    # shard: a change of shards_per_group moves an entity, and its state goes
    # with it); the shard and epoch of the write that stored it, for
    # inspection (fencing reads the shards table).
    return f"""
CREATE TABLE {n.entity_state} (
    entity_type text NOT NULL,
    entity_id text NOT NULL,
    shard_group text NOT NULL,
    shard_number integer NOT NULL,
    epoch bigint NOT NULL,
    version bigint NOT NULL CHECK (version > 0),
    payload bytea NOT NULL,
    saved_at double precision NOT NULL,
    PRIMARY KEY (entity_type, entity_id)
);
"""


def _migration_6(n: PgNames) -> str:
    # The event bus: the log of every topic's partitions, keyed by offset;
    # each partition's next offset (its head row, locked by a publishing
    # transaction until it commits, so offsets commit in order, gap-free);
    # the subscriptions' cursors.
    e = n.events
    return f"""
CREATE TABLE {e} (
    topic text NOT NULL,
    part integer NOT NULL,
    event_offset bigint NOT NULL,
    key text,
    payload bytea NOT NULL,
    published_at double precision NOT NULL,
    PRIMARY KEY (topic, part, event_offset)
);
CREATE INDEX {e}_published ON {e} (published_at);
CREATE TABLE {n.event_heads} (
    topic text NOT NULL,
    part integer NOT NULL,
    next_offset bigint NOT NULL,
    PRIMARY KEY (topic, part)
);
CREATE TABLE {n.event_cursors} (
    subscription text NOT NULL,
    topic text NOT NULL,
    part integer NOT NULL,
    next_offset bigint NOT NULL,
    skipped bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (subscription, topic, part)
);
CREATE INDEX {n.event_cursors}_partition ON {n.event_cursors} (topic, part);
"""


def _migration_7(n: PgNames) -> str:
    # The webhooks part's records: endpoints by id, and one row per HTTP
    # attempt of a delivery (rewritten when a redelivered attempt runs
    # again), found by message or by endpoint, most recent first.
    a = n.webhook_attempts
    return f"""
CREATE TABLE {n.webhook_endpoints} (
    endpoint_id text PRIMARY KEY,
    url text NOT NULL,
    secret text NOT NULL,
    event_types text[],
    enabled boolean NOT NULL,
    ordered boolean NOT NULL,
    rate_per_second double precision,
    rate_burst double precision NOT NULL,
    timeout double precision NOT NULL,
    disabled_reason text,
    updated_at double precision NOT NULL
);
CREATE TABLE {a} (
    message_id text NOT NULL,
    endpoint_id text NOT NULL,
    attempt integer NOT NULL,
    at double precision NOT NULL,
    outcome text NOT NULL,
    status integer,
    latency double precision NOT NULL,
    error text,
    next_at double precision,
    PRIMARY KEY (message_id, endpoint_id, attempt)
);
CREATE INDEX {n.prefix}_wh_attempts_ep ON {a} (endpoint_id, at);
"""


def _migration_8(n: PgNames) -> str:
    # Durable state labels: operators list and count the snapshots of some
    # entity types by label (workflows by status) without reading payloads.
    # "C" collation: the order of Python's str, whatever the database's.
    t = n.entity_state
    return f"""
ALTER TABLE {t} ADD COLUMN label text;
CREATE INDEX {t}_label ON {t}
    (entity_type COLLATE "C", label COLLATE "C", entity_id COLLATE "C");
"""


def _migration_9(n: PgNames) -> str:
    # Machine ids handed out in turn (each registration's search starts
    # after the last one's), not the smallest free one: a runner taking over
    # from one that just left, on a host whose clock is behind, would mint
    # request ids its predecessor minted in its last milliseconds.
    return f"CREATE SEQUENCE {n.machine_ids} MINVALUE 0 START 0;"


# (version, description, SQL builder). Append only: never edit a released one.
_STEPS: Sequence[tuple[int, str, Callable[[PgNames], str]]] = (
    (1, "runners, shards, messages, replies", _migration_1),
    (2, "messages.saved_at (backlog age)", _migration_2),
    (3, "messages.metadata (call metadata)", _migration_3),
    (4, "messages.attempts, messages.last_error, dead_letters", _migration_4),
    (5, "entity_state (durable entity state)", _migration_5),
    (6, "event bus: event_log, event_heads, event_cursors", _migration_6),
    (7, "webhook_endpoints, webhook_attempts", _migration_7),
    (8, "entity_state.label (listing durable state by label)", _migration_8),
    (9, "machine_ids sequence (machine ids handed out in turn)", _migration_9),
)

LATEST_VERSION = _STEPS[-1][0]
"""The schema version this code writes and reads."""


async def schema_version(conn: PgConnection, names: PgNames) -> int:
    """The schema version of ``names`` in the connection's database (0: none).

    Raises:
        PersistenceError: the query failed.
    """
    result = await conn.execute("SELECT to_regclass($1) IS NOT NULL", [names.version])
    if not result.rows[0][0]:
        return 0
    result = await conn.execute(
        f"SELECT coalesce(max(version), 0) FROM {names.version}"
    )
    return int(result.rows[0][0])


def _check_known(version: int, names: PgNames) -> None:
    if version > LATEST_VERSION:
        raise PersistenceError(
            f"the trio_cluster schema with table prefix {names.prefix!r} is at"
            f" version {version}, newer than this version of trio_cluster knows"
            f" ({LATEST_VERSION}): upgrade trio_cluster on this runner"
        )


async def migrate_connection(
    conn: PgConnection, names: PgNames, *, apply: bool = True
) -> int:
    """Bring the schema of ``names`` to `LATEST_VERSION`; return it.

    Args:
        conn: an idle connection (not in a transaction).
        names: the cluster's names.
        apply: False to only check the version (and fail if it is behind).

    Raises:
        PersistenceError: the schema is newer than this code, or behind with
            ``apply=False``, or a statement failed (nothing of the failed
            migration transaction took effect).

    On cancellation the migration transaction is rolled back.
    """
    version = await schema_version(conn, names)
    _check_known(version, names)
    if version == LATEST_VERSION:
        return version
    if not apply:
        raise PersistenceError(
            f"the trio_cluster schema with table prefix {names.prefix!r} is at"
            f" version {version}, this code needs {LATEST_VERSION}: run"
            " `trio-cluster migrate` (or open the storage with auto_migrate=True)"
        )
    async with conn.transaction():
        # Serialize concurrent migrators; the lock ends with the transaction.
        await conn.execute(
            "SELECT pg_advisory_xact_lock($1::int4, 0)", [names.namespace]
        )
        await conn.execute_script(
            f"CREATE TABLE IF NOT EXISTS {names.version} ("
            " version integer PRIMARY KEY,"
            " description text NOT NULL,"
            " applied_at timestamptz NOT NULL DEFAULT now())"
        )
        version = await schema_version(conn, names)  # again, under the lock
        _check_known(version, names)
        for number, description, build in _STEPS:
            if number > version:
                await conn.execute_script(build(names))
                await conn.execute(
                    f"INSERT INTO {names.version} (version, description)"
                    " VALUES ($1::int4, $2::text)",
                    [number, description],
                )
    return LATEST_VERSION


async def migrate(dsn: str, *, table_prefix: str = "trio_cluster") -> int:
    """Create or upgrade the trio_cluster tables in a database.

    What ``trio-cluster migrate`` runs. Safe to run while runners are up and
    several times: each migration is applied once, under a lock.

    Args:
        dsn: A libpq connection string or URI.
        table_prefix: The cluster's table prefix.

    Returns:
        The schema version (`LATEST_VERSION`).

    Raises:
        ConfigError: a malformed DSN or table prefix.
        PersistenceError: the database failed, or its schema is newer than
            this version of trio_cluster.

    On cancellation the connection is closed and the migration in progress
    rolled back.
    """
    names = PgNames.for_prefix(table_prefix)
    conn = await PgConnection.connect(dsn, application_name="trio_cluster migrate")
    async with conn:
        return await migrate_connection(conn, names)
