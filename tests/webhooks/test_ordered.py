"""Ordered webhook endpoints: a FIFO across retries, resumed after a
failover (memory storage, virtual time, ``httpx.MockTransport``)."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
import trio

import trio_cluster as tc
from trio_cluster.abc import AttemptRecord
from trio_cluster.storage import MemoryStorage
from trio_cluster.webhooks import (
    BreakerPolicy,
    RetrySchedule,
    WebhookMessage,
    Webhooks,
)

from ..helpers import FailFirst, clock, config, open_clocked_runner
from .sink import Sink, endpoint, opened, settle

SHORT = RetrySchedule((0, 5, 30, 60), jitter=0)


def rounded(sink: Sink, path: str, start: float) -> list[tuple[float, str]]:
    """The requests ``path`` received: (seconds after ``start``, message id)."""
    return [(round(at - start, 2), m) for at, m, _ in sink.calls.get(path, [])]


async def test_a_later_delivery_waits_until_the_earlier_one_succeeded(
    autojump_clock,
):
    async with opened(Webhooks(schedule=SHORT)) as (_, client, sink):
        sink.scripts["a"] = lambda n: httpx.Response(503 if n <= 2 else 200)
        await client.register(endpoint("a", ordered=True))
        start = trio.current_time()
        ids = [(await client.send("e", i)).message_id for i in range(3)]
        await settle(200)
        # attempt n of the first starts its delay after attempt n-1
        # answered (10 ms later); the next ones follow its success.
        assert rounded(sink, "a", start) == [
            (0.0, ids[0]),
            (5.01, ids[0]),
            (35.02, ids[0]),
            (35.03, ids[1]),
            (35.04, ids[2]),
        ]
        assert sink.most["a"] == 1
        attempts = await client.attempts(message_id=ids[0])
        assert [(a.attempt, a.outcome) for a in attempts] == [
            (1, "failure"),
            (2, "failure"),
            (3, "success"),
        ]
        assert attempts[0].next_at == attempts[1].at
        assert attempts[1].next_at == attempts[2].at
        assert attempts[2].next_at is None
        assert await client.dead_deliveries() == []


async def test_an_unordered_endpoint_still_lets_later_deliveries_pass(
    autojump_clock,
):
    async with opened(Webhooks(schedule=SHORT)) as (_, client, sink):
        sink.scripts["a"] = lambda n: httpx.Response(503 if n == 1 else 200)
        await client.register(endpoint("a"))
        start = trio.current_time()
        first = (await client.send("e", 1)).message_id
        await settle(1)
        second = (await client.send("e", 2)).message_id
        await settle(100)
        assert rounded(sink, "a", start) == [
            (0.0, first),
            (1.0, second),
            (5.01, first),
        ]


async def test_retry_after_holds_the_endpoint_longer(autojump_clock):
    async with opened(Webhooks(schedule=SHORT)) as (_, client, sink):
        answers = {1: httpx.Response(429, headers={"retry-after": "20"})}
        sink.scripts["a"] = lambda n: answers.get(n, httpx.Response(200))
        await client.register(endpoint("a", ordered=True))
        start = trio.current_time()
        first = (await client.send("e", 1)).message_id
        second = (await client.send("e", 2)).message_id
        await settle(100)
        assert rounded(sink, "a", start) == [
            (0.0, first),
            (20.01, first),
            (20.02, second),
        ]


async def test_exhausted_then_the_next_delivery_goes(autojump_clock):
    webhooks = Webhooks(schedule=RetrySchedule((0, 1, 1), jitter=0))
    async with opened(webhooks) as (_, client, sink):
        sink.scripts["a"] = lambda n: httpx.Response(500 if n <= 3 else 200)
        await client.register(endpoint("a", ordered=True))
        start = trio.current_time()
        first = (await client.send("e", 1)).message_id
        second = (await client.send("e", 2)).message_id
        await settle(30)
        assert rounded(sink, "a", start) == [
            (0.0, first),
            (1.01, first),
            (2.02, first),
            (2.03, second),
        ]
        [(_, dead)] = await client.dead_deliveries()
        assert dead.message.message_id == first
        assert not dead.disabled
        assert "3 attempt(s) failed, the last with HTTP 500" in dead.error
        # A replay numbers its attempts after the three made.
        assert await client.replay(first) == 1
        await settle(5)
        attempts = await client.attempts(message_id=first)
        assert [(a.attempt, a.outcome) for a in attempts][-1] == (4, "success")


async def test_a_disabled_endpoint_drains_to_the_dead_letters(autojump_clock):
    webhooks = Webhooks(schedule=RetrySchedule((0, 3600), jitter=0), endpoint_refresh=0)
    async with opened(webhooks) as (_, client, sink):
        sink.scripts["a"] = lambda n: httpx.Response(500)
        await client.register(endpoint("a", ordered=True))
        ids = [(await client.send("e", i)).message_id for i in range(3)]
        await settle(10)
        assert [m for _, m, _ in sink.calls["a"]] == ids[:1]
        disabled_at = trio.current_time()
        await client.disable("a", reason="maintenance")
        await settle(1.5)  # the held delivery reads its endpoint every 1 s
        dead = await client.dead_deliveries()
        assert [d.message.message_id for _, d in dead] == ids
        assert all(d.disabled and "maintenance" in d.error for _, d in dead)
        assert trio.current_time() - disabled_at < 2
        await settle(7200)
        assert len(sink.calls["a"]) == 1


async def test_the_breaker_holds_an_ordered_delivery_in_its_handler(
    autojump_clock,
):
    webhooks = Webhooks(
        schedule=RetrySchedule((0, 1, 1, 1), jitter=0),
        breaker=BreakerPolicy(threshold=2, cool_down=60, probe_wait=1),
    )
    async with opened(webhooks) as (_, client, sink):
        sink.scripts["a"] = lambda n: httpx.Response(500 if n <= 2 else 200)
        await client.register(endpoint("a", ordered=True))
        start = trio.current_time()
        first = (await client.send("e", 1)).message_id
        second = (await client.send("e", 2)).message_id
        await settle(200)
        # two failures open the breaker for 60 s: attempt 3 waits for it
        assert rounded(sink, "a", start) == [
            (0.0, first),
            (1.01, first),
            (61.02, first),
            (61.03, second),
        ]
        attempts = await client.attempts(message_id=first)
        assert [a.attempt for a in attempts] == [1, 2, 3]
        assert client.statistics().postponed == 1


async def test_a_restart_mid_wait_continues_the_schedule(autojump_clock):
    webhooks = Webhooks(schedule=RetrySchedule((0, 100, 100), jitter=0))
    storage = MemoryStorage()
    wall = clock()  # one wall clock for both runners
    sink = Sink(wall.now)
    sink.scripts["a"] = lambda n: httpx.Response(500 if n == 1 else 200)
    transport = httpx.MockTransport(sink.handler)
    start = trio.current_time()
    async with (
        tc.open_runner(
            entities=webhooks.entities, config=config(), storage=storage, clock=wall
        ) as runner,
        webhooks.open(runner, storage, transport=transport) as client,
    ):
        await client.register(endpoint("a", ordered=True))
        first = (await client.send("e", 1)).message_id
        second = (await client.send("e", 2)).message_id
        await settle(10)
        [failed] = await client.attempts(message_id=first)
        assert failed.next_at is not None
    # Closing waited for the held handler (the termination timeout), then
    # cancelled it: nothing else was attempted.
    assert trio.current_time() - start < 100
    assert rounded(sink, "a", start) == [(0.0, first)]
    async with (
        tc.open_runner(
            entities=webhooks.entities, config=config(), storage=storage, clock=wall
        ) as runner,
        webhooks.open(runner, storage, transport=transport) as client,
    ):
        await settle(300)
        assert rounded(sink, "a", start) == [
            (0.0, first),
            (100.01, first),
            (100.02, second),
        ]
        attempts = await client.attempts(message_id=first)
        assert [(a.attempt, a.outcome) for a in attempts] == [
            (1, "failure"),
            (2, "success"),
        ]
        assert attempts[1].at == failed.next_at


async def test_a_storage_failure_while_held_does_not_let_the_next_pass(
    autojump_clock,
):
    storage = MemoryStorage()
    async with opened(Webhooks(schedule=SHORT), storage) as (_, client, sink):
        sink.scripts["a"] = lambda n: httpx.Response(500 if n == 1 else 200)
        await client.register(endpoint("a", ordered=True))
        storage.fault_hook = FailFirst("record_attempts", 2, "connection lost")
        start = trio.current_time()
        first = (await client.send("e", 1)).message_id
        second = (await client.send("e", 2)).message_id
        await settle(100)
        # the record is written again in the handler; the retry keeps its time
        assert rounded(sink, "a", start) == [
            (0.0, first),
            (5.01, first),
            (5.02, second),
        ]
        attempts = await client.attempts(message_id=first)
        assert [(a.attempt, a.outcome) for a in attempts] == [
            (1, "failure"),
            (2, "success"),
        ]


async def test_a_held_delivery_waits_for_the_part_to_open_again(autojump_clock):
    webhooks = Webhooks(schedule=SHORT)
    storage = MemoryStorage()
    async with open_clocked_runner(webhooks.entities, storage=storage) as runner:
        sink = Sink(runner.clock.now)
        sink.scripts["a"] = lambda n: httpx.Response(500 if n == 1 else 200)
        transport = httpx.MockTransport(sink.handler)
        start = trio.current_time()
        async with webhooks.open(runner, storage, transport=transport) as client:
            await client.register(endpoint("a", ordered=True))
            first = (await client.send("e", 1)).message_id
            second = (await client.send("e", 2)).message_id
            await settle(1)
        # closed while the first waits for its retry (due at 5.01): the
        # retry waits for the part, checked every second; the second waits
        await settle(7)
        assert rounded(sink, "a", start) == [(0.0, first)]
        async with webhooks.open(runner, storage, transport=transport) as client:
            await settle(100)
            assert rounded(sink, "a", start) == [
                (0.0, first),
                (8.01, first),
                (8.02, second),
            ]
            attempts = await client.attempts(message_id=first)
            assert [a.attempt for a in attempts] == [1, 2]


def record(attempt: int, outcome: str, wall: float, due: float | None) -> AttemptRecord:
    """A recorded attempt of ``msg_1`` to ``a``, its next one ``due``
    seconds after wall time ``wall``."""
    return AttemptRecord(
        message_id="msg_1",
        endpoint_id="a",
        attempt=attempt,
        at=wall - 100,
        outcome=outcome,
        status=200 if outcome == "success" else 500,
        latency=0.01,
        error=None if outcome == "success" else "HTTP 500",
        next_at=None if due is None else wall + due,
    )


@pytest.mark.parametrize(
    ("recorded", "expected"),
    [
        # no attempt yet: at once, attempt 1
        ([], [(0.0, 1)]),
        # two failed: the third at the recorded due time
        ([(1, "failure", 0.5), (2, "failure", 50.0)], [(50.0, 3)]),
        # its due time passed while no one held it: at once
        ([(1, "failure", -10.0)], [(0.0, 2)]),
        # a recorded success ended the delivery: not attempted again
        ([(1, "success", None)], []),
    ],
)
async def test_a_delivery_resumes_from_its_recorded_attempts(
    autojump_clock: object,
    recorded: list[tuple[int, str, float | None]],
    expected: list[tuple[float, int]],
) -> None:
    webhooks = Webhooks(schedule=SHORT)
    async with opened(webhooks) as (runner, client, sink):
        await client.register(endpoint("a", ordered=True))
        start, wall = trio.current_time(), runner.clock.now()
        await client.storage.record_attempts(
            [record(n, outcome, wall, due) for n, outcome, due in recorded]
        )
        handle: Any = runner.client(webhooks.ordered_type)("a")
        await handle.deliver.discard(WebhookMessage("msg_1", "e", b"{}"))
        await settle(100)
        assert [t for t, _ in rounded(sink, "a", start)] == [t for t, _ in expected]
        attempts = await client.attempts(message_id="msg_1")
        made = [a.attempt for a in attempts if a.outcome == "success" and a.at >= wall]
        assert made == [n for _, n in expected]
        assert await client.dead_deliveries() == []


async def test_a_recorded_last_failure_goes_to_the_dead_letters(autojump_clock):
    webhooks = Webhooks(schedule=RetrySchedule((0, 1), jitter=0))
    async with opened(webhooks) as (runner, client, sink):
        await client.register(endpoint("a", ordered=True))
        wall = runner.clock.now()
        # its runner stopped after recording the last attempt, before the
        # dead letter was saved
        await client.storage.record_attempts(
            [record(1, "failure", wall, 1.0), record(2, "failure", wall, None)]
        )
        handle: Any = runner.client(webhooks.ordered_type)("a")
        await handle.deliver.discard(WebhookMessage("msg_1", "e", b"{}"))
        await settle(10)
        assert "a" not in sink.calls
        [(_, dead)] = await client.dead_deliveries()
        assert dead.message.attempt == 2
        assert "2 attempt(s) failed, the last with HTTP 500" in dead.error
