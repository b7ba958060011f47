"""Pushes addressed to users (`send_to_users`), on two runners over memory
links and virtual time: every session of a user gets the push once,
wherever its socket is; a closed socket leaves its user's directory; a
session of another user refuses a push for this one; clients cannot reach
the directories."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

import pytest
import trio
import trio.testing

import trio_cluster as tc
from trio_cluster.gateway import (
    ClientConfig,
    Gateway,
    GatewayCallError,
    GatewayClient,
    GatewayConfig,
    Handshake,
    PushFailedError,
    Session,
    SessionTakenError,
    Topic,
    open_gateway_client,
    presence,
    send_to_users,
)
from trio_cluster.gateway._sessions import Attach, Push
from trio_cluster.gateway._users import user_topic
from trio_cluster.storage import MemoryStorage
from trio_cluster.testing import MemoryGateways
from trio_cluster.transport import MemoryNetwork, MemoryTransport

from ..helpers import config


async def by_name(handshake: Handshake) -> object:
    await trio.lowlevel.checkpoint()
    return handshake.headers.get("x-name", "anonymous")


GATEWAY = Gateway(
    sessions=True,
    authenticate=by_name,
    user=str,
    topics=lambda name: True,  # every name, but the directories
    config=GatewayConfig(connect_rate=None),
)
CLIENT = ClientConfig(reconnect=tc.Backoff(0.1, 1.0))


@asynccontextmanager
async def open_two_runners() -> AsyncIterator[tuple[MemoryGateways, list[tc.Runner]]]:
    storage, network = MemoryStorage(), MemoryNetwork()
    gateways = MemoryGateways()

    async def serve(port: int, *, task_status: trio.TaskStatus[tc.Runner]) -> None:
        async with (
            tc.open_runner(
                entities=[Topic, Session],
                config=config(runner_address=tc.RunnerAddress("127.0.0.1", port)),
                storage=storage,
                transport=MemoryTransport(network),
            ) as runner,
            trio.open_nursery() as nursery,
        ):
            await nursery.start(gateways.serve, f"g{port}", runner, GATEWAY)
            task_status.started(runner)

    async with trio.open_nursery() as nursery:
        runners = [await nursery.start(serve, port) for port in (1, 2)]
        for runner in runners:
            await runner.wait_shards_acquired()
        yield gateways, runners
        nursery.cancel_scope.cancel()


class Inbox:
    """A client's pushes, taken (and so acked) as they come."""

    def __init__(self, client: GatewayClient) -> None:
        self.client = client
        self.got: list[Any] = []

    async def take(self) -> None:
        async for push in self.client.pushes:
            self.got.append(push.data)


async def connect(
    stack: AsyncExitStack,
    nursery: trio.Nursery,
    gateways: MemoryGateways,
    gateway: str,
    user: str,
) -> Inbox:
    client = await stack.enter_async_context(
        open_gateway_client(
            f"ws://{gateway}/ws",
            config=CLIENT,
            headers=[("x-name", user)],
            connect=gateways.connector(user),
        )
    )
    await client.wait_connected()
    inbox = Inbox(client)
    nursery.start_soon(inbox.take)
    return inbox


async def sessions_of(runner: tc.Runner, user: str, count: int) -> None:
    """Wait until ``user``'s directory lists ``count`` sessions."""
    while len(await presence(runner, user_topic(user))) != count:  # noqa: ASYNC110
        await trio.sleep(0.05)


async def test_a_push_reaches_every_session_of_a_user_once(
    autojump_clock: trio.testing.MockClock,
) -> None:
    with trio.fail_after(60):
        async with (
            open_two_runners() as (gateways, (a, b)),
            AsyncExitStack() as stack,
            trio.open_nursery() as nursery,
        ):
            phone = await connect(stack, nursery, gateways, "g1", "ada")
            laptop = await connect(stack, nursery, gateways, "g2", "ada")
            other = await connect(stack, nursery, gateways, "g1", "bob")
            await sessions_of(a, "ada", 2)
            await sessions_of(a, "bob", 1)

            result = await send_to_users(b, ["ada", "ada", "nobody"], {"n": 1})
            assert sorted(result.sessions) == ["ada", "nobody"]
            assert len(result.sessions["ada"]) == 2
            assert result.sessions["nobody"] == []
            assert sorted(result.acked) == result.sessions["ada"]
            assert result.failed == {}
            assert phone.got == laptop.got == [{"n": 1}]
            assert other.got == []

            result = await send_to_users(a, ["ada", "bob"], "both")
            assert len(result.acked) == 3
            assert phone.got == laptop.got == [{"n": 1}, "both"]
            assert other.got == ["both"]

            # A socket that closes leaves its user's directory.
            await stack.aclose()
            await sessions_of(b, "ada", 0)
            result = await send_to_users(a, ["ada"], "gone")
            assert result.sessions == {"ada": []}
            assert result.acked == {}
            nursery.cancel_scope.cancel()


async def test_a_push_not_acked_is_reported_failed(
    autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(Session, "ack_timeout", 0.5)
    monkeypatch.setattr(Session, "max_redeliveries", 1)
    with trio.fail_after(60):
        async with (
            open_two_runners() as (gateways, (a, _)),
            open_gateway_client(
                "ws://g2/ws",
                config=CLIENT,
                headers=[("x-name", "ada")],
                connect=gateways.connector("ada"),
            ) as client,
        ):
            await client.wait_connected()
            await sessions_of(a, "ada", 1)
            result = await send_to_users(a, ["ada"], "never taken")
            assert result.acked == {}
            (error,) = result.failed.values()
            assert isinstance(error, PushFailedError)
            assert error.attempts == 2


async def test_a_session_of_another_user_refuses_a_push_for_this_one(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with tc.open_runner(entities=[Session]) as runner:
        session = runner.client(Session)("s" * 20)
        async with session.attach(Attach("bob")):
            # The stream's handler binds the session when it runs: let it.
            await trio.testing.wait_all_tasks_blocked()
            with pytest.raises(SessionTakenError):
                await session.push(Push("for ada", "ada"))
            fresh = runner.client(Session)("t" * 20)
            with trio.move_on_after(1):  # bound to ada now; not acked
                await fresh.push(Push("for ada", "ada"))
            with pytest.raises(SessionTakenError):
                async with fresh.attach(Attach("bob")) as taken:
                    await anext(aiter(taken))


async def test_clients_cannot_reach_the_directories(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with (
        open_two_runners() as (gateways, _),
        open_gateway_client(
            "ws://g1/ws", config=CLIENT, connect=gateways.connector("eve")
        ) as client,
    ):
        for attempt in (
            client.presence("trio_cluster.user:ada"),
            client.call("nothing.here", None),
        ):
            with pytest.raises(GatewayCallError) as caught:
                await attempt
            assert caught.value.code == "not_found"
        with pytest.raises(GatewayCallError) as caught:
            async with client.subscribe("trio_cluster.user:ada"):
                pass
        assert caught.value.code == "not_found"
