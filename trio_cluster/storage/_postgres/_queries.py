"""The SQL of the PostgreSQL `MessageStorage`: one statement per call (edge adapter).

Every batch operation is a single statement over ``unnest``-ed array
parameters, so its cost in round trips does not grow with the batch; the
runtime's group commit makes batches grow with the load. A save of one
request or one reply, the common case at low load, has a single-row form
over scalar parameters (`._one_row`) that returns the same rows. Data-modifying CTEs
do the work and ``pg_notify`` the listeners in the same statement (delivered
at commit). The statements are built once per table prefix and prepared on
each connection by the driver.

Notification payloads are JSON, at most ~7 kB each (PostgreSQL's limit is
8000 bytes), split by cumulative size:

* ``{"m": [[group, number], ...], "d": earliest deliver_at or null}``:
  requests saved unclaimed in these shards;
* ``{"r": [request_id, ...]}``: replies recorded;
* ``{"i": [request_id, ...], "s": [[group, number], ...]}``: interrupts.

Shards whose group name is longer than 1000 bytes are left out of
notifications (they are hints; consumers also poll).

Fencing is strict: no write under an epoch commits after the acquisition
that moved the shard past it committed. Before it writes, every fenced
statement (a claim, a save of requests claimed by their sender, a reply)
locks the ``shards`` rows it writes under, ``FOR SHARE`` (in a ``fence`` CTE,
or a lookup per row in the batched replies, `._statement_parts`),
and compares the epoch *it locked* with the writer's. ``FOR SHARE`` waits for
an acquisition in flight (its update of the row) and then reads the row's
newest version (READ COMMITTED re-reads a locked row that changed), so a
writer either sees the new epoch and is refused, or holds the lock until its
transaction ends (a transactional handler's reply: until the handler's
transaction commits or rolls back); the acquisition (`._runner_queries`)
skips shards whose row is locked, so it never bumps an epoch under a write
in flight. Only the rows a write needs are locked: a claim locks the shards
it found requests in, a save only the shards of requests saved claimed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import attrs

from ._one_row import save_claimed, save_final_reply, save_one, save_reply_one
from ._retry_queries import RetryQueries, copy_dead_letters
from ._statement_parts import CHUNK, LONGEST_GROUP, fenced_input, shard_notes

if TYPE_CHECKING:
    from ._schema import PgNames

__all__ = ["MessageQueries"]


@attrs.frozen
class MessageQueries:
    """The message statements of one cluster (see the module docstring)."""

    save: str
    save_one: str | None
    """The single-row form of ``save`` (`._one_row`); None: a batch of one
    uses ``save`` too (the tests run the contract on both forms)."""
    claim: str
    save_replies: str
    save_reply_one: str | None
    """The single-row form of ``save_replies``; None as for ``save_one``."""
    save_claimed: str | None
    """The plain form of ``save_one`` for a new request saved claimed and
    deliverable now (`._one_row`); None: ``save_one`` saves it."""
    save_final_reply: str | None
    """The plain form of ``save_reply_one`` for a final reply without a dead
    letter; None: ``save_reply_one`` saves it."""
    replies_for: str
    ack_chunks: str
    interrupt: str
    clear_address: str
    delete_processed: str
    scan_unprocessed: str
    retries: RetryQueries
    """The statements of retries and dead letters (`._retry_queries`)."""

    @classmethod
    def build(cls, names: PgNames) -> MessageQueries:
        m, r, s = names.messages, names.replies, names.shards
        d = names.dead_letters
        return cls(
            save=_save(m, r, s),
            save_one=save_one(m, r, s, longest_group=LONGEST_GROUP),
            claim=_claim(m, s),
            save_replies=_save_replies(m, r, s, d),
            save_reply_one=save_reply_one(m, r, s, d),
            save_claimed=save_claimed(m, s),
            save_final_reply=save_final_reply(m, r, s),
            replies_for=_replies_for(m, r),
            ack_chunks=f"""
UPDATE {m} m SET acked_sequence = a.seq
FROM (
    SELECT request_id, max(seq) AS seq
    FROM unnest($1::int8[], $2::int8[]) AS t(request_id, seq)
    GROUP BY request_id
) a
WHERE m.request_id = a.request_id AND a.seq > m.acked_sequence""",
            interrupt=f"""
WITH hit AS (
    UPDATE {m} SET interrupted = true
    WHERE request_id = ANY($1::int8[]) AND processed_at IS NULL
    RETURNING request_id, shard_group, shard_number
), notes AS MATERIALIZED (
    SELECT pg_notify($2::text, json_build_object(
        'i', json_agg(request_id), 's', json_agg(json_build_array(g, n)))::text)
    FROM (
        SELECT request_id, shard_group AS g, shard_number AS n,
               sum(octet_length(to_json(shard_group)::text) + 40)
                   OVER (ORDER BY request_id) / {CHUNK} AS chunk
        FROM hit WHERE octet_length(shard_group) <= {LONGEST_GROUP}
    ) x
    GROUP BY chunk
)
SELECT (SELECT count(*) FROM hit), (SELECT count(*) FROM notes)""",
            clear_address=f"""
WITH state AS (
    DELETE FROM {names.entity_state}
    WHERE entity_id = $1::text AND entity_type = $2::text
)
DELETE FROM {m}
WHERE entity_id = $1::text AND entity_type = $2::text
  AND shard_group = $3::text AND shard_number = $4::int4""",
            delete_processed=f"""
DELETE FROM {m} m USING (
    SELECT request_id FROM {m}
    WHERE processed_at IS NOT NULL AND processed_at < $1::float8
    ORDER BY processed_at
    LIMIT $2::int8
    FOR UPDATE SKIP LOCKED
) d
WHERE m.request_id = d.request_id""",
            # Read-only, along the primary key: one page of an inspection ($1 the
            # first id wanted, $2 the page size).
            scan_unprocessed=f"""
SELECT request_id, shard_group, shard_number, entity_type, entity_id, tag,
       payload, deliver_at, stream, claimed_epoch, interrupted
FROM {m}
WHERE request_id >= $1::int8 AND processed_at IS NULL
ORDER BY request_id
LIMIT $2::int8""",
            retries=RetryQueries.build(names),
        )


def _save(m: str, r: str, s: str) -> str:
    # Parameters: $1..$13 one array per field, $14 now, $15 the channel,
    # $16 the metadata (JSON text, NULL when empty).
    # Only requests saved claimed are fenced: ``fence`` locks their shards.
    # Rows: kind 0 = inserted (request id, claimed epoch); kind 1 = per input
    # row (ord, the original found in the statement's snapshot, the epoch it
    # is claimed at *currently* or NULL, its final reply); kind 2 = summary.
    # Inserted rows are not in the snapshot: the client merges both kinds.
    return f"""
WITH fence AS MATERIALIZED (
    SELECT sh.shard_group, sh.shard_number, sh.epoch
    FROM {s} sh
    WHERE (sh.shard_group, sh.shard_number) IN (
        SELECT c.g, c.n
        FROM unnest($2::text[], $3::int4[], $10::float8[], $12::int8[])
            AS c(g, n, d, e)
        WHERE c.e IS NOT NULL AND (c.d IS NULL OR c.d <= $14::float8))
    FOR SHARE OF sh
), input AS MATERIALIZED (
    SELECT i.*, f.epoch AS shard_epoch
    FROM unnest($1::int8[], $2::text[], $3::int4[], $4::text[], $5::text[],
                $6::text[], $7::bytea[], $8::text[], $9::bytea[], $10::float8[],
                $11::bool[], $12::int8[], $13::int4[], $16::text[])
        AS i(request_id, shard_group, shard_number, entity_type, entity_id, tag,
             payload, primary_key, dedup, deliver_at, stream, claim_epoch, ord,
             metadata)
    LEFT JOIN fence f
        ON f.shard_group = i.shard_group AND f.shard_number = i.shard_number
), ins AS (
    INSERT INTO {m} (request_id, shard_group, shard_number, entity_type, entity_id,
                     tag, payload, primary_key, dedup, deliver_at, stream,
                     claimed_epoch, saved_at, metadata, attempts)
    SELECT request_id, shard_group, shard_number, entity_type, entity_id, tag,
           payload, primary_key, dedup, deliver_at, stream,
           CASE WHEN claimable THEN claim_epoch END,
           $14::float8, metadata::jsonb,
           CASE WHEN claimable THEN 1 ELSE 0 END
    FROM (
        SELECT input.*,
               coalesce((deliver_at IS NULL OR deliver_at <= $14::float8)
                        AND claim_epoch = shard_epoch, false) AS claimable
        FROM input
    ) c
    ORDER BY ord
    ON CONFLICT DO NOTHING
    RETURNING request_id, shard_group, shard_number, deliver_at, claimed_epoch
), notes AS MATERIALIZED ({shard_notes("$15::text", "ins", "claimed_epoch IS NULL")})
SELECT 0, NULL::int4, request_id, claimed_epoch, NULL::bytea FROM ins
UNION ALL
SELECT 1, i.ord, o.request_id,
       CASE WHEN o.processed_at IS NULL AND o.claimed_epoch = os.epoch
            THEN o.claimed_epoch END,
       f.payload
FROM input i
LEFT JOIN LATERAL (
    (SELECT x.request_id, x.claimed_epoch, x.processed_at, x.shard_group,
            x.shard_number
     FROM {m} x WHERE x.request_id = i.request_id)
    UNION ALL
    (SELECT x.request_id, x.claimed_epoch, x.processed_at, x.shard_group,
            x.shard_number
     FROM {m} x
     WHERE i.dedup IS NOT NULL AND x.dedup IS NOT NULL AND x.dedup = i.dedup)
    LIMIT 1
) o ON true
LEFT JOIN {s} os
    ON os.shard_group = o.shard_group AND os.shard_number = o.shard_number
LEFT JOIN {r} f ON f.request_id = o.request_id AND f.sequence IS NULL
UNION ALL
SELECT 2, count(*), NULL, NULL, NULL FROM notes"""


def _claim(m: str, s: str) -> str:
    # Parameters: $1 groups, $2 numbers, $3 epochs, $4 now, $5 limit.
    # Candidates come from three indexes, each read in order and cut at
    # limit + 1 per shard: ready (unclaimed, no deliver_at), delayed
    # (unclaimed, due) and claimed (at an older epoch, by a previous owner).
    # Requests claimed at the current epoch are in none of these ranges.
    # ``want`` checks the epochs in the snapshot (no lock: most claims find
    # nothing); ``fence`` locks the shards of the requests to claim and checks
    # again. Claiming counts an attempt. Rows: kind 0 = a claimed request
    # (column 15: it had been claimed before, at an older epoch; 17, 18: its
    # attempts, this one included, and last error), 1 = a stale shard, 2 =
    # the summary (next deliver_at in column 10, "more" in column 11).
    # A request given back by ``retry_later`` is unclaimed with a
    # ``deliver_at``: the ``delayed`` range finds it once it is due.
    return f"""
WITH want AS MATERIALIZED (
    SELECT w.g, w.n, w.e, coalesce(sh.epoch = w.e, false) AS ok
    FROM unnest($1::text[], $2::int4[], $3::int8[]) AS w(g, n, e)
    LEFT JOIN {s} sh ON sh.shard_group = w.g AND sh.shard_number = w.n
), cand AS MATERIALIZED (
    SELECT c.request_id, c.seq, w.g, w.n, w.e
    FROM want w CROSS JOIN LATERAL (
        (SELECT x.request_id, x.seq FROM {m} x
         WHERE x.shard_group = w.g AND x.shard_number = w.n
           AND x.processed_at IS NULL AND x.claimed_epoch IS NULL
           AND x.deliver_at IS NULL
         ORDER BY x.seq LIMIT $5::int4 + 1)
        UNION ALL
        (SELECT x.request_id, x.seq FROM {m} x
         WHERE x.shard_group = w.g AND x.shard_number = w.n
           AND x.processed_at IS NULL AND x.claimed_epoch IS NULL
           AND x.deliver_at IS NOT NULL AND x.deliver_at <= $4::float8
         ORDER BY x.seq LIMIT $5::int4 + 1)
        UNION ALL
        (SELECT x.request_id, x.seq FROM {m} x
         WHERE x.shard_group = w.g AND x.shard_number = w.n
           AND x.processed_at IS NULL AND x.claimed_epoch IS NOT NULL
           AND x.claimed_epoch < w.e
           AND (x.deliver_at IS NULL OR x.deliver_at <= $4::float8)
         ORDER BY x.seq LIMIT $5::int4 + 1)
    ) c
    WHERE w.ok
), top AS MATERIALIZED (
    SELECT * FROM cand ORDER BY seq LIMIT $5::int4
), fence AS MATERIALIZED (
    SELECT sh.shard_group, sh.shard_number, sh.epoch
    FROM {s} sh
    WHERE (sh.shard_group, sh.shard_number) IN (SELECT t.g, t.n FROM top t)
    FOR SHARE OF sh
), pick AS MATERIALIZED (
    SELECT x.request_id, c.e, x.claimed_epoch IS NOT NULL AS before
    FROM top c
    JOIN fence f
        ON f.shard_group = c.g AND f.shard_number = c.n AND f.epoch = c.e
    JOIN {m} x ON x.request_id = c.request_id
    WHERE x.processed_at IS NULL
      AND (x.claimed_epoch IS NULL OR x.claimed_epoch < c.e)
    FOR UPDATE OF x SKIP LOCKED
), upd AS (
    UPDATE {m} x SET claimed_epoch = p.e, attempts = x.attempts + 1
    FROM pick p WHERE x.request_id = p.request_id
    RETURNING x.request_id, x.seq, x.shard_group, x.shard_number, x.entity_type,
              x.entity_id, x.tag, x.payload, x.primary_key, x.deliver_at,
              x.stream, x.interrupted, x.next_sequence, p.e, p.before, x.metadata,
              x.attempts, x.last_error
)
SELECT 0, request_id, seq, shard_group, shard_number, entity_type, entity_id, tag,
       payload, primary_key, deliver_at, stream, interrupted, next_sequence, e,
       before, metadata::text, attempts, last_error
FROM upd
UNION ALL
SELECT 1, NULL, NULL, g, n, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL,
       NULL, NULL, NULL, NULL
FROM want w LEFT JOIN fence f ON f.shard_group = w.g AND f.shard_number = w.n
WHERE NOT w.ok OR f.epoch <> w.e
UNION ALL
SELECT 2, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL,
       (SELECT min(d.deliver_at) FROM want w CROSS JOIN LATERAL (
            SELECT x.deliver_at FROM {m} x
            WHERE x.shard_group = w.g AND x.shard_number = w.n
              AND x.processed_at IS NULL AND x.claimed_epoch IS NULL
              AND x.deliver_at IS NOT NULL AND x.deliver_at > $4::float8
            ORDER BY x.deliver_at LIMIT 1
        ) d WHERE w.ok),
       (SELECT count(*) FROM cand) > $5::int4,
       NULL, NULL, NULL, NULL, NULL, NULL, NULL"""


def _save_replies(m: str, r: str, s: str, d: str) -> str:
    # Parameters: $1 ord, $2 request ids, $3 groups, $4 numbers, $5 epochs,
    # $6 payloads, $7 sequences (NULL: final), $8 now, $9 the channel,
    # $10 dead-letter error texts (NULL: none; only on final replies),
    # $11 whether to notify (any record's `ReplyRecord.notify`: a batch that
    # needs it for one request notifies all its written ones).
    # Rows: kind 0 = per input (ord, status: u = unknown, s = stale,
    # d = recorded before, v = valid); kind 1 = a reply written (request id,
    # sequence); kind 2 = summary. The client picks each written reply's
    # input (the first valid one with that key, not after a final).
    # The reply is inserted first: the unique key (request_id, sequence) with
    # NULLs not distinct admits one final reply even against concurrent
    # writers; then the request row is updated from what was written, and a
    # final reply written with a dead-letter text copies its request (as in
    # the statement's snapshot: its attempts) to the dead letters.
    rows = """unnest($1::int4[], $2::int8[], $3::text[], $4::int4[], $5::int8[],
                $6::bytea[], $7::int8[], $10::text[])
        AS i(ord, request_id, shard_group, shard_number, epoch, payload, sequence,
             dead_letter)"""
    # A scalar probe, not EXISTS: a generic plan of EXISTS may scan the whole
    # table for the first row when the table was small at planning.
    duplicate = f"""
                WHEN i.sequence IS NOT NULL AND (
                    SELECT true FROM {r} y
                    WHERE y.request_id = i.request_id AND y.sequence = i.sequence
                    LIMIT 1
                ) THEN 'd'"""
    return f"""{
        fenced_input(m, s, rows=rows, duplicate=duplicate)
    }, chosen AS MATERIALIZED (
    SELECT request_id, sequence, payload, dead_letter FROM (
        SELECT v.*,
               row_number() OVER (PARTITION BY request_id, sequence ORDER BY ord)
                   AS rank,
               min(ord) FILTER (WHERE sequence IS NULL)
                   OVER (PARTITION BY request_id) AS final_ord
        FROM input v WHERE status = 'v'
    ) ranked
    WHERE rank = 1 AND (final_ord IS NULL OR ord <= final_ord)
), written AS (
    INSERT INTO {r} (request_id, sequence, payload)
    SELECT request_id, sequence, payload FROM chosen
    ON CONFLICT DO NOTHING
    RETURNING request_id, sequence
), dead AS ({
        copy_dead_letters(
            d,
            m,
            source="written w JOIN chosen c"
            " ON c.request_id = w.request_id AND c.sequence IS NULL",
            where="w.sequence IS NULL AND c.dead_letter IS NOT NULL",
            error="c.dead_letter",
            now="$8::float8",
        )
    }
), touched AS (
    UPDATE {m} x
    SET processed_at = CASE WHEN w.has_final THEN $8::float8 ELSE x.processed_at END,
        next_sequence = greatest(x.next_sequence, coalesce(w.last + 1, 0))
    FROM (
        SELECT request_id, bool_or(sequence IS NULL) AS has_final,
               max(sequence) AS last
        FROM written GROUP BY request_id
    ) w
    WHERE x.request_id = w.request_id
), notes AS MATERIALIZED (
    SELECT pg_notify($9::text, json_build_object('r', json_agg(request_id))::text)
    FROM (
        SELECT request_id, (row_number() OVER (ORDER BY request_id) - 1) / 300 AS chunk
        FROM (SELECT DISTINCT request_id FROM written WHERE $11::bool) d
    ) x
    GROUP BY chunk
)
SELECT 0, ord::int8, status, NULL::int8 FROM input
UNION ALL
SELECT 1, request_id, NULL, sequence FROM written
UNION ALL
SELECT 2, count(*), NULL, NULL FROM notes"""


def _replies_for(m: str, r: str) -> str:
    # Parameters: $1 ord, $2 request ids, $3 after_sequence.
    return f"""
SELECT q.ord, x.request_id IS NOT NULL, x.acked_sequence, f.payload,
       c.sequences, c.payloads
FROM unnest($1::int4[], $2::int8[], $3::int8[]) AS q(ord, request_id, after)
LEFT JOIN LATERAL (
    SELECT x.request_id, x.acked_sequence FROM {m} x
    WHERE x.request_id = q.request_id LIMIT 1
) x ON true
LEFT JOIN LATERAL (
    SELECT f.payload FROM {r} f
    WHERE f.request_id = x.request_id AND f.sequence IS NULL LIMIT 1
) f ON true
LEFT JOIN LATERAL (
    SELECT array_agg(y.sequence ORDER BY y.sequence) AS sequences,
           array_agg(y.payload ORDER BY y.sequence) AS payloads
    FROM {r} y WHERE y.request_id = x.request_id AND y.sequence > q.after
) c ON true"""
