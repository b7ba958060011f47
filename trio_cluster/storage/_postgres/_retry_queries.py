"""The SQL of retries and dead letters on PostgreSQL (edge adapter).

The statements of `DeadLetterStorage` (`._dead_letters` runs them), and
the part of the save-replies statements (`._queries`, `._one_row`) that
copies a dead-lettered request to ``dead_letters`` in the same statement
as its final reply. Every one is a single statement, fenced like the other
message statements where it writes under an epoch (``retry_later``: see
the `._queries` module docstring), and notifies the listeners in the same
statement (delivered at commit) with the payloads described there.

A request given back by ``retry_later`` is unclaimed (``claimed_epoch``
NULL) with a ``deliver_at``, so the claim statement finds it in its
``delayed`` range once it is due, whatever epoch the shard is at. Its
``attempts`` count stays: the next claim adds one.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import attrs

from ._statement_parts import LONGEST_GROUP, fenced_input, shard_notes

if TYPE_CHECKING:
    from ._schema import PgNames

__all__ = ["RetryQueries", "copy_dead_letters"]

_COLUMNS = (
    "shard_group",
    "shard_number",
    "entity_type",
    "entity_id",
    "tag",
    "payload",
    "primary_key",
    "metadata",
    "attempts",
    "error",
    "dead_at",
    "replayed_as",
)


def copy_dead_letters(
    d: str, m: str, *, source: str, where: str, error: str, now: str
) -> str:
    """The body of a data-modifying CTE that copies requests to the dead
    letters (each with its attempts, ``error`` and ``now``).

    Args:
        d: the ``dead_letters`` table.
        m: the ``messages`` table.
        source: a FROM item of the final replies written, in which
            ``w.request_id`` is the request (joined to ``messages`` as ``x``).
        where: the condition of the requests to copy (``error`` not NULL).
        error: the SQL expression of the dead letter's error text.
        now: the SQL expression of the time of dead-lettering.

    A dead letter already stored under the request id (a request id saved
    again after its first request was deleted) is replaced, as
    `MemoryStorage` replaces it.
    """
    updates = ",\n        ".join(f"{c} = EXCLUDED.{c}" for c in _COLUMNS)
    return f"""
    INSERT INTO {d} (request_id, {", ".join(_COLUMNS)})
    SELECT x.request_id, x.shard_group, x.shard_number, x.entity_type,
           x.entity_id, x.tag, x.payload, x.primary_key, x.metadata, x.attempts,
           {error}, {now}, NULL::int8
    FROM {source}
    JOIN {m} x ON x.request_id = w.request_id
    WHERE {where}
    ON CONFLICT (request_id) DO UPDATE SET
        {updates}"""


@attrs.frozen
class RetryQueries:
    """The statements of retries and dead letters of one cluster."""

    retry_later: str
    dead_letters: str
    replay_dead_letter: str
    purge_dead_letters: str

    @classmethod
    def build(cls, names: PgNames) -> RetryQueries:
        m, d, s = names.messages, names.dead_letters, names.shards
        return cls(
            retry_later=_retry_later(m, s),
            # Read-only, along the primary key ($1 the first id wanted, $2 the
            # page size).
            dead_letters=f"""
SELECT request_id, shard_group, shard_number, entity_type, entity_id, tag,
       payload, primary_key, attempts, error, dead_at, metadata::text, replayed_as
FROM {d}
WHERE request_id >= $1::int8
ORDER BY request_id
LIMIT $2::int8""",
            replay_dead_letter=_replay(m, d),
            purge_dead_letters=f"DELETE FROM {d} WHERE request_id = ANY($1::int8[])",
        )


def _retry_later(m: str, s: str) -> str:
    # Parameters: $1 ord, $2 request ids, $3 groups, $4 numbers, $5 epochs,
    # $6 deliver_at (NULL: keep the request's), $7 errors (NULL: keep the
    # last one), $8 the channel, $9 started (false: take the claim back from
    # the attempts count, never below zero).
    # Each record's status is decided as a reply's is (u = unknown, s = stale:
    # another shard than the request's or another epoch, d = processed,
    # v = valid); of the valid records of a request the last one wins. The
    # update checks again that the request is unprocessed (a final reply that
    # committed meanwhile: READ COMMITTED re-reads the row it waited for).
    # Rows: kind 0 = per input (ord, status); kind 1 = a request given back
    # (request id); kind 2 = summary.
    rows = """unnest($1::int4[], $2::int8[], $3::text[], $4::int4[], $5::int8[],
                $6::float8[], $7::text[], $9::bool[])
        AS i(ord, request_id, shard_group, shard_number, epoch, deliver_at, error,
             started)"""
    return f"""{fenced_input(m, s, rows=rows)}, given AS (
    UPDATE {m} x
    SET claimed_epoch = NULL,
        deliver_at = coalesce(v.deliver_at, x.deliver_at),
        last_error = coalesce(v.error, x.last_error),
        attempts = CASE WHEN v.started THEN x.attempts
                        ELSE greatest(x.attempts - 1, 0) END
    FROM (
        SELECT DISTINCT ON (request_id) request_id, deliver_at, error, started
        FROM input WHERE status = 'v'
        ORDER BY request_id, ord DESC
    ) v
    WHERE x.request_id = v.request_id AND x.processed_at IS NULL
    RETURNING x.request_id, x.shard_group, x.shard_number, x.deliver_at
), notes AS MATERIALIZED ({shard_notes("$8::text", "given")})
SELECT 0, ord::int8, status FROM input
UNION ALL
SELECT 1, request_id, NULL FROM given
UNION ALL
SELECT 2, count(*), NULL FROM notes"""


def _replay(m: str, d: str) -> str:
    # Parameters: $1 the dead letter's id, $2 the new request id, $3 now,
    # $4 the channel. The dead letter is marked first (its row lock makes a
    # concurrent replay of it wait, then find it replayed); the insert has
    # no ON CONFLICT, so a taken new id fails the whole statement (a unique
    # violation: `StorageRefusedError`) and nothing changes.
    # Row: (requests saved, notifications sent).
    return f"""
WITH mark AS (
    UPDATE {d} SET replayed_as = $2::int8
    WHERE request_id = $1::int8 AND replayed_as IS NULL
    RETURNING shard_group, shard_number, entity_type, entity_id, tag, payload,
              metadata
), ins AS (
    INSERT INTO {m} (request_id, shard_group, shard_number, entity_type, entity_id,
                     tag, payload, stream, saved_at, metadata, attempts)
    SELECT $2::int8, shard_group, shard_number, entity_type, entity_id, tag,
           payload, false, $3::float8, metadata, 0
    FROM mark
    RETURNING shard_group, shard_number
), notes AS MATERIALIZED (
    SELECT pg_notify($4::text, json_build_object(
        'm', json_build_array(json_build_array(shard_group, shard_number)),
        'd', NULL)::text)
    FROM ins
    WHERE octet_length(shard_group) <= {LONGEST_GROUP}
)
SELECT (SELECT count(*) FROM ins), (SELECT count(*) FROM notes)"""
