"""An order shipped in parallel by child workflows: a nursery of children,
a child's failure compensating the whole order, and an interrupt reaching
the children.

Run it with ``python examples/parallel_shipping.py``: it runs on Trio's
virtual clock (``MockClock``), so the parcels' minutes in transit pass at once.

``place_order`` charges the card (a transactional step: its note to the
``Accounts`` entity is sent exactly once, with the step's result), then
ships every parcel at once, each by its own ``ship_parcel`` child workflow
(which packs the parcel and waits, durably, for the courier's minutes in
transit). The parent waits for its children with no task and no timer; each
child wakes it when it ends. Journal positions come from the code's
structure (the i-th parcel's child is at ``(1, i, 0)``), so replay finds
each child whatever order they finished in.

* o1's two parcels arrive (after 3 minutes, not 2 + 3);
* o2's second parcel is lost: that child compensates itself (unpacks), the
  order fails and compensates, newest position first: the delivered parcel
  is recalled, then the charge refunded;
* o3 is cancelled while its parcels travel: its children are interrupted
  (they unpack) before the charge is refunded.
"""

from __future__ import annotations

import attrs
import trio
import trio.testing

import trio_cluster as tc
from trio_cluster.abc import Storage
from trio_cluster.workflows import WorkflowContext, WorkflowFailedError, workflow

LEDGER: list[str] = []
"""What the services did, in order (a real order calls other systems)."""

MINUTE = 60.0


@attrs.frozen
class Parcel:
    order: str
    item: str
    minutes: int
    """The courier's time in transit."""
    lost: bool = False


@attrs.frozen
class Order:
    id: str
    amount: int
    parcels: list[Parcel]


@attrs.frozen
class Note:
    text: str


class Accounts(tc.Entity):
    """The accounting side: it hears of each charge and refund once."""

    type_name = "Accounts"

    @tc.rpc(persisted=True)
    async def note(self, msg: Note) -> None:
        LEDGER.append(f"accounts: {msg.text}")


class LostParcelError(Exception):
    pass


# The services each step calls.


async def charge_card(order: Order) -> str:
    accounts = tc.current_runner().client(Accounts)("books")
    # In the step's savepoint: sent with its recorded result, or not at all.
    await accounts.note.discard(Note(f"charged {order.amount} for {order.id}"))
    LEDGER.append(f"charge {order.amount} for {order.id}")
    return f"ch-{order.id}"


async def refund_card(order: Order, charge: str) -> None:
    accounts = tc.current_runner().client(Accounts)("books")
    await accounts.note.discard(Note(f"refunded {charge}"))
    LEDGER.append(f"refund {charge}")


async def pack(parcel: Parcel) -> str:
    LEDGER.append(f"pack {parcel.item}")
    return f"box-{parcel.item}"


async def unpack(parcel: Parcel, box: str) -> None:
    LEDGER.append(f"unpack {box}")


async def hand_over(parcel: Parcel) -> str:
    if parcel.lost:
        raise LostParcelError(f"{parcel.item} was lost")
    LEDGER.append(f"deliver {parcel.item}")
    return f"signed-{parcel.item}"


async def recall(parcel: Parcel, receipt: str) -> None:
    LEDGER.append(f"recall {receipt}")


NO_RETRY = tc.RetryPolicy(max_attempts=1)


@workflow(name="ship_parcel", retry=NO_RETRY)
async def ship_parcel(ctx: WorkflowContext, parcel: Parcel) -> str:
    await ctx.step(pack, parcel, compensate=unpack)
    await ctx.sleep(parcel.minutes * MINUTE)  # durable: nothing stays in memory
    return await ctx.step(hand_over, parcel)


@workflow(name="place_order", idempotency_key=lambda order: order.id, retry=NO_RETRY)
async def place_order(ctx: WorkflowContext, order: Order) -> list[str]:
    await ctx.step(charge_card, order, compensate=refund_card, transactional=True)
    receipts: dict[int, str] = {}

    async def ship(index: int, parcel: Parcel) -> None:
        receipts[index] = await ctx.child(ship_parcel, parcel, compensate=recall)

    async with ctx.open_nursery() as nursery:
        for index, parcel in enumerate(order.parcels):
            nursery.start_soon(ship, index, parcel)
    return [receipts[i] for i in range(len(order.parcels))]


async def main(storage: Storage | None = None) -> list[str]:
    LEDGER.clear()
    entities = [place_order.entity, ship_parcel.entity, Accounts]
    async with tc.open_runner(entities=entities, storage=storage) as runner:
        orders = place_order.client(runner)

        start = trio.current_time()
        o1 = Order("o1", 40, [Parcel("o1", "book", 2), Parcel("o1", "lamp", 3)])
        print("o1:", await orders.execute(o1))
        print(f"o1 took {(trio.current_time() - start) / MINUTE:.0f} minutes")
        history = await orders.get("o1").history()
        # Recorded in the order things finished; positioned by the code.
        entries = sorted(history.journal.entries, key=lambda entry: entry.position)
        print("o1 journal:", [(e.kind.value, e.position) for e in entries])

        o2 = Order(
            "o2", 70, [Parcel("o2", "desk", 1), Parcel("o2", "vase", 2, lost=True)]
        )
        try:
            await orders.execute(o2)
        except WorkflowFailedError as exc:
            print("o2:", exc.status)
        print("o2 compensated:", (await orders.get("o2").poll()).compensated)

        o3 = await orders.start(Order("o3", 90, [Parcel("o3", "rug", 5)]))
        await trio.sleep(MINUTE)
        await o3.interrupt("customer cancelled")
        try:
            await o3.result()
        except WorkflowFailedError as exc:
            print("o3:", exc.status, "-", exc.error)
        await trio.sleep(1)  # the notes to Accounts are delivered
    print("ledger:", LEDGER)
    return list(LEDGER)


if __name__ == "__main__":
    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
