"""SQL fragments shared by several message statements (edge adapter).

The fence and status lookup of the statements that write under an epoch
like a reply does (`._queries` save-replies, `._retry_queries`
retry-later), and the chunked ``{"m": ...}`` notification of the statements
that make requests claimable. See the `._queries` module docstring for
fencing and the notification payloads.
"""

from __future__ import annotations

__all__ = ["CHUNK", "LONGEST_GROUP", "fenced_input", "shard_notes"]

CHUNK = 6000
"""Cumulative payload size per notification, in bytes."""
LONGEST_GROUP = 1000
"""Longest shard group name sent in a notification, in bytes."""


def fenced_input(m: str, s: str, *, rows: str, duplicate: str = "") -> str:
    """The ``fence`` and ``input`` CTEs (``WITH`` included) of a batch
    written under epochs, like replies.

    ``fence`` locks the named shards' rows ``FOR SHARE`` ($3 groups, $4
    numbers); ``input`` is ``rows`` (a FROM item aliased ``i``, with
    ``request_id``, ``shard_group``, ``shard_number`` and ``epoch``) with
    each row's ``status``: u = unknown request, s = stale (another shard
    than the request's, or another epoch), d = done before (processed, or
    the SQL condition ``duplicate``), v = valid.
    """
    return f"""
WITH fence AS MATERIALIZED (
    SELECT sh.shard_group, sh.shard_number, sh.epoch
    FROM {s} sh
    WHERE (sh.shard_group, sh.shard_number) IN (
        SELECT * FROM unnest($3::text[], $4::int4[]))
    FOR SHARE OF sh
), input AS MATERIALIZED (
    SELECT i.*,
           CASE WHEN x.request_id IS NULL THEN 'u'
                WHEN x.shard_group <> i.shard_group
                     OR x.shard_number <> i.shard_number
                     OR f.epoch IS DISTINCT FROM i.epoch THEN 's'
                WHEN x.processed_at IS NOT NULL THEN 'd'{duplicate}
                ELSE 'v' END AS status
    FROM {rows}
    LEFT JOIN {m} x ON x.request_id = i.request_id
    LEFT JOIN fence f
        ON f.shard_group = i.shard_group AND f.shard_number = i.shard_number
)"""


def shard_notes(channel: str, rows: str, condition: str | None = None) -> str:
    """A query that notifies ``{"m": [[group, number], ...], "d": earliest
    deliver_at}`` on ``channel`` (an SQL expression) for the shards of
    ``rows`` (a relation with ``shard_group``, ``shard_number`` and
    ``deliver_at``) that meet ``condition``, split in chunks; one row per
    notification."""
    where = "" if condition is None else f"{condition}\n              AND "
    return f"""
    SELECT pg_notify({channel}, json_build_object(
        'm', json_agg(json_build_array(g, n)), 'd', min(d))::text)
    FROM (
        SELECT g, n, d,
               sum(octet_length(to_json(g)::text) + 16)
                   OVER (ORDER BY g, n) / {CHUNK} AS chunk
        FROM (
            SELECT shard_group AS g, shard_number AS n, min(deliver_at) AS d
            FROM {rows}
            WHERE {where}octet_length(shard_group) <= {LONGEST_GROUP}
            GROUP BY 1, 2
        ) per_shard
    ) x
    GROUP BY chunk
"""
