"""`Subscription`: a named consumer of a topic, one consumer per partition (delivery part).

Theory of operation: a subscription's consumer of partition ``p`` is a
`Singleton` named ``trio_cluster.events.<subscription>.<p>``: it runs in the
nursery of the shard that name hashes to, on the runner serving that shard,
moves with it, and never runs twice at once. It keeps the partition's
cursor: it reads a batch from the cursor on, hands each event to the
handler in offset order, then advances the cursor past the batch, fenced by
its shard's epoch and compare-and-set (a stale owner, or a cursor moved by
a replay, changes nothing: the consumer reloads its position). With nothing
to read it waits for a publication's wake-up (NOTIFY at commit on
PostgreSQL) or a replay's (its cursor set: it reads its cursor again), and
reads nothing meanwhile: storage wakes it again whenever a wake-up may have
been lost (`EventStorage.wakeups_lossless`; on a backend that cannot, and
when ``poll_interval`` is given, it also reads again that often).

Delivery is at least once: a consumer that stops between the handler and
the cursor's advance delivers those events again. With ``transactional``,
the handlers of a batch and the cursor's advance run in one storage
transaction (``current_transaction()`` inside the handler), so their
database effects commit exactly once with the cursor.

A handler that raises: the batch is abandoned (rolled back when
transactional) and its events are handled one at a time, each retried per
the subscription's `RetryPolicy`; an event whose attempts are spent is
*skipped*: logged at ERROR with its topic, partition, offset and error, and
counted in the cursor's ``skipped`` (``trio-cluster events lag``), so one
poison event never stops the partition, and never silently.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Final, Generic, Literal, TypeVar

import attrs
import trio

from trio_cluster import (
    ConfigError,
    PersistenceError,
    RetryPolicy,
    Runner,
    ShardId,
    Singleton,
    current_cluster_state,
    current_runner,
)
from trio_cluster.abc import CursorAdvance, CursorOutcome, EventStorage
from trio_cluster.serialization import Codec

from .._core._checks import part_name
from ._bus import event_bus
from ._topic import Event, Topic

if TYPE_CHECKING:
    from trio_cluster.abc import StoredEvent

__all__ = ["Subscription"]

log = logging.getLogger("trio_cluster.events")

FALLBACK_POLL: Final = 1.0
"""Seconds between an idle consumer's reads on a backend whose wake-ups
may be lost silently (`EventStorage.wakeups_lossless` false)."""

T = TypeVar("T")


class _Abandoned(Exception):
    """The batch's cursor advance was refused: roll back, reload."""

    def __init__(self, outcome: CursorOutcome) -> None:
        super().__init__(outcome.value)
        self.outcome = outcome


def _check_handler(_: object, __: attrs.Attribute[Any], value: object) -> None:
    if not callable(value):
        raise ConfigError(
            f"a subscription's handler must be an async function, got {value!r}"
        )


def _check_subscription_name(
    _: object, __: attrs.Attribute[str], value: object
) -> None:
    part_name("subscription", value)


def _check_start(_: object, __: attrs.Attribute[str], value: object) -> None:
    if value not in ("earliest", "latest"):
        raise ConfigError(f"start must be 'earliest' or 'latest', got {value!r}")


def _check_positive(_: object, attribute: attrs.Attribute[Any], value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise ConfigError(f"{attribute.name} must be a positive number, got {value!r}")


@attrs.frozen(eq=False)
class Subscription(Generic[T]):
    """A named subscription to a topic, consumed by the runners given its
    `consumers` (``open_runner(singletons=[*subscription.consumers])``).

    Args:
        topic: the topic consumed.
        name: the subscription's name: its cursors are kept under it (keep
            it stable; two subscriptions of one name share cursors).
        handler: ``async def handler(event: Event[T]) -> None``. An
            exception is a failed attempt (see the module docstring).
        start: where a partition without a cursor starts: its first
            retained event, or its end (events published from now on).
        transactional: run each batch's handlers and the cursor's advance
            in one storage transaction.
        retry: attempts of an event whose handler raises before it is skipped.
        batch_size: events read and handled per cursor advance.
        poll_interval: seconds between reads when no wake-up comes; None
            (the default): none on a backend whose wake-ups are never lost
            silently (both built-in ones), `FALLBACK_POLL` on others.

    Raises:
        ConfigError: on construction, for an invalid option.
    """

    topic: Topic[T] = attrs.field(validator=attrs.validators.instance_of(Topic))
    name: str = attrs.field(validator=_check_subscription_name)
    handler: Callable[[Event[T]], Awaitable[None]] = attrs.field(
        validator=_check_handler
    )
    start: Literal["earliest", "latest"] = attrs.field(
        default="latest", validator=_check_start
    )
    transactional: bool = False
    retry: RetryPolicy = attrs.field(
        factory=lambda: RetryPolicy(max_attempts=10),
        validator=attrs.validators.instance_of(RetryPolicy),
    )
    batch_size: int = attrs.field(default=100, validator=_check_positive)
    poll_interval: float | None = attrs.field(
        default=None, validator=attrs.validators.optional(_check_positive)
    )

    @property
    def consumers(self) -> list[Singleton]:
        """One singleton per partition of the topic."""
        return [
            Singleton(
                f"trio_cluster.events.{self.name}.{partition}",
                _consumer(self, partition),
            )
            for partition in range(self.topic.partitions)
        ]


def _consumer(
    subscription: Subscription[Any], partition: int
) -> Callable[[], Awaitable[None]]:
    name = f"trio_cluster.events.{subscription.name}.{partition}"

    async def run() -> None:
        runner = current_runner()
        epoch = current_cluster_state().shard_epoch
        assert epoch is not None, "a consumer runs as a singleton"
        singleton = Singleton(name, run)
        consumer = _Consumer(
            subscription,
            partition,
            runner,
            shard=singleton.shard(runner.config.shards_per_group),
            epoch=epoch,
        )
        await consumer.run()

    return run


@attrs.define(eq=False)
class _Consumer:
    """The consumer of one partition of one subscription (see the module
    docstring)."""

    sub: Subscription[Any]
    partition: int
    runner: Runner
    shard: ShardId
    epoch: int
    storage: EventStorage = attrs.field(init=False)
    codec: Codec[Any] = attrs.field(init=False)
    cursor: int | None = attrs.field(init=False, default=None)
    isolate_until: int = attrs.field(init=False, default=-1)
    """Events up to this offset are handled one at a time (a batch failed)."""
    _poll: float = attrs.field(init=False, default=math.inf)
    """Seconds an idle wait lasts before it reads again anyway."""

    def __attrs_post_init__(self) -> None:
        self.storage = self.runner.event_storage
        self.codec = event_bus(self.runner).codec(self.sub.topic)
        poll = self.sub.poll_interval
        if poll is None and not self.storage.wakeups_lossless:
            poll = FALLBACK_POLL
        self._poll = math.inf if poll is None else poll

    async def run(self) -> None:
        """Consume until cancelled (the shard stops here) or fenced out.

        Raises:
            PersistenceError: storage failed (the singleton is restarted).
        """
        topic = self.sub.topic.name
        while True:
            if self.cursor is None and not await self._load():
                return
            assert self.cursor is not None
            size = 1 if self.cursor <= self.isolate_until else self.sub.batch_size
            events = await self.storage.read(
                topic, self.partition, offset=self.cursor, limit=size
            )
            if not events:
                moved = True  # if the poll comes first: a replay may have moved it
                with trio.move_on_after(self._poll):
                    moved = await self.storage.wait_published(
                        topic,
                        self.partition,
                        end=self.cursor,
                        subscription=self.sub.name,
                    )
                if moved:
                    self.cursor = None  # reload
                continue
            outcome = await self._handle(events)
            if outcome is CursorOutcome.STALE_EPOCH:
                log.info("%s: shard %s moved on; stopping", self.sub.name, self.shard)
                return
            if outcome is CursorOutcome.MOVED:
                self.cursor = None  # replayed, or another owner: reload

    async def _load(self) -> bool:
        """Read the cursor; create it (``start``) if missing. False: fenced out."""
        topic = self.sub.topic.name
        [position] = await self.storage.positions(
            self.sub.name, topic, [self.partition]
        )
        if position.cursor is not None:
            self.cursor = position.cursor
            return True
        start = position.end if self.sub.start == "latest" else 0
        outcome = await self._advance(None, start, 0)
        if outcome is CursorOutcome.STALE_EPOCH:
            return False
        if outcome is CursorOutcome.ADVANCED:
            self.cursor = start
        return True

    async def _advance(
        self, expected: int | None, offset: int, skipped: int, transaction: Any = None
    ) -> CursorOutcome:
        return await self.storage.advance_cursor(
            CursorAdvance(
                self.sub.name,
                self.sub.topic.name,
                self.partition,
                expected,
                offset,
                self.shard,
                self.epoch,
                skipped,
            ),
            transaction=transaction,
        )

    def _event(self, stored: StoredEvent) -> Event[Any]:
        return Event(
            stored.topic,
            stored.partition,
            stored.offset,
            stored.key,
            self.codec.decode(stored.payload),
            stored.published_at,
        )

    async def _handle(self, events: list[StoredEvent]) -> CursorOutcome:
        """Handle a batch and advance past it; the advance's outcome."""
        expected = self.cursor
        end = events[-1].offset + 1
        if len(events) == 1:
            return await self._handle_one(events[0], expected)
        try:
            outcome = await self._attempt(events, expected, end, 0)
        except _Abandoned as exc:
            return exc.outcome
        except PersistenceError:
            raise
        except Exception as exc:
            log.info(
                "%s: a batch of partition %d failed (%r); handling it one by one",
                self.sub.name,
                self.partition,
                exc,
            )
            self.isolate_until = events[-1].offset
            # The cursor stays: the next reads take these events singly.
            return CursorOutcome.ADVANCED
        if outcome is CursorOutcome.ADVANCED:
            self.cursor = end
        return outcome

    async def _handle_one(
        self, stored: StoredEvent, expected: int | None
    ) -> CursorOutcome:
        attempt = 0
        while True:
            attempt += 1
            try:
                outcome = await self._attempt([stored], expected, stored.offset + 1, 0)
            except _Abandoned as exc:
                return exc.outcome
            except PersistenceError:
                raise
            except Exception as exc:
                if self.sub.retry.retries(attempt, exc):
                    await trio.sleep(self.sub.retry.backoff.delay(attempt - 1))
                    continue
                log.error(
                    "%s: skipping event %s/%d@%d after %d attempts",
                    self.sub.name,
                    stored.topic,
                    stored.partition,
                    stored.offset,
                    attempt,
                    exc_info=exc,
                )
                outcome = await self._advance(expected, stored.offset + 1, 1)
            if outcome is CursorOutcome.ADVANCED:
                self.cursor = stored.offset + 1
            return outcome

    async def _attempt(
        self, events: list[StoredEvent], expected: int | None, end: int, skipped: int
    ) -> CursorOutcome:
        """Run the handler on each event, then advance (in one transaction
        when transactional).

        Raises:
            _Abandoned: the advance was refused (a transaction rolled back).
        """
        handler = self.sub.handler
        if not self.sub.transactional:
            for stored in events:
                await handler(self._event(stored))
            return await self._advance(expected, end, skipped)
        async with self.runner.transaction() as transaction:
            for stored in events:
                await handler(self._event(stored))
            if transaction.failure is not None:
                raise transaction.failure
            outcome = await self._advance(expected, end, skipped, transaction)
            if outcome is not CursorOutcome.ADVANCED:
                raise _Abandoned(outcome)
        return outcome
