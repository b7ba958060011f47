"""The worked example of ``docs/testing.md`` (``examples/failover_property.py``)
runs, and its check rejects what it must."""

from __future__ import annotations

import pytest

from trio_cluster.testing import FaultSchedule, KillRunner, run_simulation

from ..helpers import load_example

pytestmark = pytest.mark.simulation

example = load_example("failover_property")


def test_the_example_property_holds():
    example.test_every_order_is_sold_once()


def test_the_example_survives_the_owner_being_killed_twice():
    faults = FaultSchedule(
        (
            KillRunner(at=0.3, runner=0, down_for=2.0),
            KillRunner(at=0.3, runner=1, down_for=4.0),
        )
    )
    receipts = run_simulation(example.sell_under_failure, faults, 11)
    example.check(receipts)


def test_the_example_check_rejects_lost_repeated_or_double_sales():
    receipt = example.Receipt
    good = {
        f"{name}-{n}": [receipt(f"{name}-{n}", (f"{name}-{n}",))] * 2
        for name in example.CUSTOMERS
        for n in range(example.ORDERS)
    }
    example.check(good)
    with pytest.raises(AssertionError):
        example.check(dict(list(good.items())[1:]))
    with pytest.raises(AssertionError, match="another receipt"):
        example.check(
            {
                **good,
                "ada-0": [
                    receipt("ada-0", ("ada-0",)),
                    receipt("ada-0", ("x", "ada-0")),
                ],
            }
        )
    with pytest.raises(AssertionError, match="sold twice"):
        example.check({**good, "ada-0": [receipt("ada-0", ("ada-0", "ada-0"))] * 2})
