"""Single-row forms of the save statements (edge adapter).

A batch of one request or one reply is the common case at low load: the
runtime's group commit writes each item alone when nothing else is pending,
so a sequential caller's every request and reply is a batch of one. The
batch statements (`._queries`) read their rows from ``unnest``-ed arrays,
join them in materialized CTEs and rank them with window functions; for one
row that is most of the statement's cost, on the server (planning and
executing the CTEs) and in the client (dumping fourteen one-element
arrays). These statements do the same for one row from scalar parameters,
under the same rules (the same fence, the same duplicate lookup, the same
notification payloads), and return rows of the same shape, so that
`PgMessages` reads both alike (but for the row of kind 1 of a request
inserted, which is left out: it has no original to look up).

The most common single-row writes of all, a sequential caller's to an
entity of its own shard, have a plainer form still: `save_claimed` (a new
request saved claimed by its sender) and `save_final_reply` (the final
reply of a request not yet answered, no dead letter). Each is one fenced
``INSERT ... SELECT`` with no lookup of what else could have happened: when
it writes nothing (the request was saved already, the fence refused, the
request was answered or is unknown), the general single-row statement runs
next and decides, as it would have alone (a write that a statement did not
make is made or refused by the next under the same rules). Measured alone,
the plain forms take off about a sixth of the two statements' time (see
benchmarks/RESULTS.md, "W3: plainer statements for the sequential path").
"""

from __future__ import annotations

from ._retry_queries import copy_dead_letters

__all__ = ["save_claimed", "save_final_reply", "save_one", "save_reply_one"]


def save_one(m: str, r: str, s: str, *, longest_group: int) -> str:
    """Save one request.

    Parameters: $1 request id, $2 group, $3 number, $4 entity type, $5 entity
    id, $6 tag, $7 payload, $8 primary key, $9 dedup hash, $10 deliver_at,
    $11 stream, $12 claim epoch, $13 ord, $14 now, $15 the channel, $16 the
    metadata (JSON text or NULL). Rows: as the batch ``save``. A shard whose
    group name is longer than ``longest_group`` bytes is left out of the
    notification, as there.
    """
    return f"""
WITH fence AS MATERIALIZED (
    SELECT sh.epoch
    FROM {s} sh
    WHERE sh.shard_group = $2::text AND sh.shard_number = $3::int4
      AND $12::int8 IS NOT NULL
      AND ($10::float8 IS NULL OR $10::float8 <= $14::float8)
    FOR SHARE OF sh
), ins AS (
    INSERT INTO {m} (request_id, shard_group, shard_number, entity_type, entity_id,
                     tag, payload, primary_key, dedup, deliver_at, stream,
                     claimed_epoch, saved_at, metadata, attempts)
    SELECT $1::int8, $2::text, $3::int4, $4::text, $5::text, $6::text, $7::bytea,
           $8::text, $9::bytea, $10::float8, $11::bool, c.epoch,
           $14::float8, $16::text::jsonb, CASE WHEN c.epoch IS NULL THEN 0 ELSE 1 END
    FROM (SELECT (SELECT f.epoch FROM fence f WHERE f.epoch = $12::int8) AS epoch) c
    ON CONFLICT DO NOTHING
    RETURNING request_id, claimed_epoch
), notes AS MATERIALIZED (
    SELECT pg_notify($15::text, json_build_object(
        'm', json_build_array(json_build_array($2::text, $3::int4)),
        'd', $10::float8)::text)
    FROM ins
    WHERE ins.claimed_epoch IS NULL AND octet_length($2::text) <= {longest_group}
)
SELECT 0, NULL::int4, request_id, claimed_epoch, NULL::bytea FROM ins
UNION ALL
SELECT 1, $13::int4, o.request_id,
       CASE WHEN o.processed_at IS NULL AND o.claimed_epoch = os.epoch
            THEN o.claimed_epoch END,
       f.payload
FROM (VALUES (1)) AS one (x)
LEFT JOIN LATERAL (
    (SELECT x.request_id, x.claimed_epoch, x.processed_at, x.shard_group,
            x.shard_number
     FROM {m} x WHERE x.request_id = $1::int8)
    UNION ALL
    (SELECT x.request_id, x.claimed_epoch, x.processed_at, x.shard_group,
            x.shard_number
     FROM {m} x
     WHERE $9::bytea IS NOT NULL AND x.dedup IS NOT NULL AND x.dedup = $9::bytea)
    LIMIT 1
) o ON true
LEFT JOIN {s} os
    ON os.shard_group = o.shard_group AND os.shard_number = o.shard_number
LEFT JOIN {r} f ON f.request_id = o.request_id AND f.sequence IS NULL
WHERE NOT EXISTS (SELECT FROM ins)
UNION ALL
SELECT 2, count(*), NULL, NULL, NULL FROM notes"""


def save_reply_one(m: str, r: str, s: str, d: str) -> str:
    """Save one reply.

    Parameters: $1 request id, $2 group, $3 number, $4 epoch, $5 payload, $6
    sequence (NULL: final), $7 now, $8 the channel, $9 the dead-letter error
    text (NULL: none). Rows: as the batch ``save_replies`` (the input's ord
    is 0); a final reply written with a dead-letter text copies its request
    to the dead letters (``d``), as there.
    """
    return f"""
WITH fence AS MATERIALIZED (
    SELECT sh.epoch
    FROM {s} sh
    WHERE sh.shard_group = $2::text AND sh.shard_number = $3::int4
    FOR SHARE OF sh
), input AS MATERIALIZED (
    SELECT CASE WHEN x.request_id IS NULL THEN 'u'
                WHEN x.shard_group <> $2::text OR x.shard_number <> $3::int4
                     OR (SELECT f.epoch FROM fence f) IS DISTINCT FROM $4::int8
                    THEN 's'
                WHEN x.processed_at IS NOT NULL THEN 'd'
                WHEN $6::int8 IS NOT NULL AND EXISTS (
                    SELECT 1 FROM {r} y
                    WHERE y.request_id = $1::int8 AND y.sequence = $6::int8
                ) THEN 'd'
                ELSE 'v' END AS status
    FROM (VALUES (1)) AS one (x)
    LEFT JOIN {m} x ON x.request_id = $1::int8
), written AS (
    INSERT INTO {r} (request_id, sequence, payload)
    SELECT $1::int8, $6::int8, $5::bytea FROM input WHERE status = 'v'
    ON CONFLICT DO NOTHING
    RETURNING request_id, sequence
), dead AS ({
        copy_dead_letters(
            d,
            m,
            source="written w",
            where="w.sequence IS NULL AND $9::text IS NOT NULL",
            error="$9::text",
            now="$7::float8",
        )
    }
), touched AS (
    UPDATE {m} x
    SET processed_at = CASE WHEN w.sequence IS NULL THEN $7::float8
                            ELSE x.processed_at END,
        next_sequence = greatest(x.next_sequence, coalesce(w.sequence + 1, 0))
    FROM written w
    WHERE x.request_id = w.request_id
), notes AS MATERIALIZED (
    SELECT pg_notify($8::text, json_build_object(
        'r', json_build_array(request_id))::text)
    FROM written
)
SELECT 0, 0::int8, status, NULL::int8 FROM input
UNION ALL
SELECT 1, request_id, NULL, sequence FROM written
UNION ALL
SELECT 2, count(*), NULL, NULL FROM notes"""


def save_claimed(m: str, s: str) -> str:
    """Save one new request claimed by its sender, deliverable now.

    Parameters: $1 request id, $2 group, $3 number, $4 entity type, $5 entity
    id, $6 tag, $7 payload, $8 primary key, $9 dedup hash, $10 stream, $11
    claim epoch, $12 now, $13 the metadata (JSON text or NULL). Rows: the row
    of kind 0 of `save_one` when the request was inserted claimed; none
    otherwise (its id or dedup hash was taken, or the shard's epoch is not
    $11): then `save_one` decides. The fence is `save_one`'s: the shard's row
    is locked ``FOR SHARE`` and its newest epoch compared. Nothing to notify:
    a request saved claimed is run by its sender.
    """
    return f"""
INSERT INTO {m} (request_id, shard_group, shard_number, entity_type, entity_id,
                 tag, payload, primary_key, dedup, deliver_at, stream,
                 claimed_epoch, saved_at, metadata, attempts)
SELECT $1::int8, $2::text, $3::int4, $4::text, $5::text, $6::text, $7::bytea,
       $8::text, $9::bytea, NULL, $10::bool, sh.epoch, $12::float8,
       $13::text::jsonb, 1
FROM {s} sh
WHERE sh.shard_group = $2::text AND sh.shard_number = $3::int4
  AND sh.epoch = $11::int8
FOR SHARE OF sh
ON CONFLICT DO NOTHING
RETURNING 0, NULL::int4, request_id, claimed_epoch, NULL::bytea"""


def save_final_reply(m: str, r: str, s: str) -> str:
    """Save the final reply of a request not yet answered (no dead letter).

    Parameters: $1 request id, $2 group, $3 number, $4 epoch, $5 payload, $6
    now, $7 the channel, $8 whether to notify (`ReplyRecord.notify`). One
    row (the request id, the notifications sent)
    when the reply was recorded; none otherwise (the request is unknown, in
    another shard, answered already, or the shard's epoch is not $4): then
    `save_reply_one` decides. The fence is `save_reply_one`'s (the shard's
    row locked ``FOR SHARE``, its newest epoch compared); the request is
    marked processed and the reply notified, as there.
    """
    return f"""
WITH fence AS MATERIALIZED (
    SELECT x.request_id
    FROM {m} x
    JOIN {s} sh ON sh.shard_group = x.shard_group AND sh.shard_number = x.shard_number
    WHERE x.request_id = $1::int8 AND x.shard_group = $2::text
      AND x.shard_number = $3::int4 AND x.processed_at IS NULL
      AND sh.epoch = $4::int8
    FOR SHARE OF sh
), written AS (
    INSERT INTO {r} (request_id, sequence, payload)
    SELECT request_id, NULL, $5::bytea FROM fence
    ON CONFLICT DO NOTHING
    RETURNING request_id
), touched AS (
    UPDATE {m} x SET processed_at = $6::float8
    FROM written w
    WHERE x.request_id = w.request_id
), notes AS MATERIALIZED (
    SELECT pg_notify($7::text, json_build_object(
        'r', json_build_array(request_id))::text)
    FROM written
    WHERE $8::bool
)
SELECT request_id, (SELECT count(*) FROM notes) FROM written"""
