"""Testing an entity under failure: a property test on a simulated cluster.

A box office sells seats. Each purchase is a persisted message keyed by its
order id, so a customer who retries after an error (a runner died, the
network broke) is served once. We let Hypothesis generate schedules of
runner kills, freezes and network partitions, run three runners through each
one on virtual time, and check what customers see:

* every order gets a receipt (nothing is lost);
* asking again for the same order returns the same receipt (dedup by key);
* no receipt shows an order sold twice by the same box office incarnation.

The simulator checks its own invariants as it goes (one runner per shard,
fencing, exactly one stored reply per request...) and raises
`InvariantViolation` with the seed and a trace if one breaks. This file is
`docs/testing.md`'s worked example; the test suite runs it.

Run it with ``python examples/failover_property.py`` (needs Hypothesis:
``pip install trio-cluster[testing]``).
"""

from __future__ import annotations

import attrs
import trio
from hypothesis import given, settings, strategies as st

import trio_cluster as tc
from trio_cluster.testing import (
    FaultSchedule,
    SimulatedCluster,
    fault_schedules,
    open_simulated_cluster,
    run_simulation,
)

CUSTOMERS = ("ada", "bob", "cy")
ORDERS = 5  # per customer


@attrs.frozen
class Buy:
    order_id: str


@attrs.frozen
class Receipt:
    order_id: str
    sold: tuple[str, ...]
    """Orders this box office sold since it (re)started, this one last."""


class BoxOffice(tc.Entity):
    type_name = "BoxOffice"

    def __init__(self) -> None:
        self.sold: list[str] = []

    @tc.rpc(persisted=True, primary_key=lambda m: m.order_id)
    async def buy(self, msg: Buy) -> Receipt:
        await trio.sleep(0.5)  # printing the ticket: a failure can strike now
        self.sold.append(msg.order_id)
        return Receipt(msg.order_id, tuple(self.sold))


async def buy(cluster: SimulatedCluster, order: Buy) -> Receipt:
    """Buy through whichever runner is up, retrying (same order id) until
    it works, like a client behind a load balancer."""
    attempt = 0
    while True:
        attempt += 1
        runners = cluster.up()
        if runners:
            runner = runners[attempt % len(runners)].runner
            assert runner is not None
            try:
                # No timeout here: cancelling a persisted call interrupts the
                # request (its stored reply would then be "interrupted").
                return await runner.client(BoxOffice)("main").buy(order)
            except tc.ClusterError:
                pass  # the runner died or storage failed: try again
        await trio.sleep(0.5)


async def customer(
    cluster: SimulatedCluster, name: str, receipts: dict[str, list[Receipt]]
) -> None:
    for number in range(ORDERS):
        order = Buy(f"{name}-{number}")
        receipts[order.order_id] = [await buy(cluster, order)]
        # A retry of an order that already went through: must be a no-op.
        receipts[order.order_id].append(await buy(cluster, order))


async def sell_under_failure(
    faults: FaultSchedule, seed: int
) -> dict[str, list[Receipt]]:
    receipts: dict[str, list[Receipt]] = {}
    async with open_simulated_cluster([BoxOffice], runners=3, seed=seed) as cluster:
        # Faults and customers run together; once the schedule is over
        # (every fault undone), the customers must finish soon.
        with trio.fail_after(faults.end + 120):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(cluster.run_schedule, faults)
                for name in CUSTOMERS:
                    nursery.start_soon(customer, cluster, name, receipts)
        await cluster.heal_all()
        await cluster.wait_quiescent()  # every stored order answered
    return receipts


def check(receipts: dict[str, list[Receipt]]) -> None:
    assert len(receipts) == len(CUSTOMERS) * ORDERS  # no order lost
    for order_id, got in receipts.items():
        first, again = got
        assert again == first, f"{order_id}: a retry got another receipt"
        assert first.sold[-1] == order_id
        assert len(set(first.sold)) == len(first.sold), f"sold twice: {first}"


@settings(max_examples=10, deadline=None)
@given(
    faults=fault_schedules(
        runners=3, duration=15.0, kinds={"kill", "freeze", "partition"}
    ),
    seed=st.integers(0, 2**16),
)
def test_every_order_is_sold_once(faults: FaultSchedule, seed: int) -> None:
    check(run_simulation(sell_under_failure, faults, seed))


if __name__ == "__main__":
    test_every_order_is_sold_once()
    print("every order sold once, under every schedule tried")
