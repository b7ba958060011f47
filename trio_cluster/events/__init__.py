"""The durable event bus: topics as partitioned logs, named subscriptions
(delivery part).

Declare a `Topic`, publish to it through any runner, and consume it with a
`Subscription` whose consumers run on the runners given them::

    orders = Topic("orders", OrderPlaced, partitions=16)
    billing = Subscription(orders, "billing", bill, transactional=True)

    async with tc.open_runner(singletons=[*billing.consumers]) as runner:
        await event_bus(runner).publish(orders, OrderPlaced(...), key=customer)

See ``docs/events.md`` for the guarantees.
"""

from __future__ import annotations

from ._bus import EventBus, event_bus
from ._subscription import Subscription
from ._topic import Event, Topic

__all__ = ["Event", "EventBus", "Subscription", "Topic", "event_bus"]
