"""Store, then publish: a row and its event commit together, or neither.

A transactional handler writes the order (on PostgreSQL, a row in its
own table) and publishes ``OrderPlaced`` in the same transaction. When the
handler crashes after publishing, the transaction rolls back: no row, and
the event never reaches the subscriber. A transactional subscriber handles
each event in a transaction of its own, which also advances its cursor.

    python examples/store_then_publish.py            # memory storage
    python examples/store_then_publish.py "postgresql://localhost/test"
"""

from __future__ import annotations

import sys

import attrs
import trio

import trio_cluster as tc
from trio_cluster.events import Event, Subscription, Topic, event_bus
from trio_cluster.storage import PostgresStorage


@attrs.frozen
class PlaceOrder:
    order_id: str
    customer: str
    crash: bool = False


@attrs.frozen
class OrderPlaced:
    order_id: str
    customer: str


ORDERS = Topic("orders", OrderPlaced, partitions=4)
TABLE = "example_orders"
SEEN: list[str] = []


class Crash(Exception):
    pass


async def on_sql(statement: str, *params: object) -> list[tuple[object, ...]]:
    """Run SQL in the current transaction on PostgreSQL (memory has no SQL)."""
    if isinstance(STORAGE, PostgresStorage):
        return await tc.current_transaction().execute(statement, params)
    return []


class Shop(tc.Entity):
    type_name = "Shop"

    @tc.rpc(
        persisted=True,
        transactional=True,
        primary_key=lambda m: m.order_id,
        retry=tc.RetryPolicy(max_attempts=1),
    )
    async def place(self, order: PlaceOrder) -> str:
        await on_sql(
            f"INSERT INTO {TABLE} (id, customer) VALUES ($1, $2)",
            order.order_id,
            order.customer,
        )
        runner = tc.current_runner()
        await event_bus(runner).publish(
            ORDERS, OrderPlaced(order.order_id, order.customer), key=order.customer
        )
        if order.crash:
            raise Crash(order.order_id)  # rolls back the row and the event
        return order.order_id


async def ship(event: Event[OrderPlaced]) -> None:
    # On PostgreSQL the row is there: it committed with the event.
    rows = await on_sql(
        f"SELECT count(*) FROM {TABLE} WHERE id = $1", event.value.order_id
    )
    assert rows == ([(1,)] if isinstance(STORAGE, PostgresStorage) else []), rows
    SEEN.append(event.value.order_id)
    print(f"shipping {event.value.order_id} to {event.value.customer}")


shipping = Subscription(ORDERS, "shipping", ship, start="earliest", transactional=True)
STORAGE: tc.abc.Storage | None = None


async def main(storage: tc.abc.Storage | None = None) -> list[str]:
    global STORAGE
    STORAGE = storage
    SEEN.clear()
    async with tc.open_runner(
        entities=[Shop], storage=storage, singletons=shipping.consumers
    ) as runner:
        if isinstance(storage, PostgresStorage):
            async with runner.transaction() as transaction:
                await transaction.execute(
                    f"CREATE TABLE IF NOT EXISTS {TABLE} (id text PRIMARY KEY, customer text)"
                )
        shop = runner.client(Shop)("main")
        for order in (
            PlaceOrder("o1", "ada"),
            PlaceOrder("o2", "bob", crash=True),
            PlaceOrder("o3", "ada"),
        ):
            try:
                await shop.place(order)
            except tc.DeadLetteredError:
                print(f"{order.order_id} failed: nothing stored, nothing published")
        with trio.fail_after(30):
            while len(SEEN) < 2:  # noqa: ASYNC110
                await trio.sleep(0.05)
        await trio.sleep(0.5)  # o2 would have arrived by now: it never does
    return sorted(SEEN)


if __name__ == "__main__":
    trio.run(main, PostgresStorage(sys.argv[1]) if len(sys.argv) > 1 else None)
