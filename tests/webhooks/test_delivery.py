"""Webhook delivery end to end on memory storage, virtual time and a fake
HTTP transport (``httpx.MockTransport``)."""

from __future__ import annotations

import httpx
import pytest
import trio

import trio_cluster as tc
from trio_cluster.storage import MemoryStorage
from trio_cluster.webhooks import (
    BreakerPolicy,
    RateLimit,
    RetrySchedule,
    WebhookClient,
    WebhookEndpoint,
    WebhookMessage,
    Webhooks,
)

from ..helpers import open_clocked_runner
from .sink import Sink, endpoint, opened, settle

SHORT = RetrySchedule((0, 5, 30, 60), jitter=0)


async def test_a_sent_event_is_delivered_signed_to_matching_endpoints(autojump_clock):
    async with opened(Webhooks()) as (_, client, sink):
        await client.register(endpoint("a"))
        await client.register(endpoint("b", event_types={"invoice.paid"}))
        await client.register(endpoint("c", event_types={"other"}))
        await client.register(endpoint("d", enabled=False))
        sent = await client.send("invoice.paid", {"invoice": 42})
        assert sent.endpoint_ids == ("a", "b")
        await settle(1)
        assert [m for _, m, _ in sink.calls["a"]] == [sent.message_id]
        assert [m for _, m, _ in sink.calls["b"]] == [sent.message_id]
        assert "c" not in sink.calls
        assert "d" not in sink.calls
        [attempt] = await client.attempts(message_id=sent.message_id, endpoint_id="a")
        assert (attempt.attempt, attempt.outcome, attempt.status) == (1, "success", 200)
        assert attempt.next_at is None
        assert attempt.latency == pytest.approx(0.01)
        assert client.statistics().attempts == {"success": 2}


async def test_failed_attempts_are_retried_on_the_schedule(autojump_clock):
    webhooks = Webhooks(schedule=SHORT)
    async with opened(webhooks) as (_, client, sink):
        sink.scripts["a"] = lambda n: httpx.Response(503 if n < 4 else 204)
        await client.register(endpoint("a"))
        start = trio.current_time()
        sent = await client.send("e", None)
        await settle(200)
        times = [round(t - start, 2) for t in sink.times("a")]
        # attempt n starts delay n after attempt n-1 answered (10 ms later)
        assert times == [0.0, 5.01, 35.02, 95.03]
        attempts = await client.attempts(message_id=sent.message_id)
        assert [(a.attempt, a.outcome, a.status) for a in attempts] == [
            (1, "failure", 503),
            (2, "failure", 503),
            (3, "failure", 503),
            (4, "success", 204),
        ]
        assert attempts[0].next_at == pytest.approx(attempts[1].at, abs=1e-6)
        assert attempts[0].error == "HTTP 503"


async def test_exhausted_deliveries_are_dead_letters_and_can_be_replayed(
    autojump_clock,
):
    webhooks = Webhooks(schedule=RetrySchedule((0, 1, 1), jitter=0))
    async with opened(webhooks) as (runner, client, sink):
        failing = True
        sink.scripts["a"] = lambda n: httpx.Response(500 if failing else 200)
        await client.register(endpoint("a"))
        sent = await client.send("e", {"x": 1})
        await settle(30)
        assert len(sink.calls["a"]) == 3
        [(letter_id, dead)] = await client.dead_deliveries()
        assert dead.endpoint_id == "a"
        assert dead.message.message_id == sent.message_id
        assert "3 attempt(s) failed, the last with HTTP 500" in dead.error
        letter = await runner.dead_letters.get(letter_id)
        assert letter is not None
        assert "HTTP 500" in letter.error
        assert client.statistics().dead == 1
        failing = False
        assert await client.replay(sent.message_id) == 1
        await settle(5)
        assert [m for _, m, _ in sink.calls["a"]][-1] == sent.message_id
        assert len(sink.calls["a"]) == 4
        attempts = await client.attempts(message_id=sent.message_id)
        assert [(a.attempt, a.outcome) for a in attempts] == [
            (1, "failure"),
            (2, "failure"),
            (3, "failure"),
            (4, "success"),
        ]
        assert await client.dead_deliveries() == []
        assert await client.replay(sent.message_id) == 0


async def test_retry_after_pushes_a_retry_later_never_earlier(autojump_clock):
    webhooks = Webhooks(schedule=SHORT)
    async with opened(webhooks) as (_, client, sink):
        answers = {
            1: httpx.Response(429, headers={"retry-after": "20"}),
            2: httpx.Response(503, headers={"retry-after": "1"}),
        }
        sink.scripts["a"] = lambda n: answers.get(n, httpx.Response(200))
        await client.register(endpoint("a"))
        start = trio.current_time()
        await client.send("e", None)
        await settle(200)
        times = [round(t - start, 2) for t in sink.times("a")]
        assert times == [0.0, 20.01, 50.02]


async def test_a_timeout_is_a_failed_attempt(autojump_clock):
    webhooks = Webhooks(schedule=RetrySchedule((0, 5), jitter=0))
    async with opened(webhooks) as (_, client, sink):
        sink.delays["a"] = 100.0
        await client.register(endpoint("a", timeout=2.0))
        sent = await client.send("e", None)
        await settle(30)
        attempts = await client.attempts(message_id=sent.message_id)
        assert [(a.outcome, a.status) for a in attempts] == [
            ("timeout", None),
            ("timeout", None),
        ]
        assert attempts[0].latency == pytest.approx(2.0)


async def test_a_transport_error_is_a_failed_attempt(autojump_clock):
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    webhooks = Webhooks(schedule=RetrySchedule((0,), jitter=0))
    storage = MemoryStorage()
    async with (
        open_clocked_runner(webhooks.entities, storage=storage) as runner,
        webhooks.open(runner, storage, transport=httpx.MockTransport(refuse)) as client,
    ):
        await client.register(endpoint("a"))
        sent = await client.send("e", None)
        await settle(5)
        [attempt] = await client.attempts(message_id=sent.message_id)
        assert attempt.outcome == "error"
        assert attempt.error is not None
        assert "connection refused" in attempt.error


async def test_410_disables_the_endpoint(autojump_clock):
    async with opened(Webhooks(schedule=SHORT)) as (_, client, sink):
        sink.scripts["a"] = lambda n: httpx.Response(410)
        await client.register(endpoint("a"))
        first = await client.send("e", 1)
        await settle(5)
        found = await client.endpoint("a")
        assert found is not None
        assert not found.enabled
        [(_, dead)] = await client.dead_deliveries()
        assert dead.disabled
        assert dead.message.message_id == first.message_id
        assert (await client.send("e", 2)).endpoint_ids == ()
        await settle(100)
        assert len(sink.calls["a"]) == 1
        [attempt] = await client.attempts(endpoint_id="a")
        assert attempt.outcome == "gone"


async def test_deliveries_of_a_disabled_endpoint_are_not_attempted(autojump_clock):
    webhooks = Webhooks(schedule=SHORT, endpoint_refresh=0)
    async with opened(webhooks) as (_, client, sink):
        sink.scripts["a"] = lambda n: httpx.Response(500)
        await client.register(endpoint("a"))
        await client.send("e", 1)
        await settle(1)
        await client.disable("a", reason="maintenance")
        await settle(100)
        assert len(sink.calls["a"]) == 1
        [(_, dead)] = await client.dead_deliveries()
        assert dead.disabled
        assert "maintenance" in dead.error
        with pytest.raises(KeyError):
            await client.disable("nope")


async def test_the_circuit_breaker_holds_deliveries_without_counting_attempts(
    autojump_clock,
):
    webhooks = Webhooks(
        schedule=RetrySchedule((0, 1, 1, 1, 1, 1), jitter=0),
        breaker=BreakerPolicy(threshold=2, cool_down=60, probe_wait=1),
    )
    async with opened(webhooks) as (_, client, sink):
        sink.scripts["a"] = lambda n: httpx.Response(500 if n <= 2 else 200)
        await client.register(endpoint("a"))
        start = trio.current_time()
        sent = await client.send("e", None)
        await settle(200)
        times = [round(t - start, 2) for t in sink.times("a")]
        # two failures open the breaker for 60 s; the third attempt waits
        assert times == [0.0, 1.01, 61.02]
        attempts = await client.attempts(message_id=sent.message_id)
        assert [a.attempt for a in attempts] == [1, 2, 3]
        assert client.statistics().postponed == 1


async def test_a_failing_endpoint_does_not_slow_a_healthy_one(autojump_clock):
    webhooks = Webhooks(schedule=RetrySchedule((0, 1, 1), jitter=0), concurrency=4)
    async with opened(webhooks) as (_, client, sink):
        sink.delays["slow"] = 1000.0
        await client.register(endpoint("slow", timeout=10))
        await client.register(endpoint("fast"))
        start = trio.current_time()
        for i in range(8):
            await client.send("e", i)
        await settle(1)
        fast = sink.times("fast")
        assert len(fast) == 8
        assert max(fast) - start < 0.1
        assert sink.most["slow"] == 4


async def test_an_ordered_endpoint_gets_one_delivery_at_a_time_in_order(
    autojump_clock,
):
    async with opened(Webhooks()) as (_, client, sink):
        sink.delays["a"] = 0.5
        await client.register(endpoint("a", ordered=True))
        ids = [(await client.send("e", i)).message_id for i in range(5)]
        await settle(10)
        assert [m for _, m, _ in sink.calls["a"]] == ids
        assert sink.most["a"] == 1


async def test_the_rate_limit_spaces_attempts(autojump_clock):
    async with opened(Webhooks()) as (_, client, sink):
        await client.register(endpoint("a", rate=RateLimit(2.0), ordered=True))
        start = trio.current_time()
        for i in range(5):
            await client.send("e", i)
        await settle(10)
        times = [round(t - start, 2) for t in sink.times("a")]
        assert times == [0.0, 0.5, 1.0, 1.5, 2.0]


async def test_an_idempotent_send_is_saved_once(autojump_clock):
    async with opened(Webhooks()) as (_, client, sink):
        await client.register(endpoint("a"))
        first = await client.send("e", 1, idempotency_key="order-7")
        again = await client.send("e", 1, idempotency_key="order-7")
        assert first.message_id == again.message_id
        await settle(5)
        assert len(sink.calls["a"]) == 1


async def test_sends_in_a_transaction_exist_once_it_commits(autojump_clock):
    async with opened(Webhooks()) as (runner, client, sink):
        await client.register(endpoint("a"))

        async def roll_back() -> None:
            async with runner.transaction():
                await client.send("e", "lost")
                raise RuntimeError("rolled back")

        with pytest.raises(RuntimeError, match="rolled back"):
            await roll_back()
        async with runner.transaction():
            kept = await client.send("e", "kept")
        await settle(5)
        assert [m for _, m, _ in sink.calls["a"]] == [kept.message_id]


async def test_bad_sends_are_refused_and_lose_nothing(autojump_clock):
    async with opened(Webhooks()) as (_, client, sink):
        await client.register(endpoint("a"))
        with pytest.raises(TypeError, match="JSON"):
            await client.send("e", object())
        with pytest.raises(TypeError, match="event_type"):
            await client.send("", 1)
        with pytest.raises(TypeError, match="endpoint_ids"):
            await client.send("e", 1, endpoint_ids="a")
        only = await client.send("e", 3, endpoint_ids=["zz"])
        assert only.endpoint_ids == ()
        ok = await client.send("e", 2)
        await settle(5)
        assert [m for _, m, _ in sink.calls["a"]] == [ok.message_id]


async def test_metrics_text_counts_attempts_by_outcome(autojump_clock):
    async with opened(Webhooks(schedule=RetrySchedule((0,), jitter=0))) as (
        _,
        client,
        sink,
    ):
        sink.scripts["b"] = lambda n: httpx.Response(500)
        await client.register(endpoint("a"))
        await client.register(endpoint("b"))
        await client.send("e", 1)
        await settle(5)
        text = client.metrics_text()
        assert 'trio_cluster_webhook_attempts_total{outcome="success"} 1' in text
        assert 'trio_cluster_webhook_attempts_total{outcome="failure"} 1' in text
        assert "trio_cluster_webhook_dead_total 1" in text


async def test_deliveries_wait_for_the_part_to_open(autojump_clock):
    webhooks = Webhooks()
    storage = MemoryStorage()
    async with open_clocked_runner(webhooks.entities, storage=storage) as runner:
        sink = Sink(runner.clock.now)
        transport = httpx.MockTransport(sink.handler)
        async with webhooks.open(runner, storage, transport=transport) as client:
            await client.register(endpoint("a"))
        # Saved while the part is closed on the runner: retried by the
        # runtime until it is open again.
        deliveries = runner.client(webhooks.endpoint_type)("a")
        await deliveries.deliver.discard(WebhookMessage("msg_1", "e", b"{}"))  # type: ignore[attr-defined]
        await settle(3)
        assert "a" not in sink.calls
        async with webhooks.open(runner, storage, transport=transport):
            await settle(60)
        assert [m for _, m, _ in sink.calls["a"]] == ["msg_1"]
        with pytest.raises(TypeError):
            async with webhooks.open(runner, object()):  # type: ignore[arg-type]
                pass


async def test_open_twice_on_one_runner_is_refused(autojump_clock):
    webhooks = Webhooks()
    async with opened(webhooks) as (runner, _, _):
        with pytest.raises(RuntimeError, match="open"):
            async with webhooks.open(runner, MemoryStorage()):
                pass


def test_definitions_are_validated():
    with pytest.raises(tc.ConfigError):
        Webhooks(name="Bad Name")
    with pytest.raises(tc.ConfigError):
        Webhooks(concurrency=0)
    with pytest.raises(tc.ConfigError):
        WebhookEndpoint("a", "ftp://x/")
    with pytest.raises(tc.ConfigError):
        WebhookEndpoint("a b", "http://x/")
    with pytest.raises(tc.ConfigError):
        WebhookEndpoint("a", "http://x/", secret="nope")
    with pytest.raises(tc.ConfigError):
        WebhookEndpoint("a", "http://x/", timeout=0)
    assert WebhookEndpoint("a", "http://x/").secret.startswith("whsec_")


async def test_client_is_typed(autojump_clock):
    async with opened(Webhooks()) as (_, client, _):
        assert isinstance(client, WebhookClient)


async def test_endpoints_are_listed_read_and_deleted(autojump_clock):
    webhooks = Webhooks(endpoint_refresh=0)
    async with opened(webhooks) as (_, client, sink):
        sink.scripts["a"] = lambda n: httpx.Response(500)
        first = endpoint("a", event_types=["x", "y"], rate=RateLimit(5.0, 2.0))
        await client.register(first)
        await client.register(endpoint("b"))
        assert [e.id for e in await client.endpoints()] == ["a", "b"]
        assert await client.endpoint("a") == first
        assert await client.endpoint("zz") is None
        sent = await client.send("x", 1)
        await settle(1)
        assert await client.delete("a")
        assert not await client.delete("a")
        await settle(100)
        assert len(sink.calls["a"]) == 1  # the retry was not attempted
        [(_, dead)] = await client.dead_deliveries()
        assert dead.disabled
        assert "deleted" in dead.error
        assert await client.replay(sent.message_id, endpoint_id="b") == 0
        with pytest.raises(TypeError):
            await client.register("a")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "options",
    [
        {"event_types": "x"},
        {"event_types": {""}},
        {"secret": "whsec_" + "QUJD"},  # 3 bytes
        {"secret": "whsec_!!"},
        {"ordered": 1},
        {"url": "http://"},
        {"url": 5},
    ],
)
def test_invalid_endpoints_are_config_errors(options: dict[str, object]) -> None:
    fields: dict[str, object] = {"id": "a", "url": "http://x/", **options}
    with pytest.raises(tc.ConfigError):
        WebhookEndpoint(**fields)  # type: ignore[arg-type]
