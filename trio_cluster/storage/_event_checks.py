"""Argument checks of the event log contract, shared by every backend (edge helper).

Each returns its checked arguments, or raises `TypeError`/`ValueError` before
anything is sent, so one malformed record never costs storage a statement.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from .._core._addresses import ShardId
from .._core._checks import ARGUMENT, count, integer, timestamp
from .._storage_events import (
    MAX_PARTITIONS,
    MAX_TOPIC_NAME,
    CursorAdvance,
    EventRecord,
)

__all__ = [
    "check_advance",
    "check_delete_events",
    "check_events",
    "check_name",
    "check_offsets",
    "check_partition",
    "check_partitions",
    "check_read",
]


def check_name(value: object, what: str) -> str:
    """A topic or subscription name: 1 to `MAX_TOPIC_NAME` characters."""
    if not isinstance(value, str):
        raise TypeError(f"{what} must be a str, got {value!r}")
    if not 0 < len(value) <= MAX_TOPIC_NAME:
        raise ValueError(f"{what} must be 1-{MAX_TOPIC_NAME} characters, got {value!r}")
    return value


def check_partition(value: object) -> int:
    """A partition number in [0, `MAX_PARTITIONS`)."""
    number = integer("partition", value, errors=ARGUMENT)
    if not 0 <= number < MAX_PARTITIONS:
        raise ValueError(f"partition must be in [0, {MAX_PARTITIONS}), got {number}")
    return number


def _offset(value: object, what: str) -> int:
    return count(what, value, errors=ARGUMENT)


def _items(items: object, what: str) -> list[object]:
    if isinstance(items, str | bytes | Mapping) or not isinstance(items, Iterable):
        raise TypeError(f"{what} must be a sequence, got {items!r}")
    return list(items)


def check_events(events: object) -> list[EventRecord]:
    """`EventStorage.publish`."""
    checked: list[EventRecord] = []
    for event in _items(events, "events"):
        if not isinstance(event, EventRecord):
            raise TypeError(f"events must contain only EventRecord, got {event!r}")
        check_name(event.topic, "EventRecord.topic")
        check_partition(event.partition)
        if event.key is not None and not isinstance(event.key, str):
            raise TypeError(f"EventRecord.key must be a str or None, got {event.key!r}")
        if not isinstance(event.payload, bytes):
            raise TypeError(f"EventRecord.payload must be bytes, got {event.payload!r}")
        timestamp("EventRecord.published_at", event.published_at, errors=ARGUMENT)
        checked.append(event)
    return checked


def check_read(
    topic: object, partition: object, offset: object, limit: object
) -> tuple[str, int, int, int]:
    """`EventStorage.read`."""
    return (
        check_name(topic, "topic"),
        check_partition(partition),
        _offset(offset, "offset"),
        count("limit", limit, errors=ARGUMENT),
    )


def check_partitions(partitions: object) -> list[int]:
    """A sequence of partition numbers."""
    return [check_partition(p) for p in _items(partitions, "partitions")]


def check_advance(advance: object) -> CursorAdvance:
    """`EventStorage.advance_cursor`."""
    if not isinstance(advance, CursorAdvance):
        raise TypeError(f"advance must be a CursorAdvance, got {advance!r}")
    check_name(advance.subscription, "CursorAdvance.subscription")
    check_name(advance.topic, "CursorAdvance.topic")
    check_partition(advance.partition)
    if advance.expected is not None:
        _offset(advance.expected, "CursorAdvance.expected")
    _offset(advance.offset, "CursorAdvance.offset")
    if not isinstance(advance.shard, ShardId):
        raise TypeError(f"CursorAdvance.shard must be a ShardId, got {advance.shard!r}")
    integer("CursorAdvance.epoch", advance.epoch, errors=ARGUMENT)
    _offset(advance.skipped, "CursorAdvance.skipped")
    return advance


def check_offsets(offsets: object) -> list[tuple[int, int]]:
    """`EventStorage.set_cursors`: ``(partition, offset)`` pairs."""
    checked: list[tuple[int, int]] = []
    for pair in _items(offsets, "offsets"):
        if not isinstance(pair, tuple) or len(pair) != 2:
            raise TypeError(
                f"offsets must contain (partition, offset) pairs, got {pair!r}"
            )
        checked.append((check_partition(pair[0]), _offset(pair[1], "offset")))
    return checked


def check_delete_events(
    older_than: object, hard_older_than: object, limit: object
) -> tuple[float, float, int]:
    """`EventStorage.delete_events`."""
    return (
        timestamp("older_than", older_than, errors=ARGUMENT),
        timestamp("hard_older_than", hard_older_than, errors=ARGUMENT),
        count("limit", limit, errors=ARGUMENT),
    )
