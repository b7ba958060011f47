"""The hot statements use indexes on tables never analyzed yet (real server).

The planner takes a table never analyzed for at least 10 pages (about 200
message rows; its actual size beyond), and the generic plans the runners'
connections make while it is that small (``force_generic_plan``) are kept
until something invalidates them, such as autovacuum's first ``ANALYZE`` of
the table. A join of a batch's rows with
``messages`` planned that way reads the whole table for every batch, however
large it has grown meanwhile (with 5,000 messages, a batch of 50 replies
spent 1 ms of its 2.8 ms so). The statements of a call's path must reach
``messages`` and ``replies`` by their indexes whatever the statistics say,
and so must durable state's reach ``entity_state``.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

import psycopg
import pytest

from tests.pg_fixture import unique_prefix
from tests.storage.postgres.test_queries import generic_plan
from trio_cluster.storage import PostgresStorage
from trio_cluster.storage._postgres._queries import MessageQueries
from trio_cluster.storage._postgres._state import StateQueries

if TYPE_CHECKING:
    from tests.pg_fixture import PgSchema

pytestmark = pytest.mark.postgres

HOT = (
    "save",
    "save_one",
    "save_claimed",
    "claim",
    "save_replies",
    "save_reply_one",
    "save_final_reply",
    "replies_for",
)
"""The statements of a persisted call: saving, claiming, replying, and a
remote caller's reading of the replies."""
HOT_STATE = ("load", "save", "save_many")
"""Durable entity state: loading and saving, one entity or a batch."""


def _nulls(query: str) -> str:
    """One NULL argument per parameter (``$n``) of ``query``."""
    count = max((int(n) for n in re.findall(r"\$(\d+)", query)), default=0)
    return ", ".join(["NULL"] * count)


async def test_hot_statements_use_indexes_before_the_first_analyze(
    pg_schema: PgSchema,
) -> None:
    storage = PostgresStorage(pg_schema.dsn, table_prefix=unique_prefix())
    async with storage.open_session(name="young", lease_duration=5.0):
        pass
    names = storage.names
    grown = {names.messages, names.replies, names.entity_state}
    messages, state = MessageQueries.build(names), StateQueries.build(names)
    statements = [
        *((name, getattr(messages, name)) for name in HOT),
        *((f"state_{name}", getattr(state, name)) for name in HOT_STATE),
    ]
    with psycopg.connect(pg_schema.dsn, autocommit=True) as conn:
        never = conn.execute(
            "SELECT count(*) FROM pg_class WHERE oid = ANY(%s::regclass[])"
            " AND reltuples < 0",
            [sorted(grown)],
        ).fetchall()
        assert never == [(len(grown),)]  # none analyzed: the case under test
        conn.execute("SET plan_cache_mode = force_generic_plan")
        for name, query in statements:
            assert query, name
            plan = generic_plan(conn, f"young_{name}", query, _nulls(query))
            read = {node.get("Relation Name") for node in plan} & grown
            seq = [
                node["Relation Name"]
                for node in plan
                if node["Node Type"] == "Seq Scan"
                and node.get("Relation Name") in grown
            ]
            assert read, name
            assert not seq, (name, seq)
