"""The gateway examples (the seeds' cases) run, and do what they say.

They serve real sockets on 127.0.0.1, so they run in real time, each
bounded by ``trio.fail_after``; the parts that need no socket (the framer,
the batching) are tested in virtual time. The chat page runs in headless
Chromium in ``tests/gateway/test_chat_browser.py``.
"""

from __future__ import annotations

import logging
from typing import Any

import pytest
import trio

import trio_cluster as tc
from trio_cluster._cli._main import load_target
from trio_cluster.gateway import (
    Gateway,
    GatewayCallError,
    GatewayDisconnectedError,
    GatewayRefusedError,
    Session,
    Topic,
    open_gateway_client,
)
from trio_cluster.storage import MemoryStorage
from trio_cluster.transport import MemoryNetwork, MemoryTransport

from .helpers import config, load_example


async def test_chat_server_rooms_need_a_name_and_a_valid_room() -> None:
    example = load_example("chat_server")
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            (server,) = await nursery.start(example.serve_chat, (0,))
            async with open_gateway_client(server.url) as anonymous:
                with pytest.raises(GatewayRefusedError) as refused:
                    await anonymous.wait_connected()
                assert refused.value.status == 401
            async with (
                open_gateway_client(server.url, token="cy") as cy,
                cy.subscribe("room:general", presence=True) as room,
            ):
                assert room.presence is not None
                assert list(room.presence.values()) == [{"user": "cy"}]
                chat = cy.service(example.Chat)
                assert await chat.say(example.Say("general", " hi ")) == 1
                async for publication in room:
                    assert publication.data == {"user": "cy", "text": "hi"}
                    break
                with pytest.raises(example.RefusedError) as refused:
                    await chat.say(example.Say("Not A Room", "hi"))
                assert refused.value.reason == "no room 'Not A Room'"
                with pytest.raises(GatewayCallError) as caught:
                    async with cy.subscribe("lobby"):
                        pass
                assert caught.value.code == "not_found"
            nursery.cancel_scope.cancel()


async def test_message_bus_example(capsys: pytest.CaptureFixture[str]) -> None:
    with trio.fail_after(60):
        lines = await load_example("message_bus").main()
    assert lines == [
        "orders: sent 3 messages to billing, which is offline",
        "billing got order-placed {'order': 1}",
        "billing got order-placed {'order': 2}",
        "billing got order-placed {'order': 3}",
        "orders got invoice-sent {'order': 1}",
        "orders got invoice-sent {'order': 2}",
        "orders got invoice-sent {'order': 3}",
    ]
    assert "billing got order-placed {'order': 3}" in capsys.readouterr().out


async def test_message_bus_keeps_messages_past_the_session_window(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Offline longer than the session keeps a push: the mailbox pushes it
    again until the service is back; it still gets each message once."""
    example = load_example("message_bus")
    monkeypatch.setattr(Session, "ack_timeout", 0.2)
    monkeypatch.setattr(Session, "max_redeliveries", 1)
    pushes: list[Any] = []
    send_reliable = example.send_reliable

    async def counting(runner: Any, session: str, data: Any) -> int:
        pushes.append(data["id"])
        seq: int = await send_reliable(runner, session, data)
        return seq

    monkeypatch.setattr(example, "send_reliable", counting)
    with trio.fail_after(60):
        lines = await example.main(offline_for=1.5)
    assert lines[1:4] == [
        f"billing got order-placed {{'order': {n}}}" for n in (1, 2, 3)
    ]
    # The first message was pushed again after each 0.4 s window offline.
    assert len(pushes) >= 3 + 3
    assert pushes.count(pushes[0]) >= 3


async def test_message_bus_acks_dedup_and_refusals() -> None:
    example = load_example("message_bus")
    with trio.fail_after(60):
        async with (
            example.tc.open_runner(entities=[example.Mailbox, Session]) as runner,
            trio.open_nursery() as nursery,
        ):
            server = await nursery.start(
                example.serve_gateway, runner, example.GATEWAY, "127.0.0.1", 0
            )
            async with example.connect(server.url, "orders-secret") as orders:
                bus = orders.service(example.Bus)
                # A retried send (same id) is queued once.
                again = example.Send("m-1", "billing", "t", 1)
                await bus.send(again)
                await bus.send(again)
                for number in (2, 3):
                    await bus.send(example.Send(f"m-{number}", "billing", "t", number))
                with pytest.raises(example.UnknownServiceError) as unknown:
                    await bus.send(example.Send("m-4", "shipping", "t", 4))
                assert unknown.value.service == "shipping"
                seen: set[str] = set()
                async with example.connect(server.url, "billing-secret") as billing:
                    (first,) = await example.receive(billing, seen, 1)
                    assert (first.id, first.sender) == ("m-1", "orders")
                    # m-2 comes next (after m-1's ack); it is not taken.
                    await trio.sleep(0.5)
                # Back: what was acked is not sent again, what was not is.
                async with example.connect(server.url, "billing-secret") as billing:
                    rest = await example.receive(billing, seen, 2)
                    assert [envelope.id for envelope in rest] == ["m-2", "m-3"]
                    assert billing.pushes.duplicates == 0
                    # m-1, sent twice, was queued once: nothing more comes.
                    with trio.move_on_after(1.0):
                        async for push in billing.pushes:
                            pytest.fail(f"{push} came again")
                # Nobody else reads billing's mailbox: a wrong session is
                # refused (403), as is an unknown token (401).
                async with open_gateway_client(
                    server.url,
                    token="orders-secret",
                    session=example.session_for("billing"),
                ) as thief:
                    with pytest.raises(GatewayRefusedError) as refused:
                        await thief.wait_connected()
                    assert refused.value.status == 403
                async with open_gateway_client(server.url, token="guess") as guess:
                    with pytest.raises(GatewayRefusedError) as refused:
                        await guess.wait_connected()
                    assert refused.value.status == 401
            nursery.cancel_scope.cancel()


async def test_event_projection_example(monkeypatch: pytest.MonkeyPatch) -> None:
    example = load_example("event_projection")
    monkeypatch.setattr(example.Directory, "batch_window", 0.3)
    with trio.fail_after(60):
        batches, emails = await example.main()
    assert batches == [
        {
            "count": 4,
            "kinds": ["email-updated", "registered"],
            "changes": [
                {"kind": "registered", "user": "ada", "email": "ada@acme.test"},
                {"kind": "registered", "user": "bob", "email": "bob@acme.test"},
                {"kind": "registered", "user": "cy", "email": "cy@acme.test"},
                {"kind": "email-updated", "user": "bob", "email": "bob@acme.example"},
            ],
        }
    ]
    assert emails == {
        "ada": "ada@acme.test",
        "bob": "bob@acme.example",
        "cy": "cy@acme.test",
    }


async def test_event_projection_batches_by_size_and_time(
    autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Virtual time: a full batch (100 changes) is published at once, the
    rest ``batch_window`` (5 s) after its first change; one organisation's
    changes never go to another's topic."""
    example = load_example("event_projection")
    published: list[tuple[str, int, float]] = []

    async def record(runner: Any, topic: str, data: Any) -> None:
        await trio.lowlevel.checkpoint()
        published.append((topic, data["count"], trio.current_time()))
        assert all(change["user"].startswith(topic[10:]) for change in data["changes"])

    monkeypatch.setattr(example, "publish", record)
    async with example.tc.open_runner(
        entities=[example.Directory], singletons=example.DIRECTORY.consumers
    ) as runner:
        bus = example.event_bus(runner)
        start = trio.current_time()
        for n in range(250):
            event = example.UserEvent("registered", "acme", f"acme-{n}", "x@acme")
            await bus.publish(example.USERS, event, key="acme")
        event = example.UserEvent("registered", "globex", "globex-1", "x@globex")
        await bus.publish(example.USERS, event, key="globex")
        with trio.fail_after(60):
            while sum(count for _, count, _ in published) < 251:  # noqa: ASYNC110
                await trio.sleep(0.1)
    by_topic = sorted((topic, count) for topic, count, _ in published)
    assert by_topic == [
        ("directory:acme", 50),
        ("directory:acme", 100),
        ("directory:acme", 100),
        ("directory:globex", 1),
    ]
    for _, count, at in published:
        if count == 100:
            assert at - start < 1.0
        else:
            assert 5.0 <= at - start < 6.0


async def test_rate_limited_server_example(capsys: pytest.CaptureFixture[str]) -> None:
    with trio.fail_after(60):
        lines = await load_example("rate_limited_server").main()
    assert lines == [
        "connection 11: refused, HTTP 429, retry after 300 s",
        "10 clients connected",
        "the flooder's socket was closed: 4008 (message rate limit exceeded)",
        "the others carry on: hello",
        "the flooder is refused: HTTP 429, retry after 300 s",
    ]
    assert "HTTP 429" in capsys.readouterr().out


@pytest.fixture
def wall_speed_clock() -> trio.testing.MockClock:
    """Virtual time that runs at the wall clock's speed (real sockets work)
    and can be jumped ahead: the 5-minute block takes no 5 minutes."""
    return trio.testing.MockClock(rate=1.0)


async def test_rate_limited_server_blocks_for_five_minutes(
    wall_speed_clock: trio.testing.MockClock,
) -> None:
    example = load_example("rate_limited_server")

    async def connect(url: str) -> float | None:
        """None if the connection is accepted, else its Retry-After."""
        async with open_gateway_client(url, config=example.ONCE) as client:
            try:
                await client.wait_connected()
            except GatewayRefusedError as exc:
                refused = exc
            else:
                assert await client.service(example.Echo).say("hi") == "hi"
                return None
        assert refused.status == 429
        return refused.retry_after

    # Leases longer than the jumps: the runner keeps its shards.
    config = example.tc.ShardingConfig(lease_duration=3600.0)
    with trio.fail_after(60 + 301):  # virtual time: 60 s of wall time
        async with (
            example.tc.open_runner(config=config) as runner,
            trio.open_nursery() as nursery,
        ):
            server = await nursery.start(
                example.serve_gateway, runner, example.GATEWAY, "127.0.0.1", 0
            )
            assert [await connect(server.url) for _ in range(10)] == [None] * 10
            assert await connect(server.url) == 300.0  # the 11th: blocked
            wall_speed_clock.jump(240.0)
            # Refused attempts during the block do not make it longer.
            assert 55.0 <= (await connect(server.url) or 0) <= 60.0
            wall_speed_clock.jump(61.0)
            assert await connect(server.url) is None
            assert server.statistics().refused_rate_limited == 2
            nursery.cancel_scope.cancel()


async def test_resilient_client_example(capsys: pytest.CaptureFixture[str]) -> None:
    """The gateway is killed under the client and started again: the client
    reconnects, resumes its topic and retries its adds (each counts once)."""
    with trio.fail_after(60):
        lines = await load_example("resilient_client").main()
    assert lines == [
        "gateway killed: connected=False, reconnects=0",
        "gateway back: connected=True, reconnects=1",
        "ticks: each once, in order: True",
        "resumed without loss: True",
        "20 adds, total: 20",
    ]
    assert "last error: " in capsys.readouterr().out


async def test_resilient_client_retries_only_dropped_calls(
    autojump_clock: trio.testing.MockClock,
) -> None:
    example = load_example("resilient_client")
    outcomes: list[Exception | str] = []

    async def call() -> str:
        await trio.lowlevel.checkpoint()
        outcome = outcomes.pop(0)
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    dropped = GatewayDisconnectedError(code=1006, reason="connection lost")
    outcomes += [dropped, dropped, "done"]
    assert await example.retry_dropped(call) == "done"
    outcomes += [dropped, dropped, dropped, "never"]
    with pytest.raises(GatewayDisconnectedError):
        await example.retry_dropped(call)
    outcomes[:] = [GatewayCallError(code="forbidden", message="no"), "never"]
    with pytest.raises(GatewayCallError):  # not a dropped socket: not retried
        await example.retry_dropped(call)
    assert outcomes == ["never"]


async def test_health_checker_example(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="examples.health_checker")
    with trio.fail_after(60):
        lines = await load_example("health_checker").main(interval=0.2)
    assert lines == [
        "api up (0 failures), cache DOWN",
        "api DOWN (1 failures), cache DOWN",
        "the board: [('api', False), ('cache', False)]",
    ]
    changes = [record.getMessage() for record in caplog.records]
    assert changes.count("api: HEALTHY") == 1
    assert changes.count("api: UNHEALTHY") == 1
    assert changes.count("cache: UNHEALTHY") == 1


async def test_health_checker_moves_with_its_singleton(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Virtual time, two runners: the runner running the checker is killed;
    the other runs it within the failover time, counting on from the
    board's statuses."""
    example = load_example("health_checker")
    dead = example.Endpoint("cache", "127.0.0.1", 9, timeout=0.5)  # discard port
    checker = example.health_checker([dead], interval=1.0)
    storage, network = MemoryStorage(), MemoryNetwork()
    options = {
        "entities": [example.HealthBoard, Topic],
        "singletons": [checker],
        "storage": storage,
    }
    runners: list[tc.Runner] = []
    scopes: list[trio.CancelScope] = []

    async def serve(port: int, *, task_status: trio.TaskStatus[None]) -> None:
        with trio.CancelScope() as scope:
            scopes.append(scope)
            async with tc.open_runner(
                config=config(
                    lease_duration=2.0,
                    lease_refresh_interval=0.5,
                    runner_address=tc.RunnerAddress("127.0.0.1", port),
                ),
                transport=MemoryTransport(network),
                **options,  # type: ignore[arg-type]
            ) as runner:
                runners.append(runner)
                await runner.wait_shards_acquired()
                task_status.started()
                await trio.sleep_forever()

    async def failures(runner: tc.Runner) -> int:
        (status,) = await runner.client(example.HealthBoard)("board").current(None)
        assert status.healthy is False
        return int(status.consecutive_failures)

    async with trio.open_nursery() as nursery:
        await nursery.start(serve, 7201)
        await nursery.start(serve, 7202)
        for runner in runners:
            await runner.wait_shards_acquired()
        shard = checker.shard(8)
        while not any(shard in r.served_shards() for r in runners):  # noqa: ASYNC110
            await trio.sleep(0.1)
        victim = 0 if shard in runners[0].served_shards() else 1
        survivor = runners[1 - victim]
        await trio.sleep(5)
        before = await failures(survivor)
        assert before >= 3
        network.kill(runners[victim].address)
        storage.kill_session(str(runners[victim].address))
        scopes[victim].cancel()
        killed = trio.current_time()
        while shard not in survivor.served_shards():  # noqa: ASYNC110
            await trio.sleep(0.1)
        assert trio.current_time() - killed < 5.0
        # The board lives on the survivor (the shards fall so with these
        # addresses): the checker goes on from its last statuses, where a
        # fresh start would count from 1 again.
        board = survivor.client(example.HealthBoard)("board")
        assert survivor.owner_of(board) == survivor.address
        await trio.sleep(3)
        assert await failures(survivor) > before
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize(
    "name",
    [
        "chat_server",
        "message_bus",
        "event_projection",
        "rate_limited_server",
        "resilient_client",
        "health_checker",
    ],
)
def test_the_examples_apps_load_for_trio_cluster_run(name: str) -> None:
    """What ``trio-cluster run examples.<name>:APP --gateway ...`` loads."""
    options = load_target(f"examples.{name}:APP")
    assert isinstance(options.pop("gateway"), Gateway)
    assert set(options) <= {"entities", "singletons"}
