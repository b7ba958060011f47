"""An order saga as a durable workflow: steps journaled once, compensations
run newest first when a step fails for good, a signal with a durable timeout.

Run it with ``python examples/order_saga.py``.

``place_order`` reserves the stock, charges the card, waits (durably) for
the warehouse to confirm, and ships. Each step's result is recorded once:
after a crash or failover the workflow replays from its journal and runs
only what is left. When a step fails for good (here, a declined card) the
steps done so far are undone in reverse order (the charge is refunded, then
the stock released), and the execution ends *compensated*.
"""

from __future__ import annotations

import attrs
import trio

import trio_cluster as tc
from trio_cluster.abc import Storage
from trio_cluster.workflows import (
    SignalTimeoutError,
    WorkflowContext,
    WorkflowFailedError,
    workflow,
)

CONFIRM_WITHIN = 600.0
"""Seconds the warehouse has to confirm an order."""

LEDGER: list[str] = []
"""What the services below did, in order (a real saga calls other systems)."""


@attrs.frozen
class Order:
    id: str
    item: str
    amount: int


@attrs.frozen
class Placed:
    order: str
    reservation: str
    charge: str
    tracking: str


class CardDeclinedError(Exception):
    pass


# The services each step calls (at least once each: keep them idempotent,
# e.g. keyed by order id).


async def reserve_stock(order: Order) -> str:
    LEDGER.append(f"reserve {order.item} for {order.id}")
    return f"res-{order.id}"


async def release_stock(order: Order, reservation: str) -> None:
    LEDGER.append(f"release {reservation}")


async def charge_card(order: Order) -> str:
    if order.amount > 1000:
        raise CardDeclinedError(f"{order.amount} is over the limit")
    LEDGER.append(f"charge {order.amount} for {order.id}")
    return f"ch-{order.id}"


async def refund_card(order: Order, charge: str) -> None:
    LEDGER.append(f"refund {charge}")


async def ship(order: Order) -> str:
    LEDGER.append(f"ship {order.id}")
    return f"TRACK-{order.id}"


@workflow(
    name="place_order",
    idempotency_key=lambda order: order.id,
    retry=tc.RetryPolicy(max_attempts=3, non_retryable=(CardDeclinedError,)),
)
async def place_order(ctx: WorkflowContext, order: Order) -> Placed:
    reservation = await ctx.step(reserve_stock, order, compensate=release_stock)
    charge = await ctx.step(charge_card, order, compensate=refund_card)
    try:
        await ctx.wait_signal("confirmed", bool, timeout=CONFIRM_WITHIN)
    except SignalTimeoutError:
        raise  # not confirmed in time: undo the order
    tracking = await ctx.step(ship, order)
    return Placed(order.id, reservation, charge, tracking)


async def main(storage: Storage | None = None) -> list[str]:
    LEDGER.clear()
    async with tc.open_runner(entities=[place_order.entity], storage=storage) as runner:
        orders = place_order.client(runner)

        # o1 goes through: the warehouse confirms it.
        handle = await orders.start(Order("o1", "book", 30))
        await handle.signal("confirmed", True)
        print("o1:", await handle.result())

        # o2's card is declined: the stock is released again.
        try:
            await orders.execute(Order("o2", "lamp", 5000))
        except WorkflowFailedError as exc:
            print("o2:", exc)

        # o3 is never confirmed: after CONFIRM_WITHIN it is undone.
        o3 = await orders.start(Order("o3", "desk", 200))
        with trio.move_on_after(CONFIRM_WITHIN + 60):
            try:
                await o3.result()
            except WorkflowFailedError as exc:
                print("o3:", exc)
        print("o3 is", (await o3.poll()).status.value)
    print("ledger:", LEDGER)
    return list(LEDGER)


if __name__ == "__main__":
    trio.run(main)
