"""`Topic` and `Event`: what is published, and what subscribers get (delivery part).

A topic has a fixed number of partitions. An event with a key goes to the
partition ``stable_hash64(key) % partitions``, so the events of one key
keep their order; events without a key are spread round-robin by the
publishing runner. Keep ``partitions`` stable while events are stored:
changing it moves keys to other partitions (their order across the change is
then not kept).
"""

from __future__ import annotations

import itertools
from typing import Any, Generic, TypeVar

import attrs

from trio_cluster import ConfigError

from .._core._checks import part_name
from .._core._hashing import stable_hash64

__all__ = ["Event", "Topic"]

T = TypeVar("T")

MAX_PARTITIONS = 4096


def _check_name(_: object, __: attrs.Attribute[str], value: object) -> None:
    part_name("topic", value)


def _check_partitions(_: object, __: attrs.Attribute[int], value: object) -> None:
    if (
        isinstance(value, bool)
        or not isinstance(value, int)
        or not 1 <= value <= MAX_PARTITIONS
    ):
        raise ConfigError(
            f"partitions must be an int from 1 to {MAX_PARTITIONS}, got {value!r}"
        )


@attrs.frozen(eq=False)
class Topic(Generic[T]):
    """A durable topic: a partitioned log of events of one type.

    Args:
        name: stable while events are stored.
        event_type: the type of its events (their wire format, as a
            message's: attrs classes, builtins, or the converter's hooks).
        partitions: how many logs the topic is split into: the most
            consumers of one subscription that run at once.

    Raises:
        ConfigError: on construction, for an invalid name or partitions.
    """

    name: str = attrs.field(validator=_check_name)
    event_type: type[T]
    partitions: int = attrs.field(default=16, validator=_check_partitions)
    _spread: itertools.count[int] = attrs.field(
        init=False, factory=itertools.count, repr=False
    )

    def partition_of(self, key: str | None) -> int:
        """The partition of an event with ``key`` (None: the next one of a
        round-robin).

        Raises:
            TypeError: ``key`` is neither a str nor None.
        """
        if key is None:
            return next(self._spread) % self.partitions
        if not isinstance(key, str):
            raise TypeError(f"an event's key must be a str or None, got {key!r}")
        return stable_hash64(key) % self.partitions


@attrs.frozen
class Event(Generic[T]):
    """One event, as a subscriber's handler gets it."""

    topic: str
    partition: int
    offset: int
    """Its place in its partition's log (from 0, gap-free at publication)."""
    key: str | None
    value: T
    published_at: float
    """The publisher's wall clock, in seconds since the Unix epoch."""


AnyTopic = Topic[Any]
