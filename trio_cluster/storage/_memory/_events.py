"""The event log of `MemoryStorage`: partitions, cursors, wake-ups (edge adapter).

Theory of operation: `EventStore` is the shared log of one `MemoryStorage`,
synchronous like `MessageStore` (each operation is atomic). A partition is a
list of events sorted by offset (retention removes from anywhere, the order
stays) and its end; publishing appends and sets the partition's
`trio.Event`, which wakes its readers directly. `MemoryEvents` is one
session's view: entry steps (fault hook, checkpoint), then the store. In a
transaction, publications and cursor moves are buffered on the
`MemoryTransaction` and applied at commit; the cursor's shard fence is held
until then (as for replies), and a cursor moved meanwhile fails the commit.
"""

from __future__ import annotations

import bisect
from typing import TYPE_CHECKING

import attrs
import trio

from trio_cluster._errors import PersistenceError
from trio_cluster._storage_events import (
    CursorAdvance,
    CursorOutcome,
    EventRecord,
    EventStorage,
    PartitionPosition,
    StoredEvent,
)

from .._event_checks import (
    check_advance,
    check_delete_events,
    check_events,
    check_name,
    check_offsets,
    check_partition,
    check_partitions,
    check_read,
)
from .._validation import check_transaction
from ._messages import MemoryTransaction

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Sequence

    from trio_cluster._core._addresses import ShardId
    from trio_cluster._storage_abc import StorageTransaction

    from ._store import MessageStore

__all__ = ["EventStore", "MemoryEvents"]


@attrs.define(eq=False)
class _Partition:
    events: list[StoredEvent] = attrs.field(factory=list)
    end: int = 0
    published: trio.Event = attrs.field(factory=trio.Event)

    def wake(self) -> None:
        """Wake its readers (a publication, or a cursor set)."""
        self.published.set()
        self.published = trio.Event()


@attrs.define(eq=False)
class _Cursor:
    offset: int
    skipped: int = 0


class EventStore:
    """The shared event log of one `MemoryStorage`.

    Args:
        epoch_of: the current epoch of a shard (None if never acquired).
    """

    def __init__(self, epoch_of: Callable[[ShardId], int | None]) -> None:
        self._epoch_of = epoch_of
        self._partitions: dict[tuple[str, int], _Partition] = {}
        self._cursors: dict[tuple[str, str, int], _Cursor] = {}

    def _partition(self, topic: str, partition: int) -> _Partition:
        found = self._partitions.get((topic, partition))
        if found is None:
            found = self._partitions[topic, partition] = _Partition()
        return found

    def append(self, events: Sequence[EventRecord]) -> None:
        touched: dict[int, _Partition] = {}
        for event in events:
            log = self._partition(event.topic, event.partition)
            log.events.append(
                StoredEvent(
                    event.topic,
                    event.partition,
                    log.end,
                    event.key,
                    event.payload,
                    event.published_at,
                )
            )
            log.end += 1
            touched[id(log)] = log
        for log in touched.values():
            log.wake()

    def read(
        self, topic: str, partition: int, offset: int, limit: int
    ) -> list[StoredEvent]:
        log = self._partitions.get((topic, partition))
        if log is None:
            return []
        start = bisect.bisect_left(log.events, offset, key=lambda e: e.offset)
        return log.events[start : start + limit]

    def end(self, topic: str, partition: int) -> int:
        log = self._partitions.get((topic, partition))
        return 0 if log is None else log.end

    def position(
        self, subscription: str, topic: str, partition: int
    ) -> PartitionPosition:
        cursor = self._cursors.get((subscription, topic, partition))
        return PartitionPosition(
            subscription,
            topic,
            partition,
            None if cursor is None else cursor.offset,
            self.end(topic, partition),
            0 if cursor is None else cursor.skipped,
        )

    def all_positions(self) -> list[PartitionPosition]:
        return [self.position(*key) for key in sorted(self._cursors)]

    def outcome(self, advance: CursorAdvance) -> CursorOutcome:
        """What `advance` would do now (changing nothing)."""
        if self._epoch_of(advance.shard) != advance.epoch:
            return CursorOutcome.STALE_EPOCH
        cursor = self._cursors.get(
            (advance.subscription, advance.topic, advance.partition)
        )
        current = None if cursor is None else cursor.offset
        if current != advance.expected:
            return CursorOutcome.MOVED
        return CursorOutcome.ADVANCED

    def advance(self, advance: CursorAdvance) -> CursorOutcome:
        outcome = self.outcome(advance)
        if outcome is CursorOutcome.ADVANCED:
            key = (advance.subscription, advance.topic, advance.partition)
            cursor = self._cursors.setdefault(key, _Cursor(advance.offset))
            cursor.offset = advance.offset
            cursor.skipped += advance.skipped
        return outcome

    def set_cursors(
        self, subscription: str, topic: str, offsets: Sequence[tuple[int, int]]
    ) -> None:
        for partition, offset in offsets:
            key = (subscription, topic, partition)
            cursor = self._cursors.setdefault(key, _Cursor(offset))
            cursor.offset = offset
            self._partition(topic, partition).wake()

    def delete(self, older_than: float, hard_older_than: float, limit: int) -> int:
        deleted = 0
        for (topic, partition), log in self._partitions.items():
            if deleted >= limit:
                break
            passed = min(
                (
                    cursor.offset
                    for (_, t, p), cursor in self._cursors.items()
                    if (t, p) == (topic, partition)
                ),
                default=None,
            )
            kept: list[StoredEvent] = []
            for event in log.events:
                expired = event.published_at < older_than and (
                    passed is None or event.offset < passed
                )
                if deleted < limit and (
                    expired or event.published_at < hard_older_than
                ):
                    deleted += 1
                else:
                    kept.append(event)
            log.events = kept
        return deleted

    async def wait_published(
        self, topic: str, partition: int, end: int, subscription: str | None
    ) -> bool:
        log = self._partition(topic, partition)
        while log.end <= end:
            if subscription is not None:
                cursor = self._cursors.get((subscription, topic, partition))
                if cursor is None or cursor.offset != end:
                    return True
            await log.published.wait()
        return False


class MemoryEvents(EventStorage):
    """One session's `EventStorage` view on an `EventStore`.

    Args:
        store: the shared event log.
        messages: the session's message store (its transactions and fences).
        enter: runs the entry steps of an operation, given its name.
    """

    wakeups_lossless = True  # in memory: a reader is woken directly

    def __init__(
        self,
        store: EventStore,
        *,
        messages: MessageStore,
        enter: Callable[[str], Awaitable[None]],
    ) -> None:
        self._store = store
        self._messages = messages
        self._enter = enter

    def _transaction(self, transaction: StorageTransaction) -> MemoryTransaction:
        mine = check_transaction(transaction, MemoryTransaction, self._messages)
        mine.check_usable()
        return mine

    async def publish(
        self,
        events: Sequence[EventRecord],
        *,
        transaction: StorageTransaction | None = None,
    ) -> None:
        checked = check_events(events)
        mine = None if transaction is None else self._transaction(transaction)
        await self._enter("publish")
        if mine is None:
            self._store.append(checked)
        else:
            mine.check_usable()
            mine.commit_actions.append(lambda: self._store.append(checked))

    async def read(
        self, topic: str, partition: int, *, offset: int, limit: int
    ) -> list[StoredEvent]:
        topic, partition, offset, limit = check_read(topic, partition, offset, limit)
        await self._enter("read")
        return self._store.read(topic, partition, offset, limit)

    async def positions(
        self, subscription: str, topic: str, partitions: Sequence[int]
    ) -> list[PartitionPosition]:
        subscription = check_name(subscription, "subscription")
        topic = check_name(topic, "topic")
        checked = check_partitions(partitions)
        await self._enter("positions")
        return [self._store.position(subscription, topic, p) for p in checked]

    async def all_positions(self) -> list[PartitionPosition]:
        await self._enter("all_positions")
        return self._store.all_positions()

    async def advance_cursor(
        self,
        advance: CursorAdvance,
        *,
        transaction: StorageTransaction | None = None,
    ) -> CursorOutcome:
        checked = check_advance(advance)
        mine = None if transaction is None else self._transaction(transaction)
        await self._enter("advance_cursor")
        if mine is None:
            return self._store.advance(checked)
        mine.check_usable()
        outcome = self._store.outcome(checked)
        if outcome is CursorOutcome.ADVANCED:
            if checked.shard not in mine.fences:
                mine.fences.add(checked.shard)
                self._messages.hold_fences([checked.shard])

            def check() -> None:
                if self._store.outcome(checked) is not CursorOutcome.ADVANCED:
                    raise PersistenceError(
                        f"the cursor of subscription {checked.subscription!r} in"
                        f" {checked.topic!r} partition {checked.partition} moved"
                        " while the transaction was open: it rolled back"
                    )

            mine.commit_checks.append(check)

            def apply() -> None:
                self._store.advance(checked)

            mine.commit_actions.append(apply)
        return outcome

    async def set_cursors(
        self, subscription: str, topic: str, offsets: Sequence[tuple[int, int]]
    ) -> None:
        subscription = check_name(subscription, "subscription")
        topic = check_name(topic, "topic")
        checked = check_offsets(offsets)
        await self._enter("set_cursors")
        self._store.set_cursors(subscription, topic, checked)

    async def delete_events(
        self, *, older_than: float, hard_older_than: float, limit: int
    ) -> int:
        checked = check_delete_events(older_than, hard_older_than, limit)
        await self._enter("delete_events")
        return self._store.delete(*checked)

    async def wait_published(
        self, topic: str, partition: int, *, end: int, subscription: str | None = None
    ) -> bool:
        topic = check_name(topic, "topic")
        partition = check_partition(partition)
        if subscription is not None:
            subscription = check_name(subscription, "subscription")
        await self._enter("wait_published")
        return await self._store.wait_published(topic, partition, end, subscription)
