"""The event bus (`trio_cluster.events`) end to end on memory storage and
virtual time."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractAsyncContextManager

import attrs
import pytest
import trio

import trio_cluster as tc
from trio_cluster.events import Event, EventBus, Subscription, Topic, event_bus
from trio_cluster.storage import MemoryStorage

from ..helpers import clock, config


@attrs.frozen
class Placed:
    key: str
    n: int


class Seen:
    def __init__(self, fail: dict[int, int] | None = None) -> None:
        self.events: list[Event[Placed]] = []
        self.fail = dict(fail or {})
        """n -> attempts that raise first (-1: always)."""
        self.attempts: dict[int, int] = {}

    async def handle(self, event: Event[Placed]) -> None:
        n = event.value.n
        self.attempts[n] = self.attempts.get(n, 0) + 1
        left = self.fail.get(n, 0)
        if left == -1 or self.attempts[n] <= left:
            raise RuntimeError(f"event {n} failed")
        self.events.append(event)


def runner(
    storage: MemoryStorage, *subscriptions: Subscription[Placed]
) -> AbstractAsyncContextManager[tc.Runner]:
    return tc.open_runner(
        config=config(),
        storage=storage,
        clock=clock(),
        singletons=[s for sub in subscriptions for s in sub.consumers],
    )


async def until(predicate: Callable[[], bool], limit: float = 600) -> None:
    with trio.fail_after(limit):
        while not predicate():  # noqa: ASYNC110
            await trio.sleep(0.01)


ORDERS = Topic("orders", Placed, partitions=4)


async def test_events_of_a_key_arrive_in_order_once(autojump_clock):
    seen = Seen()
    sub = Subscription(ORDERS, "billing", seen.handle, start="earliest")
    async with runner(MemoryStorage(), sub) as r:
        bus = event_bus(r)

        async def publish(key: str) -> None:
            for n in range(20):
                await bus.publish(ORDERS, Placed(key, n), key=key)

        async with trio.open_nursery() as nursery:
            for k in range(10):
                nursery.start_soon(publish, f"c{k}")
        await until(lambda: len(seen.events) == 200)
        for k in range(10):
            mine = [e.value.n for e in seen.events if e.key == f"c{k}"]
            assert mine == list(range(20))
        # Group commit: 100 concurrent publishers, far fewer statements.
        assert bus.published == 200
        assert bus.statements < 200
        # The cursors pass them all (the last advance follows the handler).
        with trio.fail_after(60):
            while [p.lag for p in await bus.lag(sub)] != [0, 0, 0, 0]:  # noqa: ASYNC110
                await trio.sleep(0.01)
        assert len(seen.events) == 200  # and nothing was delivered twice


async def test_latest_starts_at_the_end_and_replay_delivers_again(autojump_clock):
    storage = MemoryStorage()
    seen = Seen()
    sub = Subscription(ORDERS, "audit", seen.handle)  # start="latest"
    async with runner(storage) as r:
        await event_bus(r).publish(ORDERS, Placed("a", 0), key="a")
    async with runner(storage, sub) as r:
        bus = event_bus(r)
        await r.wait_shards_acquired()
        await until_cursors(bus, sub)
        await bus.publish(ORDERS, Placed("a", 1), key="a")
        await until(lambda: [e.value.n for e in seen.events] == [1])
        await bus.replay(sub, from_offset="earliest")
        await until(lambda: [e.value.n for e in seen.events] == [1, 0, 1])


async def test_an_idle_subscription_reads_nothing_until_woken(autojump_clock):
    storage = MemoryStorage()
    seen = Seen()
    sub = Subscription(ORDERS, "idle", seen.handle, start="earliest")
    calls: list[str] = []

    async def count(session: str, operation: str) -> None:
        if operation in ("read", "positions", "wait_published"):
            calls.append(operation)

    async with runner(storage, sub) as r:
        bus = event_bus(r)
        await r.wait_shards_acquired()
        await until_cursors(bus, sub)
        await bus.publish(ORDERS, Placed("a", 0), key="a")
        await until(lambda: len(seen.events) == 1)
        await trio.sleep(1)  # every consumer waits
        storage.fault_hook = count
        await trio.sleep(600)
        assert calls == []  # ten idle minutes: not one read
        # A replay wakes the consumer of each partition it sets.
        await bus.replay(sub, from_offset="earliest")
        await until(lambda: len(seen.events) == 2, limit=5)
        assert [e.value.n for e in seen.events] == [0, 0]
    # A given poll_interval still polls.
    polled = Subscription(ORDERS, "polled", Seen().handle, poll_interval=2.0)
    async with runner(storage, polled) as r:
        await r.wait_shards_acquired()
        await until_cursors(event_bus(r), polled)
        await trio.sleep(1)
        calls.clear()
        await trio.sleep(10)
        # Each of the 4 consumers read again about 5 times.
        assert 4 * 4 <= calls.count("read") <= 4 * 6, calls


async def until_cursors(bus: EventBus, sub: Subscription[Placed]) -> None:
    with trio.fail_after(600):
        while any(p.cursor is None for p in await bus.lag(sub)):  # noqa: ASYNC110
            await trio.sleep(0.1)


async def test_a_failing_event_is_retried_then_skipped_and_counted(autojump_clock):
    seen = Seen(fail={1: 2, 2: -1})
    sub = Subscription(
        Topic("one", Placed, partitions=1),
        "flaky",
        seen.handle,
        start="earliest",
        retry=tc.RetryPolicy(max_attempts=3),
    )
    async with runner(MemoryStorage(), sub) as r:
        bus = event_bus(r)
        for n in range(4):
            await bus.publish(sub.topic, Placed("k", n), key="k")
        await until(lambda: [e.value.n for e in seen.events][-1:] == [3])
        # 0 handled in a batch that failed, then one by one: 0 delivered
        # twice at most; 1 after two failures; 2 skipped after three.
        assert [e.value.n for e in seen.events if e.value.n != 0] == [1, 3]
        # Three attempts of its own, after at most one in a failed batch.
        assert 3 <= seen.attempts[2] <= 4
        [position] = await bus.lag(sub)
        assert (position.cursor, position.skipped) == (4, 1)


async def test_publications_in_a_transaction_exist_only_at_commit(autojump_clock):
    seen = Seen()
    sub = Subscription(ORDERS, "tx", seen.handle, start="earliest")

    class Abort(Exception):
        pass

    async with runner(MemoryStorage(), sub) as r:
        bus = event_bus(r)

        async def publish_then_fail() -> None:
            async with r.transaction():
                await bus.publish(ORDERS, Placed("x", 0), key="x")
                raise Abort

        with pytest.raises(Abort):
            await publish_then_fail()
        async with r.transaction():
            await bus.publish(ORDERS, Placed("x", 1), key="x")
            await trio.sleep(5)
            assert seen.events == []
        await until(lambda: [e.value.n for e in seen.events] == [1])


async def test_transactional_subscriber_advances_its_cursor_with_its_effects(
    autojump_clock,
):
    seen = Seen(fail={0: 1})
    sub = Subscription(
        Topic("single", Placed, partitions=1),
        "txsub",
        seen.handle,
        start="earliest",
        transactional=True,
    )
    async with runner(MemoryStorage(), sub) as r:
        bus = event_bus(r)
        await bus.publish(sub.topic, Placed("k", 0), key="k")
        await until(lambda: len(seen.events) == 1)
        [position] = await bus.lag(sub)
        assert position.cursor == 1


async def test_bad_arguments_are_typed_errors(autojump_clock):
    with pytest.raises(tc.ConfigError):
        Topic("bad name", Placed)
    with pytest.raises(tc.ConfigError):
        Topic("t", Placed, partitions=0)
    with pytest.raises(tc.ConfigError):
        Subscription(ORDERS, "s", Seen().handle, start="middle")  # type: ignore[arg-type]
    async with runner(MemoryStorage()) as r:
        with pytest.raises(tc.MalformedMessageError):
            await event_bus(r).publish(ORDERS, "not a Placed", key="k")
        with pytest.raises(TypeError):
            await event_bus(r).publish(ORDERS, Placed("k", 0), key=3)  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="from_offset"):
            await event_bus(r).replay(
                Subscription(ORDERS, "s", Seen().handle), from_offset=-1
            )
