"""The event bus bridged to gateway topics: events published on the bus
reach a gateway client subscribed to the bridged topic, in per-key order,
each with its place in the bus (real sockets, memory storage)."""

from __future__ import annotations

from typing import Any

import attrs
import pytest
import trio

import trio_cluster as tc
from trio_cluster.events import Topic as BusTopic, event_bus
from trio_cluster.gateway import (
    Gateway,
    Topic,
    bridge,
    event_data,
    open_gateway_client,
    serve_gateway,
)

from ..helpers import config


@attrs.frozen
class Shipped:
    order: str
    step: int


SHIPPING = BusTopic("shipping", Shipped, partitions=4)
GATEWAY = Gateway(topics=lambda name: name.startswith("orders:"))


async def test_bus_events_reach_gateway_subscribers_in_per_key_order() -> None:
    per_order = bridge(SHIPPING, "to-browsers", gateway_topic=lambda e: "orders:all")
    with trio.fail_after(30):
        async with (
            tc.open_runner(
                entities=[Topic],
                singletons=[*per_order.consumers],
                config=config(),
            ) as runner,
            trio.open_nursery() as nursery,
        ):
            server = await nursery.start(serve_gateway, runner, GATEWAY, "127.0.0.1", 0)
            await runner.wait_shards_acquired()
            async with (
                open_gateway_client(server.url) as client,
                client.subscribe("orders:all") as publications,
            ):
                bus = event_bus(runner)
                for step in range(3):
                    for order in ("a", "b"):
                        await bus.publish(SHIPPING, Shipped(order, step), key=order)
                got: list[dict[str, Any]] = []
                async for publication in publications:
                    got.append(publication.data)
                    if len(got) == 6:
                        break
            nursery.cancel_scope.cancel()
    for order in ("a", "b"):
        mine = [item for item in got if item["key"] == order]
        assert [item["value"] for item in mine] == [
            {"order": order, "step": step} for step in range(3)
        ]
        # Each carries its place in the bus, by which clients drop a replay.
        assert [item["offset"] for item in mine] == sorted(
            item["offset"] for item in mine
        )
        assert {item["topic"] for item in mine} == {"shipping"}


def test_the_default_gateway_topic_is_the_bus_topics_name() -> None:
    sub = bridge(SHIPPING, "default-name")
    assert sub.topic is SHIPPING
    assert sub.name == "default-name"
    assert sub.handler is not None
    assert event_data.__name__ == "event_data"


def test_a_bad_subscription_name_is_refused() -> None:
    with pytest.raises(tc.ConfigError):
        bridge(SHIPPING, "")
