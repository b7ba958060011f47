"""The event bus on a real runner and a real PostgreSQL server, with the
connection of the publishing transaction terminated before the
publication, after it, and after the handler's last statement (its reply
and the commit come next): the row and the event commit together once (the
handler runs again after the failure), never an event without the row, nor
a lost or phantom one. And idle consumers read nothing, yet are woken by a
publication, a replay, or a lost LISTEN connection."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

import attrs
import pytest
import trio

import trio_cluster as tc
from tests.pg_fixture import unique_prefix
from trio_cluster.events import Event, Subscription, Topic, event_bus
from trio_cluster.storage import PostgresStorage
from trio_cluster.storage._postgres._events import PgEvents
from trio_cluster.storage._postgres._message_parts import PgTransaction

from .test_runner_faults import TIMEOUT, config, sql, until

if TYPE_CHECKING:
    from tests.pg_fixture import PgSchema

pytestmark = pytest.mark.postgres


@attrs.frozen
class Sale:
    key: str


TOPIC = Topic("sales", Sale, partitions=4)
SEEN: list[str] = []


async def collect(event: Event[Sale]) -> None:
    SEEN.append(event.value.key)


class Till(tc.Entity):
    """Writes the sale and publishes it: in one transaction."""

    type_name = "EventTill"
    kill_at: ClassVar[dict[str, int]] = {}
    admin_dsn: ClassVar[str] = ""
    runs: ClassVar[dict[str, int]] = {}

    @tc.rpc(persisted=True, transactional=True, primary_key=lambda m: m.key)
    async def sell(self, msg: Sale) -> str:
        Till.runs[msg.key] = Till.runs.get(msg.key, 0) + 1
        transaction = tc.current_transaction()
        await transaction.execute("INSERT INTO sales (key) VALUES ($1)", [msg.key])
        await cut(msg.key, 0, transaction)
        await event_bus(tc.current_runner()).publish(TOPIC, msg, key=msg.key)
        await cut(msg.key, 1, transaction)
        await transaction.execute("SELECT 1")
        await cut(msg.key, 2, transaction)  # the reply and the commit come next
        return msg.key


async def cut(key: str, boundary: int, transaction: tc.abc.StorageTransaction) -> None:
    if Till.kill_at.get(key) != boundary:
        return
    del Till.kill_at[key]
    assert isinstance(transaction, PgTransaction)
    await transaction.begin()  # its connection is taken at its first statement
    pid = transaction.connection.backend_pid
    await sql(Till.admin_dsn, "SELECT pg_terminate_backend($1::int4, 5000)", [pid])


@pytest.mark.parametrize("boundary", [0, 1, 2])
async def test_row_and_event_commit_together_once(
    pg_schema: PgSchema, boundary: int
) -> None:
    await sql(pg_schema.dsn, "CREATE TABLE sales (key text NOT NULL)")
    prefix = unique_prefix()
    storage = PostgresStorage(pg_schema.dsn, table_prefix=prefix)
    SEEN.clear()
    Till.runs = {}
    Till.admin_dsn = pg_schema.base_dsn
    Till.kill_at = {"cut": boundary}
    sub = Subscription(TOPIC, "audit", collect, start="earliest")
    with trio.fail_after(TIMEOUT):
        async with tc.open_runner(
            entities=[Till], storage=storage, config=config(), singletons=sub.consumers
        ) as runner:
            await runner.wait_shards_acquired()
            assert await runner.client(Till)("t").sell(Sale("cut")) == "cut"
            assert await runner.client(Till)("t").sell(Sale("clean")) == "clean"
            await until(lambda: len(SEEN) >= 2, "both events are delivered")
            await trio.sleep(0.5)  # a phantom event would come now
    assert Till.runs == {"cut": 2, "clean": 1}
    assert sorted(SEEN) == ["clean", "cut"]
    assert sorted(await sql(pg_schema.dsn, "SELECT key FROM sales")) == [
        ("clean",),
        ("cut",),
    ]
    events = await sql(pg_schema.dsn, f"SELECT key FROM {prefix}_event_log")
    assert sorted(events) == [("clean",), ("cut",)]


async def test_idle_consumers_read_nothing_until_a_publication_replay_or_lost_listener(
    pg_schema: PgSchema, monkeypatch: pytest.MonkeyPatch
) -> None:
    reads: list[str] = []

    def counting(name: str) -> Any:
        original = getattr(PgEvents, name)

        async def counted(self: PgEvents, *args: Any, **kwargs: Any) -> Any:
            reads.append(name)
            return await original(self, *args, **kwargs)

        return counted

    for name in ("read", "positions"):
        monkeypatch.setattr(PgEvents, name, counting(name))
    prefix = unique_prefix()
    storage = PostgresStorage(pg_schema.dsn, table_prefix=prefix)
    SEEN.clear()
    sub = Subscription(TOPIC, "quiet", collect, start="earliest")
    with trio.fail_after(TIMEOUT):
        async with tc.open_runner(
            storage=storage, config=config(), singletons=sub.consumers
        ) as runner:
            await runner.wait_shards_acquired()
            bus = event_bus(runner)
            await bus.publish(TOPIC, Sale("first"), key="first")
            await until(lambda: SEEN == ["first"], "the first event is delivered")
            await trio.sleep(0.5)  # every consumer waits
            reads.clear()
            await trio.sleep(3)
            assert reads == []  # idle: nothing read
            # The bus's LISTEN connection is terminated: every consumer is
            # woken once it is open again, reads once, and waits again.
            [(killed,)] = await sql(
                pg_schema.base_dsn,
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
                " WHERE application_name LIKE 'trio_cluster bus %'",
            )
            assert killed == 1
            await bus.publish(TOPIC, Sale("second"), key="second")
            await until(lambda: SEEN == ["first", "second"], "the second event")
            # A replay wakes the consumers through its notification.
            await bus.replay(sub, from_offset="earliest")
            await until(
                lambda: sorted(SEEN) == sorted(2 * ["first", "second"]), "replay"
            )
            await trio.sleep(0.5)
            reads.clear()
            await trio.sleep(3)
            assert reads == []
