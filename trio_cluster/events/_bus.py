"""`EventBus`: publish with group commit, replay, lag (delivery part).

Theory of operation: publishers of one runner share one `EventBus`
(`event_bus`). Publications made outside a transaction are written by
*group commit* without a task of its own: the first publisher that finds
no write in flight writes everything queued (one statement), and when it is
done it wakes the next publisher still waiting, which writes what queued up
meanwhile. Under load every statement carries many events; alone, a
publisher pays one statement. Publications made inside a transaction
(``current_transaction()``: a transactional handler, ``runner.transaction()``
or a transactional subscriber) are written in it at once and take effect at
its commit.
"""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING, Any, Literal

import attrs
import trio

from trio_cluster import (
    NotInTransactionError,
    PersistenceError,
    Runner,
    current_transaction,
)
from trio_cluster.abc import EventRecord, PartitionPosition
from trio_cluster.serialization import Codec

if TYPE_CHECKING:
    from collections.abc import Sequence

    from trio_cluster.abc import EventStorage, StorageTransaction

    from ._subscription import Subscription
    from ._topic import Topic

__all__ = ["EventBus", "event_bus"]

MAX_BATCH = 2000
"""Most events one group-commit statement carries."""

_buses: weakref.WeakKeyDictionary[Runner, EventBus] = weakref.WeakKeyDictionary()


def event_bus(runner: Runner) -> EventBus:
    """The event bus of ``runner`` (one per runner, so its publishers share
    group commit).

    Raises:
        TypeError: ``runner`` is not a `trio_cluster.Runner`.
        EventsUnsupportedError: its storage has no event log.
    """
    if not isinstance(runner, Runner):
        raise TypeError(f"runner must be a trio_cluster.Runner, got {runner!r}")
    bus = _buses.get(runner)
    if bus is None:
        bus = _buses[runner] = EventBus(runner)
    return bus


@attrs.define(eq=False)
class _Pending:
    record: EventRecord
    woken: trio.Event = attrs.field(factory=trio.Event)
    done: bool = False
    error: PersistenceError | None = None


class EventBus:
    """Publishes to topics and manages subscriptions' positions, through
    one runner (get it with `event_bus`)."""

    def __init__(self, runner: Runner) -> None:
        self._runner = runner
        self._storage: EventStorage = runner.event_storage
        self._codecs: dict[type[Any], Codec[Any]] = {}
        self._pending: list[_Pending] = []
        self._writing = False
        self.statements = 0
        """Group-commit statements written (outside transactions)."""
        self.published = 0
        """Events those statements carried."""

    def codec(self, topic: Topic[Any]) -> Codec[Any]:
        codec = self._codecs.get(topic.event_type)
        if codec is None:
            codec = self._codecs[topic.event_type] = Codec(
                self._runner.converter, topic.event_type, f"event of {topic.name!r}"
            )
        return codec

    async def publish(
        self,
        topic: Topic[Any],
        event: object,
        *,
        key: str | None = None,
        transaction: StorageTransaction | None = None,
    ) -> None:
        """Publish ``event`` to ``topic``: durable once this returns, or
        once the transaction it is published in commits.

        ``transaction``: by default the current one (``current_transaction()``
        in a transactional handler, ``runner.transaction()`` or a
        transactional subscriber), else none. Events of one key go to one
        partition, in the order their publications return (or commit).

        Raises:
            MalformedMessageError: ``event`` does not encode as the topic's
                type (nothing is published).
            TypeError: ``key`` is not a str or None.
            PersistenceError: storage failed; the event is not published
                (unless the connection was lost mid-statement: then its
                outcome is unknown).

        On cancellation: an event still queued is not published; one whose
        statement is already being written is written (the statement is not
        interrupted, since it carries other publishers' events too).
        """
        if transaction is None:
            try:
                transaction = current_transaction()
            except NotInTransactionError:
                transaction = None
        record = EventRecord(
            topic.name,
            topic.partition_of(key),
            key,
            self.codec(topic).encode(event),
            self._runner.clock.now(),
        )
        if transaction is not None:
            await self._storage.publish([record], transaction=transaction)
            return
        await self._group_commit(_Pending(record))

    async def _group_commit(self, me: _Pending) -> None:
        self._pending.append(me)
        try:
            while not me.done:
                if self._writing:
                    await me.woken.wait()
                    me.woken = trio.Event()
                    continue
                await self._write()
        except BaseException:
            if me in self._pending:  # cancelled while queued: not published
                self._pending.remove(me)
                if not self._writing and self._pending:
                    self._pending[0].woken.set()
            raise
        if me.error is not None:
            raise me.error

    async def _write(self) -> None:
        self._writing = True
        try:
            batch = self._pending[:MAX_BATCH]
            del self._pending[:MAX_BATCH]
            # Shielded: the statement carries other publishers' events.
            with trio.CancelScope(shield=True):
                try:
                    await self._storage.publish([p.record for p in batch])
                except PersistenceError as exc:
                    for pending in batch:
                        pending.error = exc
                else:
                    self.statements += 1
                    self.published += len(batch)
            for pending in batch:
                pending.done = True
                pending.woken.set()
        finally:
            self._writing = False
            if self._pending:
                self._pending[0].woken.set()
        await trio.lowlevel.checkpoint()

    async def replay(
        self,
        subscription: Subscription[Any],
        *,
        from_offset: int | Literal["earliest", "latest"],
        partitions: Sequence[int] | None = None,
    ) -> None:
        """Move the subscription's cursors (of ``partitions``, all by
        default) to ``from_offset``: its consumers go on from there (events
        already consumed are delivered again). ``"earliest"`` is offset 0
        (the oldest event retention kept), ``"latest"`` each partition's end.

        Raises:
            ValueError: an offset below 0 or a partition out of range.
            PersistenceError: storage failed (cursors may be partly moved).
        """
        topic = subscription.topic
        chosen = (
            list(range(topic.partitions)) if partitions is None else list(partitions)
        )
        for partition in chosen:
            if not 0 <= partition < topic.partitions:
                raise ValueError(f"{topic.name!r} has no partition {partition}")
        if from_offset == "latest":
            positions = await self._storage.positions(
                subscription.name, topic.name, chosen
            )
            offsets = [(p.partition, p.end) for p in positions]
        else:
            offset: object = 0 if from_offset == "earliest" else from_offset
            if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
                raise ValueError(
                    f"from_offset must be an int >= 0, got {from_offset!r}"
                )
            offsets = [(partition, offset) for partition in chosen]
        await self._storage.set_cursors(subscription.name, topic.name, offsets)

    async def lag(self, subscription: Subscription[Any]) -> list[PartitionPosition]:
        """The subscription's position in each partition of its topic
        (`PartitionPosition.lag`: events not yet consumed).

        Raises:
            PersistenceError: storage failed.
        """
        topic = subscription.topic
        return await self._storage.positions(
            subscription.name, topic.name, list(range(topic.partitions))
        )
