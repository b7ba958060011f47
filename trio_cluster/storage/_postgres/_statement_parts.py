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
    """The ``input`` CTE (``WITH`` included) of a batch written under
    epochs, like replies: ``rows`` (a FROM item aliased ``i``, with
    ``request_id``, ``shard_group``, ``shard_number`` and ``epoch``) with
    each row's ``status``: u = unknown request, s = stale (another shard
    than the request's, or another epoch), d = done before (processed, or
    the SQL condition ``duplicate``), v = valid.

    The fence: each row's shard row is locked ``FOR SHARE`` and its newest
    epoch compared. Its request and its shard are each found by a lookup of
    its own (a ``LATERAL`` subquery that the planner cannot turn into a
    join): a generic plan made while ``messages`` was small would otherwise
    join the batch with a scan of the whole table, and the shards in a
    nested loop over the batch.
    """
    return f"""
WITH input AS MATERIALIZED (
    SELECT i.*,
           CASE WHEN x.request_id IS NULL THEN 'u'
                WHEN x.shard_group <> i.shard_group
                     OR x.shard_number <> i.shard_number
                     OR f.epoch IS DISTINCT FROM i.epoch THEN 's'
                WHEN x.processed_at IS NOT NULL THEN 'd'{duplicate}
                ELSE 'v' END AS status
    FROM {rows}
    LEFT JOIN LATERAL (
        SELECT x.request_id, x.shard_group, x.shard_number, x.processed_at
        FROM {m} x WHERE x.request_id = i.request_id
        LIMIT 1
    ) x ON true
    LEFT JOIN LATERAL (
        SELECT sh.epoch
        FROM {s} sh
        WHERE sh.shard_group = i.shard_group AND sh.shard_number = i.shard_number
        FOR SHARE OF sh
    ) f ON true
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
