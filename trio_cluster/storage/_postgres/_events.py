"""The event log on PostgreSQL: partitions, cursors, wake-ups (edge adapter).

Theory of operation: a publication is one statement for the whole batch.
It counts the batch's events per partition, bumps each partition's head row
in ``event_heads`` (``INSERT .. ON CONFLICT DO UPDATE``, in a fixed order)
and numbers the events from the old head on: the head row stays locked until
the statement's transaction commits, so publishers of one partition take
turns and offsets become visible gap-free, in order. The same statement
``pg_notify``-s the new heads on the bus channel (delivered at commit).

Cursor moves lock the shard row ``FOR SHARE`` and compare its epoch, as
replies do (`._queries`), and update the cursor only from the offset the
consumer knew (compare-and-set).

Wake-ups: a LISTEN connection on the bus channel, opened when a reader first
waits. Readers waiting in `PgEvents.wait_published` take turns reading it
(the first one pumps notifications for all; when it has its own, it hands
the pump to another waiter). When the connection is (re)opened, every
waiter is woken, since notifications may have been missed. A cursor set by
`PgEvents.set_cursors` (a replay) is notified on the same channel
(``{"m": [[topic, part], ...]}``) and wakes the partition's waiters, told
that their cursor may have moved; a waiter for a subscription reads its
cursor once after it registers, so a set it did not hear of is seen too.
Nothing is polled.
"""

from __future__ import annotations

import json
import logging
from typing import TYPE_CHECKING, Any

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
from ._driver._pool import PgPool
from ._message_parts import PgTransaction
from ._notify import MALFORMED, Listener, skip_malformed

if TYPE_CHECKING:
    from collections.abc import Iterable, Sequence

    from trio_cluster._storage_abc import StorageTransaction

    from ._driver._driver import PgNotification
    from ._schema import PgNames

__all__ = ["EventQueries", "PgEvents", "parse_heads"]

log = logging.getLogger("trio_cluster.storage.postgres")

ALL = ("", -1, 0)
"""A parsed wake-up for every partition (a payload too long to list them)."""
MOVED = -1
"""The ``end`` of a parsed head that says a cursor of the partition was set."""
_MAX_NOTIFY = 7900


@attrs.frozen
class EventQueries:
    """The event log's statements for one table prefix."""

    publish: str
    read: str
    positions: str
    all_positions: str
    advance: str
    set_cursors: str
    delete: str

    @classmethod
    def build(cls, n: PgNames) -> EventQueries:
        e, h, c = n.events, n.event_heads, n.event_cursors
        return cls(
            publish=f"""
WITH input AS MATERIALIZED (
    SELECT * FROM unnest($1::text[], $2::int4[], $3::text[], $4::bytea[],
                         $5::float8[])
        WITH ORDINALITY AS t(topic, part, key, payload, published_at, ord)
), counts AS MATERIALIZED (
    SELECT topic, part, count(*)::int8 AS n FROM input GROUP BY topic, part
), heads AS MATERIALIZED (
    INSERT INTO {h} AS h (topic, part, next_offset)
    SELECT topic, part, n FROM counts ORDER BY topic, part
    ON CONFLICT (topic, part)
        DO UPDATE SET next_offset = h.next_offset + EXCLUDED.next_offset
    RETURNING topic, part, next_offset
), ins AS (
    INSERT INTO {e} (topic, part, event_offset, key, payload, published_at)
    SELECT i.topic, i.part,
           hd.next_offset - c.n - 1
             + row_number() OVER (PARTITION BY i.topic, i.part ORDER BY i.ord),
           i.key, i.payload, i.published_at
    FROM input i JOIN counts c USING (topic, part) JOIN heads hd USING (topic, part)
    RETURNING 1
), note AS (
    SELECT json_agg(json_build_array(topic, part, next_offset))::text AS body
    FROM heads
)
SELECT (SELECT count(*) FROM ins),
       pg_notify($6::text, CASE WHEN length(body) <= {_MAX_NOTIFY} THEN body
                                ELSE '"all"' END)
FROM note""",
            read=f"""
SELECT event_offset, key, payload, published_at FROM {e}
WHERE topic = $1::text AND part = $2::int4 AND event_offset >= $3::int8
ORDER BY event_offset LIMIT $4::int8""",
            positions=f"""
SELECT p.part, c.next_offset, COALESCE(hd.next_offset, 0), COALESCE(c.skipped, 0)
FROM unnest($3::int4[]) WITH ORDINALITY AS p(part, ord)
LEFT JOIN {h} hd ON hd.topic = $2::text AND hd.part = p.part
LEFT JOIN {c} c
    ON c.subscription = $1::text AND c.topic = $2::text AND c.part = p.part
ORDER BY p.ord""",
            all_positions=f"""
SELECT c.subscription, c.topic, c.part, c.next_offset,
       COALESCE(hd.next_offset, 0), c.skipped
FROM {c} c LEFT JOIN {h} hd ON hd.topic = c.topic AND hd.part = c.part
ORDER BY c.subscription, c.topic, c.part""",
            advance=f"""
WITH fence AS MATERIALIZED (
    SELECT epoch FROM {n.shards}
    WHERE shard_group = $1::text AND shard_number = $2::int4
    FOR SHARE
), moved AS (
    UPDATE {c} c SET next_offset = $7::int8, skipped = c.skipped + $8::int8
    FROM fence
    WHERE fence.epoch = $3::int8 AND c.subscription = $4::text
      AND c.topic = $5::text AND c.part = $6::int4 AND c.next_offset = $9::int8
    RETURNING 1
), created AS (
    INSERT INTO {c} (subscription, topic, part, next_offset, skipped)
    SELECT $4::text, $5::text, $6::int4, $7::int8, $8::int8 FROM fence
    WHERE fence.epoch = $3::int8 AND $9::int8 IS NULL
    ON CONFLICT DO NOTHING
    RETURNING 1
)
SELECT (SELECT epoch FROM fence),
       (SELECT count(*) FROM moved) + (SELECT count(*) FROM created)""",
            set_cursors=f"""
WITH moved AS (
    INSERT INTO {c} AS c (subscription, topic, part, next_offset)
    SELECT $1::text, $2::text, t.part, t.next_offset
    FROM unnest($3::int4[], $4::int8[]) AS t(part, next_offset)
    ON CONFLICT (subscription, topic, part)
        DO UPDATE SET next_offset = EXCLUDED.next_offset
    RETURNING topic, part
), note AS (
    SELECT json_build_object('m', json_agg(json_build_array(topic, part)))::text
        AS body
    FROM moved
)
SELECT pg_notify($5::text, CASE WHEN length(body) <= {_MAX_NOTIFY} THEN body
                                ELSE '"all"' END)
FROM note WHERE body IS NOT NULL""",
            delete=f"""
WITH doomed AS (
    SELECT e.topic, e.part, e.event_offset FROM {e} e
    WHERE e.published_at < GREATEST($1::float8, $2::float8)
      AND (e.published_at < $2::float8
           OR (e.published_at < $1::float8 AND NOT EXISTS (
                 SELECT 1 FROM {c} c
                 WHERE c.topic = e.topic AND c.part = e.part
                   AND c.next_offset <= e.event_offset)))
    LIMIT $3::int8
), gone AS (
    DELETE FROM {e} e USING doomed d
    WHERE e.topic = d.topic AND e.part = d.part AND e.event_offset = d.event_offset
    RETURNING 1
)
SELECT count(*) FROM gone""",
        )


def parse_heads(raw: Iterable[PgNotification]) -> list[tuple[str, int, int]]:
    """The partition heads ``(topic, partition, end)`` of bus notifications
    (`ALL` for a payload that named too many; ``end`` `MOVED` for a cursor
    set); payloads we did not write are logged and skipped."""
    heads: list[tuple[str, int, int]] = []
    for notification in raw:
        try:
            data = json.loads(notification.payload)
            if data == "all":
                heads.append(ALL)
                continue
            if isinstance(data, dict):  # cursors set: {"m": [[topic, part]]}
                for topic, partition in data["m"]:
                    heads.append((str(topic), int(partition), MOVED))
                continue
            for topic, partition, end in data:
                end = int(end)
                if end < 0:
                    raise ValueError(f"negative end {end}")
                heads.append((str(topic), int(partition), end))
        # NOTE: anyone may NOTIFY on the channel: whatever fails to parse is
        # skipped, never raised into a reader.
        except MALFORMED as exc:
            skip_malformed(notification, exc)
    return heads


@attrs.define(eq=False)
class _Waiter:
    end: int
    woken: trio.Event = attrs.field(factory=trio.Event)
    satisfied: bool = False
    moved: bool = False
    """A cursor of its partition may have been set (or a wake-up missed)."""


@attrs.define(eq=False, kw_only=True)
class PgEvents(EventStorage):
    """One session's `EventStorage` on PostgreSQL.

    Args:
        pool: the session's pool for message traffic.
        queries: the statements.
        listener: the bus channel's LISTEN connection (not yet open).
        channel: the bus channel.
        owner: the `PostgresStorage` (transactions must come from it).
    """

    _pool: PgPool
    _q: EventQueries = attrs.field(alias="queries")
    _listener: Listener
    _channel: str
    _owner: object
    _known: dict[tuple[str, int], int] = attrs.field(init=False, factory=dict)
    _waiters: dict[tuple[str, int], set[_Waiter]] = attrs.field(
        init=False, factory=dict
    )
    _pumping: bool = attrs.field(init=False, default=False)
    wakeups_lossless = True  # a lost LISTEN connection wakes every waiter

    async def _rows(
        self,
        query: str,
        params: Sequence[object],
        transaction: StorageTransaction | None = None,
    ) -> list[tuple[Any, ...]]:
        if transaction is None:
            return (await self._pool.execute(query, params)).rows
        mine = check_transaction(transaction, PgTransaction, self._owner)
        return await mine.execute_internal(query, params)

    async def publish(
        self,
        events: Sequence[EventRecord],
        *,
        transaction: StorageTransaction | None = None,
    ) -> None:
        checked = check_events(events)
        if transaction is not None:
            check_transaction(transaction, PgTransaction, self._owner)
        if not checked:
            await trio.lowlevel.checkpoint()
            return
        await self._rows(
            self._q.publish,
            [
                [e.topic for e in checked],
                [e.partition for e in checked],
                [e.key for e in checked],
                [e.payload for e in checked],
                [float(e.published_at) for e in checked],
                self._channel,
            ],
            transaction,
        )

    async def read(
        self, topic: str, partition: int, *, offset: int, limit: int
    ) -> list[StoredEvent]:
        topic, partition, offset, limit = check_read(topic, partition, offset, limit)
        if not limit:
            await trio.lowlevel.checkpoint()
            return []
        rows = await self._rows(self._q.read, [topic, partition, offset, limit])
        return [
            StoredEvent(topic, partition, int(o), k, bytes(p), float(at))
            for o, k, p, at in rows
        ]

    async def positions(
        self, subscription: str, topic: str, partitions: Sequence[int]
    ) -> list[PartitionPosition]:
        subscription = check_name(subscription, "subscription")
        topic = check_name(topic, "topic")
        checked = check_partitions(partitions)
        if not checked:
            await trio.lowlevel.checkpoint()
            return []
        rows = await self._rows(self._q.positions, [subscription, topic, checked])
        return [
            PartitionPosition(
                subscription,
                topic,
                int(p),
                None if cursor is None else int(cursor),
                int(end),
                int(skipped),
            )
            for p, cursor, end, skipped in rows
        ]

    async def all_positions(self) -> list[PartitionPosition]:
        rows = await self._rows(self._q.all_positions, [])
        return [
            PartitionPosition(s, t, int(p), int(cursor), int(end), int(skipped))
            for s, t, p, cursor, end, skipped in rows
        ]

    async def advance_cursor(
        self,
        advance: CursorAdvance,
        *,
        transaction: StorageTransaction | None = None,
    ) -> CursorOutcome:
        a = check_advance(advance)
        rows = await self._rows(
            self._q.advance,
            [
                a.shard.group,
                a.shard.number,
                a.epoch,
                a.subscription,
                a.topic,
                a.partition,
                a.offset,
                a.skipped,
                a.expected,
            ],
            transaction,
        )
        epoch, changed = rows[0]
        if epoch is None or int(epoch) != a.epoch:
            return CursorOutcome.STALE_EPOCH
        return CursorOutcome.ADVANCED if changed else CursorOutcome.MOVED

    async def set_cursors(
        self, subscription: str, topic: str, offsets: Sequence[tuple[int, int]]
    ) -> None:
        subscription = check_name(subscription, "subscription")
        topic = check_name(topic, "topic")
        checked = check_offsets(offsets)
        if not checked:
            await trio.lowlevel.checkpoint()
            return
        await self._rows(
            self._q.set_cursors,
            [
                subscription,
                topic,
                [p for p, _ in checked],
                [o for _, o in checked],
                self._channel,
            ],
        )

    async def delete_events(
        self, *, older_than: float, hard_older_than: float, limit: int
    ) -> int:
        older, hard, limit = check_delete_events(older_than, hard_older_than, limit)
        if not limit:
            await trio.lowlevel.checkpoint()
            return 0
        rows = await self._rows(self._q.delete, [float(older), float(hard), limit])
        return int(rows[0][0])

    # ------------------------------------------------------------------
    # Wake-ups

    async def wait_published(
        self, topic: str, partition: int, *, end: int, subscription: str | None = None
    ) -> bool:
        key = (check_name(topic, "topic"), check_partition(partition))
        if subscription is not None:
            subscription = check_name(subscription, "subscription")
        await trio.lowlevel.checkpoint_if_cancelled()
        if self._known.get(key, 0) > end:
            await trio.lowlevel.cancel_shielded_checkpoint()
            return False
        me = _Waiter(end)
        waiters = self._waiters.setdefault(key, set())
        waiters.add(me)
        try:
            if subscription is not None:
                # Registered first: a set after this read wakes it.
                [position] = await self.positions(subscription, key[0], [key[1]])
                if position.cursor != end:
                    return True
            while not me.satisfied:
                if self._pumping:
                    await me.woken.wait()
                    me.woken = trio.Event()
                    continue
                self._pumping = True
                try:
                    while not me.satisfied:
                        await self._pump()
                finally:
                    self._pumping = False
                    self._promote_one()
        finally:
            waiters.discard(me)
            if not waiters and self._waiters.get(key) is waiters:
                del self._waiters[key]
        return me.moved

    async def _pump(self) -> None:
        """Read one round of notifications and wake whom they concern."""
        try:
            if not self._listener.is_listening:
                await self._listener.open()
                # Notifications sent before it listened are lost: wake all.
                self._deliver([ALL])
                return
            self._deliver(await self._listener.wait())
        except PersistenceError as exc:
            log.warning("event bus notifications lost, readers poll: %s", exc)
            self._deliver([ALL])
            await trio.sleep(0.05)

    def _deliver(self, heads: Sequence[tuple[str, int, int]]) -> None:
        for topic, partition, end in heads:
            if (topic, partition, end) == ALL:
                for waiters in self._waiters.values():
                    for waiter in waiters:
                        waiter.satisfied = waiter.moved = True
                        waiter.woken.set()
                continue
            key = (topic, partition)
            if end == MOVED:
                for waiter in self._waiters.get(key, ()):
                    waiter.satisfied = waiter.moved = True
                    waiter.woken.set()
                continue
            if end > self._known.get(key, 0):
                self._known[key] = end
            for waiter in self._waiters.get(key, ()):
                if end > waiter.end:
                    waiter.satisfied = True
                    waiter.woken.set()

    def _promote_one(self) -> None:
        """The pump is free: wake one unsatisfied waiter to take it."""
        for waiters in self._waiters.values():
            for waiter in waiters:
                if not waiter.satisfied:
                    waiter.woken.set()
                    return

    def close(self) -> None:
        """Close the LISTEN connection (at the end of the session)."""
        self._listener.close()
