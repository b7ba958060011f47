"""The storage contract's durable event log (interface): topics, partitions,
subscription cursors.

An optional capability of a storage session (`StorageSession.events`): a
backend without it leaves it None, and the event bus then raises
`EventsUnsupportedError`.

Theory of operation: a *topic* is split into a fixed number of
*partitions*; each partition is a log whose *offsets* start at 0 and grow
by one per event, with no gap, in the order the publishing transactions
commit. So a reader that has read every offset below ``n`` and finds no
offset ``n`` yet never sees an event with a smaller offset appear later
(PostgreSQL: a publishing transaction holds the partition's head row until
it commits, so publishers of one partition take turns).

A *cursor* is a named subscription's position in one partition: the next
offset it will consume. It is advanced *compare-and-set* (from the offset
its owner last knew) and *fenced* by the epoch of the shard that hosts the
consumer, like replies: an owner that lost its shard, or a cursor moved by
a replay meanwhile, changes nothing. Advanced inside a transaction, it
commits (or not) with the subscriber's own writes.
"""

from __future__ import annotations

import enum
from abc import ABC, abstractmethod
from typing import TYPE_CHECKING

import attrs

from ._core._addresses import ShardId

if TYPE_CHECKING:
    from collections.abc import Sequence

    from ._storage_abc import StorageTransaction

__all__ = [
    "MAX_PARTITIONS",
    "MAX_TOPIC_NAME",
    "CursorAdvance",
    "CursorOutcome",
    "EventRecord",
    "EventStorage",
    "PartitionPosition",
    "StoredEvent",
]

MAX_TOPIC_NAME = 200
"""Longest topic or subscription name storage accepts."""
MAX_PARTITIONS = 4096
"""Partitions are numbered from 0 to at most ``MAX_PARTITIONS - 1``."""


@attrs.frozen
class EventRecord:
    """One event to publish (see `EventStorage.publish`)."""

    topic: str
    partition: int
    key: str | None
    payload: bytes
    """The encoded event."""
    published_at: float
    """The publisher's wall clock (seconds since the Unix epoch): retention
    and latency are measured from it."""


@attrs.frozen
class StoredEvent:
    """An event as stored in its partition's log."""

    topic: str
    partition: int
    offset: int
    key: str | None
    payload: bytes
    published_at: float


@attrs.frozen
class CursorAdvance:
    """Move a subscription's cursor in one partition (see
    `EventStorage.advance_cursor`)."""

    subscription: str
    topic: str
    partition: int
    expected: int | None
    """The offset the cursor is at now, as its owner knows it; None: the
    cursor does not exist yet (it is created)."""
    offset: int
    """The cursor's new offset: the next event to consume."""
    shard: ShardId
    """The shard hosting the consumer, whose epoch fences the advance."""
    epoch: int
    skipped: int = 0
    """Events given up on (their handler kept failing) among those passed:
    added to the cursor's count."""


class CursorOutcome(enum.Enum):
    """What became of a `CursorAdvance`."""

    ADVANCED = "advanced"
    """Done (or, in a transaction, done if it commits)."""
    STALE_EPOCH = "stale_epoch"
    """The shard is not at that epoch (any more): nothing changed."""
    MOVED = "moved"
    """The cursor is not at ``expected`` (a replay moved it, or it already
    existed): nothing changed; read it again with `EventStorage.positions`."""


@attrs.frozen
class PartitionPosition:
    """A subscription's position in one partition of a topic."""

    subscription: str
    topic: str
    partition: int
    cursor: int | None
    """The next offset the subscription consumes; None: no cursor yet."""
    end: int
    """The next offset a publication will take (0 for a partition never
    published to)."""
    skipped: int = 0
    """Events the subscription gave up on in this partition, in all."""

    @property
    def lag(self) -> int:
        """Events published and not yet consumed (all of them without a
        cursor)."""
        return self.end - (self.cursor or 0)


class EventStorage(ABC):
    """The durable event log of a storage session (see the module docstring)."""

    wakeups_lossless: bool = False
    """Whether `wait_published` returns after every publication past its
    ``end`` and every `set_cursors` of its subscription and partition, and
    early whenever one of those may have been missed (both built-in
    backends). When false, an idle consumer also reads again every
    `Subscription.poll_interval`."""

    @abstractmethod
    async def publish(
        self,
        events: Sequence[EventRecord],
        *,
        transaction: StorageTransaction | None = None,
    ) -> None:
        """Append ``events`` to their partitions' logs, in order (one
        statement for the whole batch on PostgreSQL).

        Each takes the next offset of its partition; events of one partition
        in one call take consecutive offsets in the order given. Readers
        waiting in `wait_published` are woken once the events are visible.
        With ``transaction`` (from ``open_transaction`` of this session's
        messages), they are appended when it commits, and never if it rolls
        back; the wake-up happens at commit. On PostgreSQL the transaction
        holds its partitions' heads until it ends, so other publishers to
        those partitions wait for it.

        Raises:
            TypeError, ValueError: a malformed record, or a transaction of
                another storage (nothing is published).
            PersistenceError: storage failed (no event of the call was
                published; one whose outcome is unknown, when the connection
                was lost during the statement, may have been).
        """

    @abstractmethod
    async def read(
        self, topic: str, partition: int, *, offset: int, limit: int
    ) -> list[StoredEvent]:
        """Up to ``limit`` events of one partition with offsets from
        ``offset`` on, ascending. Deleted (retained out) events are simply
        not there: the first returned may be beyond ``offset``."""

    @abstractmethod
    async def positions(
        self, subscription: str, topic: str, partitions: Sequence[int]
    ) -> list[PartitionPosition]:
        """The subscription's cursor and the end of each partition, in the
        order of ``partitions``."""

    @abstractmethod
    async def all_positions(self) -> list[PartitionPosition]:
        """Every cursor of every subscription, with its partition's end,
        ordered by subscription, topic and partition (for lag metrics)."""

    @abstractmethod
    async def advance_cursor(
        self,
        advance: CursorAdvance,
        *,
        transaction: StorageTransaction | None = None,
    ) -> CursorOutcome:
        """Move a cursor, fenced and compare-and-set (see `CursorOutcome`).

        With ``transaction``, the move takes effect when it commits: the
        outcome is the one it will have then (the shard's epoch cannot move
        while it is open), and a cursor moved by someone else meanwhile
        makes the commit fail (`PersistenceError`) rather than be
        overwritten.

        Raises:
            TypeError, ValueError: a malformed record (nothing changes).
            PersistenceError: storage failed.
        """

    @abstractmethod
    async def set_cursors(
        self, subscription: str, topic: str, offsets: Sequence[tuple[int, int]]
    ) -> None:
        """Set the cursor of each ``(partition, offset)`` pair, unfenced
        (replay, an operator's reset). The consumer that owns a partition
        finds its next advance refused (`CursorOutcome.MOVED`) and goes on
        from the new offset; one waiting in `wait_published` for the
        subscription and a partition set is woken, told its cursor moved."""

    @abstractmethod
    async def delete_events(
        self, *, older_than: float, hard_older_than: float, limit: int
    ) -> int:
        """Retention: delete up to ``limit`` events published before
        ``older_than`` that every cursor of their partition has passed, and
        events published before ``hard_older_than`` whatever the cursors say;
        returns how many. Offsets are never reused."""

    @abstractmethod
    async def wait_published(
        self, topic: str, partition: int, *, end: int, subscription: str | None = None
    ) -> bool:
        """Return once the partition may hold an event at offset ``end`` or
        beyond or, given ``subscription``, once that subscription's cursor
        of the partition may no longer be ``end`` (checked on entry, then
        woken by `set_cursors`). Returns True when the cursor may have moved
        (read it again), False when only events may have come. A hint: it
        may return early, e.g. after its notification connection was
        replaced (then True). A backend whose wake-ups can be lost without
        such an early return says so (`wakeups_lossless` false): its callers
        also poll.

        On cancellation nothing is lost.

        Raises:
            TypeError, ValueError: a malformed topic, partition or name.
            PersistenceError: storage failed (only while checking the
                cursor on entry; a lost notification connection is an early
                return, not an error).
        """
