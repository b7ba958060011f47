"""The SQL of the PostgreSQL `RunnerStorage`: registry, shard locks, leases (edge adapter).

The statements of `._runners`, built once per table prefix (`RunnerQueries`),
plus the two fragments `._status` shares: `LOCKS_QUERY` (the cluster's
granted advisory locks, from ``pg_locks``) and `RUNNER_KEY` (the lock key of
a runner's liveness lock). `._runners` explains the locking scheme.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import attrs

from .._validation import MACHINE_IDS

if TYPE_CHECKING:
    from ._schema import PgNames

__all__ = ["LOCKS_QUERY", "RUNNER_KEY", "RunnerQueries"]


# The cluster's granted two-int advisory locks in this database ($1: the
# namespace as pg_locks' classid): pid and key (objid, the second int).
LOCKS_QUERY = """
SELECT pid, objid::int8 AS key FROM pg_locks
WHERE locktype = 'advisory' AND objsubid = 2 AND granted
  AND classid = $1::int8::oid
  AND database = (SELECT oid FROM pg_database WHERE datname = current_database())
"""
RUNNER_KEY = "4294967296 - r.id"
"""``objid`` of runner ``r``'s liveness lock ``(namespace, -r.id)``."""


@attrs.frozen
class RunnerQueries:
    """The statements of `PgRunners` for one table prefix."""

    insert_shards: str
    lock_shards: str
    unlock: str
    restore: str
    heartbeat: str
    heartbeat_live: str
    register_gc: str
    register_takeover: str
    register: str
    unregister: str
    live: str
    announce: str
    owners: str
    close: str

    @classmethod
    def build(cls, names: PgNames) -> RunnerQueries:
        r, s = names.runners, names.shards
        return cls(
            insert_shards=f"""
INSERT INTO {s} (shard_group, shard_number)
SELECT * FROM unnest($1::text[], $2::int4[])
ON CONFLICT DO NOTHING""",
            # Try-lock every wanted shard; bump the epoch of those got whose
            # row no fenced write holds locked (``FOR SHARE``, see `._queries`);
            # a shard whose row is locked is unlocked again and left out (for
            # the next attempt), so an acquisition never waits on a write nor
            # moves the epoch under one.
            lock_shards=f"""
WITH tried AS MATERIALIZED (
    SELECT s.id, s.shard_group, s.shard_number,
           pg_try_advisory_lock($3::int4, s.id) AS got
    FROM {s} s JOIN unnest($1::text[], $2::int4[]) AS w(g, n)
        ON s.shard_group = w.g AND s.shard_number = w.n
), free AS MATERIALIZED (
    SELECT s.id FROM {s} s
    WHERE s.id IN (SELECT t.id FROM tried t WHERE t.got)
    FOR NO KEY UPDATE OF s SKIP LOCKED
), busy AS MATERIALIZED (
    SELECT t.shard_group, t.shard_number, t.id,
           pg_advisory_unlock($3::int4, t.id) AS unlocked
    FROM tried t
    WHERE t.got AND NOT EXISTS (SELECT 1 FROM free f WHERE f.id = t.id)
), bumped AS (
    UPDATE {s} s SET epoch = s.epoch + 1, owner = $4::text
    FROM free f WHERE s.id = f.id
    RETURNING s.shard_group, s.shard_number, s.id, s.epoch
)
SELECT shard_group, shard_number, id, NULL::int8 FROM tried WHERE NOT got
UNION ALL
SELECT shard_group, shard_number, id, NULL::int8 FROM busy
UNION ALL
SELECT shard_group, shard_number, id, epoch FROM bumped""",
            unlock="""
SELECT count(*) FILTER (WHERE pg_advisory_unlock($1::int4, k))
FROM unnest($2::int4[]) AS k""",
            restore=f"""
SELECT pg_try_advisory_lock($1::int4, -id) FROM {r}
WHERE id = $2::int4 AND token = $3::text""",
            heartbeat=f"""
UPDATE {r} SET seen_at = now() WHERE id = $1::int4 AND token = $2::text
RETURNING port >= 0""",
            # The heartbeat and the live runners in one statement (a lease
            # refresh lists them: no poll of its own). The first row is the
            # heartbeat's (absent if the registration row is gone); the
            # listing reads the rows as they were before the update.
            heartbeat_live=f"""
WITH beat AS (
    UPDATE {r} SET seen_at = now() WHERE id = $2::int4 AND token = $3::text
    RETURNING port >= 0 AS registered
)
SELECT true, registered, NULL::text, NULL::int4, NULL::text[], NULL::float8,
       NULL::int4
FROM beat
UNION ALL
SELECT false, NULL, r.host, r.port, r.groups, r.weight, r.machine_id
FROM {r} r
WHERE r.port >= 0
  AND EXISTS (SELECT 1 FROM ({LOCKS_QUERY}) l WHERE l.key = {RUNNER_KEY})""",
            register_gc=f"""
DELETE FROM {r} r
WHERE r.token <> $2::text
  AND r.seen_at < now() - make_interval(secs => greatest(60, 10 * r.lease))
  AND NOT EXISTS (SELECT 1 FROM ({LOCKS_QUERY}) l WHERE l.key = {RUNNER_KEY})""",
            register_takeover=f"""
WITH old AS MATERIALIZED (
    SELECT r.id, EXISTS (SELECT 1 FROM ({LOCKS_QUERY}) l WHERE l.key = {RUNNER_KEY}) AS live
    FROM {r} r
    WHERE r.host = $2::text AND r.port = $3::int4 AND r.token <> $4::text
), displaced AS (
    UPDATE {r} r SET port = -r.id FROM old WHERE r.id = old.id AND old.live
)
DELETE FROM {r} r USING old WHERE r.id = old.id AND NOT old.live""",
            register=f"""
WITH mine AS (
    UPDATE {r} SET host = $1::text, port = $2::int4, groups = $3::text[],
        weight = $4::float8, lease = $5::float8, seen_at = now()
    WHERE token = $6::text
    RETURNING id, machine_id
), turn AS (
    SELECT nextval('{names.machine_ids}') % {MACHINE_IDS} AS first
    WHERE NOT EXISTS (SELECT 1 FROM mine)
), free AS (
    SELECT (turn.first + k) % {MACHINE_IDS} AS machine_id
    FROM turn, generate_series(0, {MACHINE_IDS - 1}) AS k
    WHERE NOT EXISTS (
        SELECT 1 FROM {r} x WHERE x.machine_id = (turn.first + k) % {MACHINE_IDS}
    )
    ORDER BY k
    LIMIT 1
), ins AS (
    INSERT INTO {r} (host, port, groups, weight, lease, token, machine_id)
    SELECT $1::text, $2::int4, $3::text[], $4::float8, $5::float8, $6::text,
           free.machine_id
    FROM free
    WHERE free.machine_id IS NOT NULL AND NOT EXISTS (SELECT 1 FROM mine)
    RETURNING id, machine_id
)
SELECT id, machine_id,
       CASE WHEN id = $8::int4 THEN true ELSE pg_try_advisory_lock($7::int4, -id) END
FROM (SELECT * FROM mine UNION ALL SELECT * FROM ins) AS registered""",
            unregister=f"""
WITH gone AS (DELETE FROM {r} WHERE token = $1::text RETURNING id)
SELECT CASE WHEN id = $3::int4 THEN pg_advisory_unlock($2::int4, -id) END,
       pg_notify($4::text, '{{"j": 1}}')
FROM gone""",
            # Sent with every change of the registry (delivered at commit):
            # the other runners read the live runners at once.
            announce="""SELECT pg_notify($1::text, '{"j": 1}')""",
            live=f"""
SELECT r.host, r.port, r.groups, r.weight, r.machine_id
FROM {r} r
WHERE r.port >= 0
  AND EXISTS (SELECT 1 FROM ({LOCKS_QUERY}) l WHERE l.key = {RUNNER_KEY})""",
            owners=f"""
WITH locks AS MATERIALIZED ({LOCKS_QUERY}),
holders AS (
    SELECT l.pid, r.host, r.port FROM locks l JOIN {r} r ON l.key = {RUNNER_KEY}
    WHERE r.port >= 0
)
SELECT s.shard_group, s.shard_number, s.epoch, h.host, h.port
FROM {s} s
LEFT JOIN locks l ON l.key = s.id
LEFT JOIN holders h ON h.pid = l.pid
WHERE s.epoch > 0""",
            close=f"""
WITH gone AS (DELETE FROM {r} WHERE token = $1::text RETURNING id),
notes AS MATERIALIZED (SELECT pg_notify($2::text, '{{"j": 1}}') FROM gone)
SELECT pg_advisory_unlock_all(), (SELECT count(*) FROM notes)""",
        )
