"""Presence over real sockets: join/leave diffs to the topic's subscribers,
the list operation, and two runners: the entries of a runner that is
killed, closed or cut off disappear from the other's clients and from the
topics within the failover time."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

import pytest
import trio

import trio_cluster as tc
from trio_cluster.gateway import (
    JSON,
    MSGPACK,
    ClientConfig,
    ClientInfo,
    Gateway,
    GatewayCallError,
    GatewayClient,
    GatewayServer,
    Handshake,
    Operation,
    Topic,
    open_gateway_client,
    presence,
    serve_gateway,
)
from trio_cluster.gateway._subscriptions import Subscription
from trio_cluster.storage import MemoryStorage
from trio_cluster.transport import MemoryNetwork, MemoryTransport

from ..helpers import config
from .app import decode, exchange, open_raw

LEASE = 2.0
DRAIN = 20.0
"""Longer than the test's bound: a graceful stop ends its topics' follow
streams at once, not after this."""


async def by_name(handshake: Handshake) -> object:
    return handshake.headers.get("x-name", "anonymous")


def entry(client: ClientInfo, topic: str) -> object:
    """Rooms track their sockets by user name; "lobby:" topics nobody."""
    return {"user": client.principal} if topic.startswith("room:") else None


async def only_rooms(principal: object, operation: Operation) -> bool:
    await trio.lowlevel.checkpoint()
    return not (operation.kind == "presence" and operation.name == "room:secret")


GATEWAY = Gateway(
    topics=lambda name: name.startswith(("room:", "lobby:")),
    authenticate=by_name,
    authorize=only_rooms,
    presence=entry,
)


def users(entries: dict[str, Any]) -> list[object]:
    return sorted(value["user"] for value in entries.values())


async def until_users(subscription: Subscription, expected: list[str]) -> None:
    assert subscription.presence is not None
    while users(subscription.presence) != expected:
        await subscription.presence_changed()


@asynccontextmanager
async def open_client(
    url: str, name: str, subprotocol: str = MSGPACK
) -> AsyncIterator[GatewayClient]:
    async with open_gateway_client(
        url,
        config=ClientConfig(subprotocol=subprotocol),
        headers=[("X-Name", name)],
    ) as client:
        yield client


@pytest.mark.parametrize("subprotocol", [JSON, MSGPACK])
async def test_joins_and_leaves_reach_the_subscribers(subprotocol: str) -> None:
    with trio.fail_after(30):
        async with (
            tc.open_runner(entities=[Topic]) as runner,
            trio.open_nursery() as nursery,
        ):
            server: GatewayServer = await nursery.start(
                serve_gateway, runner, GATEWAY, "127.0.0.1", 0
            )
            async with (
                open_client(server.url, "ada", subprotocol) as ada,
                ada.subscribe("room:1", presence=True) as ada_room,
            ):
                assert ada_room.presence is not None
                assert users(ada_room.presence) == ["ada"]
                async with (
                    open_client(server.url, "bob", subprotocol) as bob,
                    bob.subscribe("room:1", presence=True) as bob_room,
                ):
                    assert bob_room.presence is not None
                    assert users(bob_room.presence) == ["ada", "bob"]
                    await until_users(ada_room, ["ada", "bob"])
                    assert users(await ada.presence("room:1")) == ["ada", "bob"]
                    assert users(await presence(runner, "room:1")) == ["ada", "bob"]
                    # A topic the hook leaves out of presence: nobody in it.
                    async with bob.subscribe("lobby:1", presence=True) as lobby:
                        assert lobby.presence == {}
                    with pytest.raises(GatewayCallError) as caught:
                        await bob.presence("room:secret")
                    assert caught.value.code == "forbidden"
                    with pytest.raises(GatewayCallError) as caught:
                        await bob.presence("secret:1")
                    assert caught.value.code == "not_found"
                await until_users(ada_room, ["ada"])  # bob's socket closed
                assert users(await presence(runner, "room:1")) == ["ada"]
            nursery.cancel_scope.cancel()


async def test_the_protocol_of_presence() -> None:
    """The frames: a subscribe answer with the presence, diffs after it,
    the list, an unsubscribe that leaves."""
    with trio.fail_after(30):
        async with (
            tc.open_runner(entities=[Topic]) as runner,
            trio.open_nursery() as nursery,
        ):
            server: GatewayServer = await nursery.start(
                serve_gateway, runner, GATEWAY, "127.0.0.1", 0
            )
            async with open_raw(server.url) as watcher, open_raw(server.url) as joiner:
                frame = {"t": "subscribe", "id": 1, "topic": "room:9", "presence": True}
                answer = await exchange(watcher, frame)
                (watcher_id,) = answer["v"]["presence"]
                assert answer["v"]["presence"] == {watcher_id: {"user": "anonymous"}}
                await exchange(joiner, {"t": "subscribe", "id": 1, "topic": "room:9"})
                listed = await exchange(
                    joiner, {"t": "presence", "id": 2, "topic": "room:9"}
                )
                assert len(listed["v"]) == 2
                (joiner_id,) = set(listed["v"]) - {watcher_id}
                diff = decode(await watcher.get_message())
                assert diff == {
                    "t": "presence",
                    "topic": "room:9",
                    "joins": {joiner_id: {"user": "anonymous"}},
                    "leaves": {},
                }
                unsubscribed = await exchange(
                    joiner, {"t": "unsubscribe", "id": 3, "topic": "room:9"}
                )
                assert unsubscribed["v"] is True
                diff = decode(await watcher.get_message())
                assert diff["leaves"] == {joiner_id: {"user": "anonymous"}}
                bad = await exchange(
                    joiner,
                    {"t": "subscribe", "id": 4, "topic": "room:9", "presence": 1},
                )
                assert bad["code"] == "bad_frame"
            nursery.cancel_scope.cancel()


@pytest.mark.parametrize("how", ["killed", "closed", "cut"])
async def test_the_entries_of_a_lost_runner_disappear(how: str) -> None:
    storage, network = MemoryStorage(), MemoryNetwork()

    async def serve(
        port: int, *, task_status: trio.TaskStatus[tuple[tc.Runner, GatewayServer]]
    ) -> None:
        async with (
            tc.open_runner(
                entities=[Topic],
                config=config(
                    lease_duration=LEASE,
                    lease_refresh_interval=0.4,
                    entity_termination_timeout=DRAIN,
                    runner_address=tc.RunnerAddress("127.0.0.1", port),
                ),
                storage=storage,
                transport=MemoryTransport(network),
            ) as runner,
            trio.open_nursery() as nursery,
        ):
            server = await nursery.start(serve_gateway, runner, GATEWAY, "127.0.0.1", 0)
            task_status.started((runner, server))
            await trio.sleep_forever()

    with trio.fail_after(60):
        async with AsyncExitStack() as stack:
            nursery = await stack.enter_async_context(trio.open_nursery())
            stack.callback(nursery.cancel_scope.cancel)
            a, server_a = await nursery.start(serve, 7101)
            b_scope = trio.CancelScope()

            async def serve_b(*, task_status: trio.TaskStatus[Any]) -> None:
                with b_scope:
                    await serve(7102, task_status=task_status)

            b, server_b = await nursery.start(serve_b)
            await a.wait_shards_acquired()
            await b.wait_shards_acquired()
            topics = [f"room:{n}" for n in range(6)]  # some owned by each
            assert {a.owner_of(a.client(Topic)(t)) for t in topics} == {
                a.address,
                b.address,
            }
            ada = await stack.enter_async_context(open_client(server_a.url, "ada"))
            bob = await stack.enter_async_context(open_client(server_b.url, "bob"))
            rooms = []
            for topic in topics:
                rooms.append(
                    await stack.enter_async_context(ada.subscribe(topic, presence=True))
                )
                await stack.enter_async_context(bob.subscribe(topic, presence=True))
            for room in rooms:
                await until_users(room, ["ada", "bob"])
            started = trio.current_time()
            if how == "killed":  # as a SIGKILL: connections and lock session gone
                network.kill(b.address)
                storage.kill_session(str(b.address))
                b_scope.cancel()
            elif how == "cut":  # b runs on, unreachable
                network.partition(a.address, b.address)
            else:
                b_scope.cancel()
            for room in rooms:
                await until_users(room, ["ada"])
            for topic in topics:  # the topics' own tables, on a
                if how == "cut" and a.owner_of(a.client(Topic)(topic)) != a.address:
                    continue  # unreachable from a
                while users(await presence(a, topic)) != ["ada"]:  # noqa: ASYNC110
                    await trio.sleep(0.05)
            elapsed = trio.current_time() - started
            for room in rooms:
                assert room.presence is not None
                assert users(room.presence) == ["ada"]
            # Within the failover time (generous: a loaded machine), for a
            # runner that closes gracefully too: it ends the follow streams
            # of the topics it hosts at once, not after its drain timeout.
            bound = LEASE + 3.0
            assert elapsed < bound, elapsed
            b_scope.cancel()
