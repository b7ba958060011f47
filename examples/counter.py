"""The smallest trio_cluster program: a counter entity, called by id.

Run it with ``python examples/counter.py``.
"""

from __future__ import annotations

import attrs
import trio

import trio_cluster as tc
from trio_cluster.abc import Storage


@attrs.frozen
class Increment:
    amount: int


@attrs.frozen
class GetValue:
    pass


class Counter(tc.Entity):
    type_name = "Counter"

    def __init__(self) -> None:
        self.value = 0

    @tc.rpc
    async def increment(self, msg: Increment) -> int:
        self.value += msg.amount
        return self.value

    @tc.rpc
    async def get(self, msg: GetValue) -> int:
        return self.value


async def main(storage: Storage | None = None) -> list[int]:
    async with tc.open_runner(entities=[Counter], storage=storage) as runner:
        counters = runner.client(Counter)
        await counters("apples").increment(Increment(3))
        await counters("apples").increment(Increment(4))
        await counters("pears").increment(Increment(10))
        # Fire and forget: returns once the message is in the mailbox.
        await counters("pears").increment.discard(Increment(1))
        values = [await counters(name).get(GetValue()) for name in ("apples", "pears")]
        print(f"apples={values[0]} pears={values[1]}")
        return values


if __name__ == "__main__":
    trio.run(main)
