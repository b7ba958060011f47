"""An order as a state machine entity: typed states, checked transitions, a
state timeout, a state query and a state watch; the state is durable.

Run it with ``python examples/order_fsm.py``.

An order is ``Pending`` until paid, ``Paid`` until shipped, and ``Shipped``
in the end; it can be cancelled before it ships, and a paid order that is
not shipped within ``SHIP_WITHIN`` seconds is refunded and cancelled by its
state timeout (a persisted, delayed message: it fires after a failover
too). A transition asked for in the wrong state raises
`trio_cluster.InvalidTransitionError` and changes nothing.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar

import attrs
import trio

import trio_cluster as tc
from trio_cluster.abc import Storage

SHIP_WITHIN = 2.0
"""Seconds a paid order may wait for shipping."""


# The states: attrs classes, each with a stable tag (see ``Order.states``).


@attrs.frozen
class Pending:
    pass


@attrs.frozen
class Paid:
    amount: int


@attrs.frozen
class Shipped:
    amount: int
    tracking: str


@attrs.frozen
class Cancelled:
    reason: str
    refunded: int = 0


OrderState = Pending | Paid | Shipped | Cancelled


# The messages.


@attrs.frozen
class Pay:
    amount: int


@attrs.frozen
class Ship:
    tracking: str


@attrs.frozen
class Cancel:
    reason: str


class Order(tc.StateMachine[OrderState]):
    type_name = "Order"
    states: ClassVar[Mapping[str, type]] = {
        "pending": Pending,
        "paid": Paid,
        "shipped": Shipped,
        "cancelled": Cancelled,
    }
    initial_state = Pending
    state_timeouts: ClassVar[Mapping[type, tc.StateTimeout]] = {
        Paid: tc.StateTimeout(after=SHIP_WITHIN, transition="expire")
    }

    @tc.transition(from_=Pending, to=Paid)
    async def pay(self, msg: Pay) -> Paid:
        return Paid(msg.amount)

    @tc.transition(from_=Paid, to=Shipped)
    async def ship(self, msg: Ship) -> Shipped:
        assert isinstance(self.state, Paid)  # checked by the transition
        return Shipped(self.state.amount, msg.tracking)

    @tc.transition(from_=(Pending, Paid), to=Cancelled)
    async def cancel(self, msg: Cancel) -> Cancelled:
        refund = self.state.amount if isinstance(self.state, Paid) else 0
        return Cancelled(msg.reason, refunded=refund)

    @tc.transition(from_=Paid, to=Cancelled)
    async def expire(self, msg: tc.StateTimedOut) -> Cancelled:
        assert isinstance(self.state, Paid)
        return Cancelled("not shipped in time", refunded=self.state.amount)


async def main(storage: Storage | None = None) -> list[OrderState]:
    async with tc.open_runner(entities=[Order], storage=storage) as runner:
        orders = runner.client(Order)
        seen: list[OrderState] = []

        async def watch(order_id: str, task_status: trio.TaskStatus[None]) -> None:
            async with orders(order_id).watch_state(tc.WatchState()) as states:
                task_status.started()
                async for state in states:
                    seen.append(state)
                    if isinstance(state, Shipped | Cancelled):
                        return

        async with trio.open_nursery() as nursery:
            await nursery.start(watch, "o1")
            await orders("o1").pay(Pay(30))
            print("o1:", await orders("o1").ship(Ship("TRACK-1")))
        print("o1 went through", [type(state).__name__ for state in seen])

        await orders("o2").cancel(Cancel("changed my mind"))
        try:
            await orders("o2").pay(Pay(10))
        except tc.InvalidTransitionError as exc:
            print("o2:", exc)

        await orders("o3").pay(Pay(50))
        await trio.sleep(SHIP_WITHIN + 1)  # not shipped: the timeout cancels it
        print("o3:", await orders("o3").current_state(tc.GetState()))
        return [
            await orders(o).current_state(tc.GetState()) for o in ("o1", "o2", "o3")
        ]


if __name__ == "__main__":
    trio.run(main)
