"""Topics over real sockets: publications in offset order, each once;
resume after a dropped socket loses and duplicates nothing; a position out
of the history says ``recovered: false``; two runners: subscribers on one,
the publisher on the other."""

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
    CloseCode,
    Gateway,
    GatewayCallError,
    GatewayServer,
    Publication,
    Topic,
    open_gateway_client,
    publish,
    serve_gateway,
)
from trio_cluster.gateway._subscriptions import Subscription
from trio_cluster.gateway._topics import (
    MAX_RUN,
    Followed,
    _with_run,
    new_epoch,
    older,
)
from trio_cluster.storage import MemoryStorage
from trio_cluster.transport import MemoryNetwork, MemoryTransport

from ..helpers import config
from .app import decode, encode, exchange, open_raw

ROOMS = Gateway(topics=lambda name: name.startswith("room:"))


@asynccontextmanager
async def open_topic_gateway(
    gateway: Gateway = ROOMS,
) -> AsyncIterator[tuple[tc.Runner, GatewayServer]]:
    async with (
        tc.open_runner(entities=[Topic]) as runner,
        trio.open_nursery() as nursery,
    ):
        server: GatewayServer = await nursery.start(
            serve_gateway, runner, gateway, "127.0.0.1", 0
        )
        yield runner, server
        nursery.cancel_scope.cancel()


async def take(items: AsyncIterator[Publication], n: int) -> list[Any]:
    """The next ``n`` publications' (offset, data)."""
    got = []
    async for item in items:
        got.append((item.offset, item.data))
        if len(got) == n:
            break
    return got


@pytest.mark.parametrize("subprotocol", [JSON, MSGPACK])
async def test_subscribers_get_every_publication_in_order(subprotocol: str) -> None:
    with trio.fail_after(30):
        async with (
            open_topic_gateway() as (runner, server),
            open_gateway_client(
                server.url, config=ClientConfig(subprotocol=subprotocol)
            ) as client,
            client.subscribe("room:1") as room,
        ):
            iterator = aiter(room)
            for n in range(3):
                await publish(runner, "room:1", {"n": n})
            assert await take(iterator, 3) == [
                (1, {"n": 0}),
                (2, {"n": 1}),
                (3, {"n": 2}),
            ]
            with pytest.raises(GatewayCallError) as caught:
                async with client.subscribe("secret:1"):
                    pass
            assert caught.value.code == "not_found"


async def test_a_dropped_socket_resumes_without_loss_or_duplicates() -> None:
    with trio.fail_after(30):
        async with (
            open_topic_gateway() as (runner, server),
            open_gateway_client(server.url) as client,
            client.subscribe("room:2") as room,
        ):
            iterator = aiter(room)
            for n in range(2):
                await publish(runner, "room:2", n)
            assert [data for _, data in await take(iterator, 2)] == [0, 1]
            for connection in server.connections():
                connection.end(CloseCode.GOING_AWAY, "maintenance")
            for n in range(2, 5):  # published while the client reconnects
                await publish(runner, "room:2", n)
            await publish(runner, "room:2", 5)
            got = await take(iterator, 4)
            assert got == [(3, 2), (4, 3), (5, 4), (6, 5)]
            assert client.state.reconnect_count == 1
            while room.recovered is None:  # noqa: ASYNC110 - the answer follows the replay
                await trio.sleep(0.01)
            assert room.recovered is True


async def test_a_position_out_of_the_history_is_not_recovered(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(Topic, "history_size", 2)
    with trio.fail_after(30):
        async with (
            open_topic_gateway() as (runner, server),
            open_raw(server.url) as ws,
        ):
            first = await exchange(ws, {"t": "subscribe", "id": 1, "topic": "room:3"})
            epoch = first["v"]["epoch"]
            assert first["v"] == {"epoch": epoch, "offset": 0, "recovered": False}
            for n in range(5):
                await publish(runner, "room:3", n)
            async with open_raw(server.url) as again:
                since = {"epoch": epoch, "offset": 1}
                answer = await exchange(
                    again,
                    {"t": "subscribe", "id": 1, "topic": "room:3", "since": since},
                )
                assert answer["v"] == {"epoch": epoch, "offset": 5, "recovered": False}
                since = {"epoch": epoch, "offset": 3}
                answer = await exchange(
                    again,
                    {"t": "subscribe", "id": 2, "topic": "room:3", "since": since},
                )
                # Recovered: the two it missed, then the answer.
                assert answer == {
                    "t": "pub",
                    "topic": "room:3",
                    "epoch": epoch,
                    "offset": 4,
                    "data": 3,
                }
            await ws.send_message(
                encode({"t": "unsubscribe", "id": 9, "topic": "room:3"})
            )
            while (frame := decode(await ws.get_message()))["t"] == "pub":
                pass  # the five publications it was sent meanwhile
            assert frame == {"t": "reply", "id": 9, "v": True}


async def test_subscribers_on_one_runner_the_publisher_on_another() -> None:
    storage, network = MemoryStorage(), MemoryNetwork()

    async def serve(port: int, *, task_status: trio.TaskStatus[tc.Runner]) -> None:
        async with tc.open_runner(
            entities=[Topic],
            config=config(runner_address=tc.RunnerAddress("127.0.0.1", port)),
            storage=storage,
            transport=MemoryTransport(network),
        ) as runner:
            task_status.started(runner)
            await trio.sleep_forever()

    with trio.fail_after(60):
        async with AsyncExitStack() as stack:
            nursery = await stack.enter_async_context(trio.open_nursery())
            stack.callback(nursery.cancel_scope.cancel)
            a: tc.Runner = await nursery.start(serve, 7001)
            b: tc.Runner = await nursery.start(serve, 7002)
            await a.wait_shards_acquired()
            await b.wait_shards_acquired()
            server: GatewayServer = await nursery.start(
                serve_gateway, a, ROOMS, "127.0.0.1", 0
            )
            topics = [f"room:{n}" for n in range(6)]  # some live on b
            clients = [
                await stack.enter_async_context(open_gateway_client(server.url))
                for _ in range(3)
            ]
            subscriptions = [
                await stack.enter_async_context(client.subscribe(topic))
                for client in clients
                for topic in topics
            ]
            for topic in topics:
                for n in range(3):
                    await publish(b, topic, n)
            for subscription in subscriptions:
                assert [data for _, data in await take(aiter(subscription), 3)] == [
                    0,
                    1,
                    2,
                ]
            # One entity stream per topic on this gateway, for its 3 sockets:
            # each publication reached it once.
            assert server.statistics().publications == 18
            hub = server._topics.hub  # type: ignore[union-attr]
            assert sorted(hub._followers) == topics
            assert all(len(f.subscribers) == 3 for f in hub._followers.values())
            assert {a.owner_of(a.client(Topic)(t)) for t in topics} == {
                a.address,
                b.address,
            }


def test_waiting_publications_travel_together_in_order() -> None:
    send, receive = trio.open_memory_channel[Followed](1000)
    publications = [Publication("e", n, n) for n in range(1, MAX_RUN + 3)]
    for publication in publications[: MAX_RUN + 1]:
        send.send_nowait(Followed(publication))
    presence = Followed(presence={"joined": {}, "left": []})  # type: ignore[arg-type]
    send.send_nowait(presence)
    send.send_nowait(Followed(publications[MAX_RUN + 1]))
    first = receive.receive_nowait()
    item, held = _with_run(first, receive)
    assert [item.publication, *item.more] == publications[:MAX_RUN]
    assert held is None
    item, held = _with_run(receive.receive_nowait(), receive)
    # A presence change behind a run is sent after it, then what follows.
    assert (item.publication, item.more, held) == (publications[MAX_RUN], [], presence)
    assert held is not None
    assert _with_run(held, receive) == (presence, None)
    assert _with_run(receive.receive_nowait(), receive) == (
        Followed(publications[MAX_RUN + 1]),
        None,
    )


async def test_a_burst_of_publications_reaches_every_socket_once_in_order() -> None:
    count = 300
    with trio.fail_after(60):
        async with (
            open_topic_gateway() as (runner, server),
            open_gateway_client(server.url, config=ClientConfig(subprotocol=JSON)) as a,
            open_gateway_client(server.url) as b,
            a.subscribe("room:1") as room_a,
            b.subscribe("room:1") as room_b,
        ):
            async with trio.open_nursery() as nursery:
                for n in range(count):
                    nursery.start_soon(publish, runner, "room:1", n)
            for room in (room_a, room_b):
                got = await take(aiter(room), count)
                assert [offset for offset, _ in got] == list(range(1, count + 1))
                assert sorted(data for _, data in got) == list(range(count))
            assert server.statistics().publications == count


def test_epochs_compare_in_the_order_they_began() -> None:
    """The shard's fencing epoch first, then the owner's clock; one length,
    so that string order is that order. Another form is never older."""
    first, later, next_owner = (
        new_epoch(3, 100.0),
        new_epoch(3, 100.5),
        new_epoch(4, 1.0),
    )
    assert len({len(first), len(later), len(next_owner)}) == 1
    assert older(first, later)
    assert older(later, next_owner)
    assert not older(later, first)
    assert not older(first, first)
    assert not older("0123456789abcdef", first)
    assert not older(first, "0123456789abcdef")


def test_a_client_drops_a_publication_of_an_epoch_it_left() -> None:
    subscription = Subscription("room:1", 10)
    old, new = new_epoch(1, 5.0), new_epoch(2, 0.0)
    for epoch, offset in [(old, 1), (new, 1), (old, 2), (new, 1), (new, 2)]:
        subscription.deliver({"t": "pub", "epoch": epoch, "offset": offset, "data": 0})
    received = []
    while True:
        try:
            publication = subscription._receive.receive_nowait()
        except trio.WouldBlock:
            break
        received.append((publication.epoch, publication.offset))
    assert received == [(old, 1), (new, 1), (new, 2)]


async def test_a_topic_in_a_new_owner_is_in_a_later_epoch() -> None:
    """Through a runner's restart on the same storage (the shard's next
    lease), the topic starts again in an epoch that compares later, and
    `Entity.fencing_epoch` grew."""
    storage, network = MemoryStorage(), MemoryNetwork()
    positions = []
    for _ in range(2):
        async with tc.open_runner(
            entities=[Topic],
            config=config(),
            storage=storage,
            transport=MemoryTransport(network),
        ) as runner:
            await runner.wait_shards_acquired()
            positions.append(await publish(runner, "room:1", "x"))
    assert positions[0].offset == positions[1].offset == 1
    assert older(positions[0].epoch, positions[1].epoch)
    assert int(positions[1].epoch[:12], 16) > int(positions[0].epoch[:12], 16) >= 1
