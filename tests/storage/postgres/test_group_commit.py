"""Group commit on PostgreSQL: SQL statements per persisted request under
load, and one refused request among many.

A runner on `PostgresStorage` serves a persisted RPC to 50 concurrent
callers. The driver counts every statement it sends (message connections,
transaction connections and the lock connection: `PostgresStorage.statistics`);
with group commit (saves and replies batched into one ``unnest`` statement
each) the cost per request must fall to at most one statement amortised.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import attrs
import pytest
import trio

import trio_cluster as tc
from tests import helpers
from tests.pg_fixture import unique_prefix
from trio_cluster._engine import _persisted
from trio_cluster.storage import PostgresStorage

if TYPE_CHECKING:
    from tests.pg_fixture import PgSchema

pytestmark = pytest.mark.postgres

CALLERS = 50
CALLS = 1000


@attrs.frozen
class Bump:
    amount: int


class Tally(tc.Entity):
    type_name = "LoadTally"

    def __init__(self) -> None:
        self.total = 0

    @tc.rpc(persisted=True)
    async def bump(self, msg: Bump) -> int:
        self.total += msg.amount
        return self.total


async def test_at_most_one_statement_per_persisted_request_with_50_callers(
    pg_schema: PgSchema,
) -> None:
    storage = PostgresStorage(pg_schema.dsn, table_prefix=unique_prefix())
    config = tc.ShardingConfig(shards_per_group=16, storage_poll_interval=5.0)
    with trio.fail_after(60):
        async with tc.open_runner(
            entities=[Tally], storage=storage, config=config
        ) as runner:
            await runner.wait_shards_acquired()
            refs = [runner.client(Tally)(f"t{i}") for i in range(CALLERS)]
            for ref in refs:  # activate every entity first
                await ref.bump(Bump(0))
            before = storage.statistics()
            stats_before = runner.statistics()
            done = 0

            async def caller(index: int) -> None:
                nonlocal done
                for _ in range(CALLS // CALLERS):
                    await refs[index].bump(Bump(1))
                    done += 1

            async with trio.open_nursery() as nursery:
                for index in range(CALLERS):
                    nursery.start_soon(caller, index)
            after = storage.statistics()
            stats_after = runner.statistics()
    assert done == CALLS
    statements = (after.statements - before.statements) + (
        after.lock_statements - before.lock_statements
    )
    per_request = statements / CALLS
    batches = (stats_after.save_batches - stats_before.save_batches) + (
        stats_after.reply_batches - stats_before.reply_batches
    )
    # Each request costs one save and one reply; batched, far below one
    # statement each (about 2 / batch size, plus the occasional claim and
    # lease refresh).
    assert per_request <= 1.0, (per_request, batches)
    assert batches < CALLS  # batches really formed


async def test_a_request_postgres_refuses_fails_only_its_own_call(
    pg_schema: PgSchema, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The API edge refuses a NUL in a primary key (check_storable); with
    # that check patched away, as for any refusal no edge check knows of,
    # PostgreSQL refuses the whole batched save (SQLSTATE 22021).
    # Regression (issue 11, item 9): every innocent call of the batch failed
    # with a PersistenceError that never succeeded on retry.
    monkeypatch.setattr(_persisted, "check_storable", lambda what, value: None)
    storage = PostgresStorage(pg_schema.dsn, table_prefix=unique_prefix())
    with trio.fail_after(60):
        async with tc.open_runner(
            entities=[helpers.Account],
            storage=storage,
            config=tc.ShardingConfig(shards_per_group=8),
        ) as runner:
            await runner.wait_shards_acquired()
            outcomes = await helpers.deposit_beside_a_bad_one(runner, "a\x00b")
            accounts = runner.client(helpers.Account)
            assert await accounts("z").deposit(helpers.Deposit("later", 1)) == 1
            batches = runner.statistics().save_batches
    innocent = [o for o in outcomes[:-1] if not isinstance(o, int)]
    assert innocent == [], f"{len(innocent)} innocent calls failed: {innocent[:1]}"
    refused = outcomes[-1]
    assert isinstance(refused, tc.MalformedMessageError), refused
    assert "22021" in str(refused)
    assert isinstance(refused.__cause__, tc.StorageRefusedError)
    assert batches < 100  # the saves were batched
