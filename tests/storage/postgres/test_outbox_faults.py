"""The transactional outbox on a real runner and a real PostgreSQL server,
with the connection of a transactional handler's transaction terminated at
each boundary between its statements: its write, the message it sends and
its reply commit together once (the handler runs again after the failure),
never a message without the write, nor one twice."""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

import attrs
import pytest
import trio

import trio_cluster as tc
from tests.pg_fixture import unique_prefix
from trio_cluster.storage import PostgresStorage
from trio_cluster.storage._postgres._message_parts import PgTransaction

from .test_runner_faults import TIMEOUT, config, sql, until

if TYPE_CHECKING:
    from tests.pg_fixture import PgSchema

pytestmark = pytest.mark.postgres


@attrs.frozen
class Order:
    key: str


class Mail(tc.Entity):
    type_name = "OutboxMail"
    sent: ClassVar[list[str]] = []

    @tc.rpc(persisted=True)
    async def send(self, msg: Order) -> None:
        Mail.sent.append(msg.key)


class Shop(tc.Entity):
    """Writes the order, sends its mail, answers: in one transaction."""

    type_name = "OutboxShop"
    kill_at: ClassVar[dict[str, int]] = {}
    """Order key -> the boundary (0, 1, 2) its first run is cut at."""
    admin_dsn: ClassVar[str] = ""
    runs: ClassVar[dict[str, int]] = {}

    @tc.rpc(persisted=True, transactional=True, primary_key=lambda m: m.key)
    async def buy(self, msg: Order) -> str:
        Shop.runs[msg.key] = Shop.runs.get(msg.key, 0) + 1
        transaction = tc.current_transaction()
        await cut(msg.key, 0, transaction)
        await transaction.execute("INSERT INTO orders (key) VALUES ($1)", [msg.key])
        await cut(msg.key, 1, transaction)
        await tc.current_runner().client(Mail)(msg.key).send.discard(msg)
        await cut(msg.key, 2, transaction)  # the reply's save comes next
        return msg.key


async def cut(key: str, boundary: int, transaction: tc.abc.StorageTransaction) -> None:
    """Terminate the transaction's connection at ``boundary``, once."""
    if Shop.kill_at.get(key) != boundary:
        return
    del Shop.kill_at[key]
    assert isinstance(transaction, PgTransaction)
    await transaction.begin()  # its connection is taken at its first statement
    pid = transaction.connection.backend_pid
    await sql(Shop.admin_dsn, "SELECT pg_terminate_backend($1::int4, 5000)", [pid])


@pytest.mark.parametrize("boundary", [0, 1, 2])
async def test_write_message_and_reply_commit_together_once(
    pg_schema: PgSchema, boundary: int
) -> None:
    await sql(pg_schema.dsn, "CREATE TABLE orders (key text NOT NULL)")
    prefix = unique_prefix()
    storage = PostgresStorage(pg_schema.dsn, table_prefix=prefix)
    Mail.sent, Shop.runs = [], {}
    Shop.admin_dsn = pg_schema.base_dsn
    Shop.kill_at = {"cut": boundary}
    with trio.fail_after(TIMEOUT):
        async with tc.open_runner(
            entities=[Shop, Mail], storage=storage, config=config()
        ) as runner:
            await runner.wait_shards_acquired()
            assert await runner.client(Shop)("s").buy(Order("cut")) == "cut"
            assert await runner.client(Shop)("s").buy(Order("clean")) == "clean"
            await until(lambda: len(Mail.sent) >= 2, "both mails are delivered")
            await trio.sleep(0.5)  # a phantom second mail would come now
    assert Shop.runs == {"cut": 2, "clean": 1}
    assert sorted(Mail.sent) == ["clean", "cut"]
    assert sorted(await sql(pg_schema.dsn, "SELECT key FROM orders")) == [
        ("clean",),
        ("cut",),
    ]
    mails = await sql(
        pg_schema.dsn,
        f"SELECT count(*) FROM {prefix}_messages WHERE entity_type = $1",
        [Mail.type_name],
    )
    assert mails == [(2,)]
