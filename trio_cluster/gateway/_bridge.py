"""The bridge from the event bus to gateway topics (delivery part).

Theory of operation: `bridge` is a `trio_cluster.events.Subscription` whose
handler publishes each event of a bus topic on a gateway topic
(`trio_cluster.gateway.publish`), so browsers and services connected to any
gateway see the durable events as they are consumed. It inherits both
sides' guarantees and no more:

* per-key order: the bus hands a partition's events over in offset order,
  one at a time, and each publication is made before the next event is
  handled, so the events of one key reach the gateway topic in order (the
  events of different partitions interleave);
* at least once: the bus consumer advances its cursor after the
  publication, so a consumer that stops in between publishes those events
  again (after a failover). Each publication carries the event's
  ``partition`` and ``offset``, by which clients drop what they already
  saw;
* a failed publication (no runner hosts `Topic`, a runner unavailable) is
  retried per the subscription's `RetryPolicy`, then the event is skipped,
  logged and counted like any subscriber's (``trio-cluster events lag``).

The gateway topic's own offsets and resume window are the gateway's: a
client that was away longer than the gateway topic's history resumes with
``recovered: false``; the bus keeps the events durably, and a service that
needs all of them subscribes to the bus itself.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal, TypeVar

from trio_cluster import RetryPolicy, current_runner

from ..events import Event, Subscription, Topic
from ._topics import publish

if TYPE_CHECKING:
    from collections.abc import Callable

__all__ = ["bridge", "event_data"]

T = TypeVar("T")


def event_data(event: Event[Any]) -> dict[str, Any]:
    """The default data of a bridged event's publication: its place in the
    bus (``topic``, ``partition``, ``offset``, ``key``, ``published_at``)
    and its ``value``, unstructured by the runner's converter (plain data
    that JSON and msgpack carry)."""
    return {
        "topic": event.topic,
        "partition": event.partition,
        "offset": event.offset,
        "key": event.key,
        "published_at": event.published_at,
        "value": current_runner().converter.unstructure(event.value),
    }


def bridge(
    topic: Topic[T],
    name: str,
    *,
    gateway_topic: Callable[[Event[T]], str] | str | None = None,
    data: Callable[[Event[T]], Any] = event_data,
    start: Literal["earliest", "latest"] = "latest",
    retry: RetryPolicy | None = None,
) -> Subscription[T]:
    """A subscription that publishes every event of ``topic`` (the bus) on
    a gateway topic. Give its consumers to the runners like any
    subscription's (``open_runner(singletons=[*sub.consumers])``); the
    runners must host the gateway's `Topic` entity.

    Args:
        topic: the bus topic bridged.
        name: the subscription's name (its cursors are kept under it).
        gateway_topic: the gateway topic of an event: a name, or a function
            of the event (e.g. ``lambda e: f"orders:{e.key}"``); default:
            the bus topic's name.
        data: what a publication carries (plain data); default
            `event_data`.
        start: where a partition without a cursor starts.
        retry: attempts of a publication before its event is skipped;
            default: the subscription's default.

    Raises:
        ConfigError: as `Subscription` (a bad name, ``start``).
    """
    if gateway_topic is None:
        gateway_topic = topic.name
    target = gateway_topic

    async def forward(event: Event[T]) -> None:
        where = target if isinstance(target, str) else target(event)
        await publish(current_runner(), where, data(event))

    options: dict[str, Any] = {} if retry is None else {"retry": retry}
    return Subscription(topic, name, forward, start=start, **options)
