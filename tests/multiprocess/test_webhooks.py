"""Webhook retries fire on schedule across a failover: real runner
processes on PostgreSQL deliver to a real HTTP receiver (loopback, in the
test process); the runner holding the endpoint is killed with SIGKILL
between two retries, and the survivor fires the next retries on time."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime

import pytest
import trio

from benchmarks.http_sink import serve_http
from trio_cluster.storage import PostgresStorage
from trio_cluster.webhooks import WebhookEndpoint, verify_webhook

from .entities import WEBHOOKS
from .helpers import FAST_LEASES, MultiCluster, http_get, log

pytestmark = [pytest.mark.postgres, pytest.mark.multiprocess, pytest.mark.slow]

TARGET = "tests.multiprocess.entities:WEBHOOK_TARGET"
SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
DELAY = 3.0
"""The compressed schedule's delay between attempts (entities.WEBHOOKS)."""
LATE = 1.5
"""How late an attempt may be (generous: a loaded machine, a failover)."""


async def test_webhook_retries_fire_on_schedule_across_a_failover(
    cluster: MultiCluster,
) -> None:
    arrivals: list[tuple[float, str]] = []

    async def respond(path: str, headers: dict[str, str], body: bytes) -> int:
        message_id = verify_webhook(headers, body, SECRET)
        arrivals.append((datetime.now(UTC).timestamp(), message_id))
        return 503 if len(arrivals) < 4 else 200

    runners = [
        await cluster.spawn(name, env=FAST_LEASES, target=TARGET, metrics=True)
        for name in ("a", "b")
    ]
    for runner in runners:
        await runner.wait_ready()
    async with trio.open_nursery() as nursery:
        port = await nursery.start(serve_http, respond)
        storage = PostgresStorage(cluster.dsn, table_prefix=cluster.prefix)
        async with cluster.client() as client, WEBHOOKS.open(client, storage) as hooks:
            await hooks.register(
                WebhookEndpoint("ep", f"http://127.0.0.1:{port}/hook", SECRET)
            )
            sent = await hooks.send("order.paid", {"order": 1})
            # Wait until the first attempt is recorded with its retry due.
            with trio.fail_after(30):
                while True:
                    attempts = await hooks.attempts(message_id=sent.message_id)
                    if attempts:
                        break
                    await trio.sleep(0.05)
            [first] = attempts
            assert first.next_at is not None
            holder = client.owner_of(
                client.client(WEBHOOKS.endpoint_type).address_of("ep")
            )
            victim = next(r for r in runners if r.address == str(holder))
            survivor = next(r for r in runners if r is not victim)
            victim.kill()  # SIGKILL, between attempt 1 and its retry
            with trio.fail_after(60):
                while True:
                    attempts = await hooks.attempts(message_id=sent.message_id)
                    if attempts and attempts[-1].outcome == "success":
                        break
                    await trio.sleep(0.1)
        nursery.cancel_scope.cancel()
    assert [a.attempt for a in attempts] == [1, 2, 3, 4]
    assert [a.outcome for a in attempts] == ["failure"] * 3 + ["success"]
    assert [m for _, m in arrivals] == [sent.message_id] * 4
    lateness = []
    for before, after in itertools.pairwise(attempts):
        assert before.next_at is not None
        assert before.next_at == pytest.approx(
            before.at + before.latency + DELAY, abs=0.5
        )
        late = after.at - before.next_at
        lateness.append(late)
        assert -0.05 <= late <= LATE, (before, after)
    log.info(
        "webhook retries across a failover: lateness %s s",
        [round(x, 3) for x in lateness],
    )
    assert survivor.process is not None
    assert survivor.process.returncode is None
    # `trio-cluster run --metrics` serves the part's counters too: the
    # survivor made attempts 2 to 4.
    assert survivor.metrics_port is not None
    status, body = await http_get(survivor.metrics_port, "/metrics")
    assert status == 200
    assert 'trio_cluster_webhook_attempts_total{outcome="success"} 1' in body
    assert 'trio_cluster_webhook_attempts_total{outcome="failure"} 2' in body


async def test_an_ordered_delivery_resumes_its_schedule_across_a_failover(
    cluster: MultiCluster,
) -> None:
    arrivals: list[tuple[float, str]] = []

    async def respond(path: str, headers: dict[str, str], body: bytes) -> int:
        message_id = verify_webhook(headers, body, SECRET)
        arrivals.append((datetime.now(UTC).timestamp(), message_id))
        return 503 if len(arrivals) < 4 else 200

    runners = [
        await cluster.spawn(name, env=FAST_LEASES, target=TARGET) for name in ("a", "b")
    ]
    for runner in runners:
        await runner.wait_ready()
    async with trio.open_nursery() as nursery:
        port = await nursery.start(serve_http, respond)
        storage = PostgresStorage(cluster.dsn, table_prefix=cluster.prefix)
        async with cluster.client() as client, WEBHOOKS.open(client, storage) as hooks:
            await hooks.register(
                WebhookEndpoint(
                    "ord", f"http://127.0.0.1:{port}/hook", SECRET, ordered=True
                )
            )
            first = await hooks.send("order.paid", {"order": 1})
            second = await hooks.send("order.paid", {"order": 2})
            with trio.fail_after(30):
                while True:
                    if await hooks.attempts(message_id=first.message_id):
                        break
                    await trio.sleep(0.05)
            holder = client.owner_of(
                client.client(WEBHOOKS.ordered_type).address_of("ord")
            )
            victim = next(r for r in runners if r.address == str(holder))
            survivor = next(r for r in runners if r is not victim)
            victim.kill()  # SIGKILL, while the first delivery waits in its handler
            with trio.fail_after(60):
                while True:
                    done = await hooks.attempts(message_id=second.message_id)
                    if done and done[-1].outcome == "success":
                        break
                    await trio.sleep(0.1)
            attempts = await hooks.attempts(message_id=first.message_id)
        nursery.cancel_scope.cancel()
    # The survivor continued the first delivery's schedule (attempt numbers
    # and due times), and the second went only after it succeeded.
    assert [(a.attempt, a.outcome) for a in attempts] == [
        (1, "failure"),
        (2, "failure"),
        (3, "failure"),
        (4, "success"),
    ]
    assert [m for _, m in arrivals] == [first.message_id] * 4 + [second.message_id]
    lateness = []
    for before, after in itertools.pairwise(attempts):
        assert before.next_at is not None
        late = after.at - before.next_at
        lateness.append(late)
        assert -0.05 <= late <= LATE, (before, after)
    log.info(
        "ordered webhook retries across a failover: lateness %s s",
        [round(x, 3) for x in lateness],
    )
    assert survivor.process is not None
    assert survivor.process.returncode is None
