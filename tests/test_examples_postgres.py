"""The examples run on PostgreSQL storage, and persisted messages land there.

Real server, real time (see ``tests/pg_fixture.py``). Each test uses its own
schema (``pg_schema``) and a unique table prefix, which also names the NOTIFY
channel and the advisory-lock namespace (those are database-wide).
"""

from __future__ import annotations

import uuid
from typing import TYPE_CHECKING

import pytest
import trio

from trio_cluster.storage import PostgresStorage

from .helpers import load_example

if TYPE_CHECKING:
    from tests.pg_fixture import PgAdmin, PgSchema

pytestmark = pytest.mark.postgres

# Each run opens a runner (300 shard locks), works and shuts down gracefully:
# about a second on an idle machine; the margin is for a loaded one.
TIMEOUT = 60


def storage_in(schema: PgSchema) -> PostgresStorage:
    return PostgresStorage(schema.dsn, table_prefix=f"ex_{uuid.uuid4().hex[:12]}")


async def test_counter_example_on_postgres(pg_schema, capsys):
    with trio.fail_after(TIMEOUT):
        assert await load_example("counter").main(storage_in(pg_schema)) == [7, 11]
    assert "apples=7 pears=11" in capsys.readouterr().out


async def test_order_fsm_example_on_postgres(pg_schema, capsys):
    module = load_example("order_fsm")
    with trio.fail_after(TIMEOUT):
        states = await module.main(storage_in(pg_schema))
    assert states == [
        module.Shipped(30, "TRACK-1"),
        module.Cancelled("changed my mind", refunded=0),
        module.Cancelled("not shipped in time", refunded=50),
    ]
    assert "o1 went through ['Pending', 'Paid', 'Shipped']" in capsys.readouterr().out


async def test_chat_room_example_on_postgres(pg_schema):
    with trio.fail_after(TIMEOUT):
        seen = await load_example("chat_room").main(storage_in(pg_schema))
    assert seen == ["ada: hello", "ada: anyone here?", "bob: hi ada!"]


async def test_bank_account_example_on_postgres(
    pg_schema: PgSchema, pg_admin: PgAdmin, capsys: pytest.CaptureFixture[str]
) -> None:
    module = load_example("bank_account")
    storage = storage_in(pg_schema)
    with trio.fail_after(TIMEOUT):
        assert await module.main(storage) == 120
    out = capsys.readouterr().out
    assert "deposit t1: 100" in out
    assert "deposit t2: 150" in out
    assert "deposit t1 again: 100" in out  # the retry got the stored reply
    assert "withdraw w1 refused: balance 150, requested 500" in out
    assert "withdraw w2: 120" in out

    # The persisted requests are rows: t1 once despite the retry, each one
    # processed and with its final reply; balance_of is volatile (no row).
    prefix = storage.names.prefix
    messages = pg_schema.qualified(f"{prefix}_messages")
    replies = pg_schema.qualified(f"{prefix}_replies")
    rows = pg_admin.execute(
        f"SELECT m.tag, m.primary_key, m.processed_at IS NOT NULL, r.payload"
        f" IS NOT NULL FROM {messages} m LEFT JOIN {replies} r"
        f" ON r.request_id = m.request_id AND r.sequence IS NULL"
        f" ORDER BY m.seq"
    )
    assert rows == [
        ("deposit", "t1", True, True),
        ("deposit", "t2", True, True),
        ("withdraw", "w1", True, True),
        ("withdraw", "w2", True, True),
    ]

    # A second runner on the same database: every deposit and withdrawal is
    # a duplicate of a stored request, so none runs again and each returns
    # its stored reply (the refused withdrawal is refused again, from the
    # stored error). The balance lives in the entity's memory, so the new
    # incarnation reads 0: persisted messages are not persisted state.
    with trio.fail_after(TIMEOUT):
        assert await module.main(storage) == 0
    out = capsys.readouterr().out
    assert "deposit t1: 100" in out
    assert "deposit t2: 150" in out
    assert "withdraw w1 refused: balance 150, requested 500" in out
    assert "withdraw w2: 120" in out
    count = pg_admin.execute(f"SELECT count(*) FROM {messages}")
    assert count == [(4,)]


async def test_store_then_publish_example_on_postgres(pg_schema, capsys):
    with trio.fail_after(TIMEOUT):
        module = load_example("store_then_publish")
        assert await module.main(storage_in(pg_schema)) == ["o1", "o3"]
    out = capsys.readouterr().out
    assert "o2 failed: nothing stored, nothing published" in out
    assert "shipping o2" not in out


async def test_order_saga_example_on_postgres(pg_schema, capsys, monkeypatch):
    # Real time: o3's confirmation timeout is shortened to keep it quick.
    module = load_example("order_saga")
    monkeypatch.setattr(module, "CONFIRM_WITHIN", 1.0)
    with trio.fail_after(TIMEOUT):
        ledger = await module.main(storage_in(pg_schema))
    assert ledger[-2:] == ["refund ch-o3", "release res-o3"]
    assert "o3 is compensated" in capsys.readouterr().out
