"""`MemoryGateways`: gateways over memory streams, on virtual time; a reset
link makes the client reconnect at once, a stalled one is noticed by the
heartbeats within ``ping_interval + ping_timeout``, a stopped gateway
resets its links, and the balancing connector goes to the gateways in
turn."""

from __future__ import annotations

import pytest
import trio
import trio.testing

import trio_cluster as tc
from trio_cluster.gateway import (
    ClientConfig,
    Gateway,
    GatewayConfig,
    Topic,
    open_gateway_client,
    publish,
)
from trio_cluster.testing import MemoryGateways

GATEWAY = Gateway(
    topics=lambda name: True,
    config=GatewayConfig(connect_rate=None, ping_interval=2.0, ping_timeout=1.0),
)
CLIENT = ClientConfig(reconnect=tc.Backoff(0.5, 0.5))


async def test_a_client_over_a_memory_link(
    autojump_clock: trio.testing.MockClock,
) -> None:
    gateways = MemoryGateways()
    async with (
        tc.open_runner(entities=[Topic]) as runner,
        trio.open_nursery() as nursery,
    ):
        server = await nursery.start(gateways.serve, "g", runner, GATEWAY)
        assert gateways.served() == ["g"]
        assert gateways.server("g") is server
        async with (
            open_gateway_client(
                "ws://g/ws", config=CLIENT, connect=gateways.connector("c")
            ) as client,
            client.subscribe("news") as news,
        ):
            (link,) = gateways.links("g")
            assert repr(link.client_end) == "c:1"
            assert link.client == "c"
            await publish(runner, "news", 1)
            assert (await anext(aiter(news))).data == 1
            assert [c.info.remote for c in server.connections()] == ["c:1"]

            link.drop()  # a reset: noticed at once
            dropped = trio.current_time()
            await publish(runner, "news", 2)
            assert (await anext(aiter(news))).data == 2
            assert client.state.reconnect_count == 1
            assert trio.current_time() - dropped == pytest.approx(0.5)

            (link,) = gateways.links("g")
            link.stall()  # a half-open link: only the heartbeats notice
            stalled = trio.current_time()
            while client.state.reconnect_count < 2:  # noqa: ASYNC110
                await trio.sleep(0.1)
            # The client hears nothing for ping_interval + ping_timeout.
            assert 3.0 <= trio.current_time() - stalled <= 3.0 + 0.5 + 0.2
            link.resume()
            await publish(runner, "news", 3)
            assert (await anext(aiter(news))).data == 3
        nursery.cancel_scope.cancel()


async def test_a_stopped_gateway_resets_its_links(
    autojump_clock: trio.testing.MockClock,
) -> None:
    gateways = MemoryGateways()
    async with tc.open_runner(entities=[Topic]) as runner:
        async with trio.open_nursery() as nursery:
            await nursery.start(gateways.serve, "g", runner, GATEWAY)
            with pytest.raises(ValueError, match="served already"):
                await gateways.serve("g", runner, GATEWAY)
            end = await gateways.connect("c", "g")
            nursery.cancel_scope.cancel()
        assert gateways.served() == []
        with pytest.raises(trio.BrokenResourceError):
            await end.receive_some()
        with pytest.raises(OSError, match="no gateway at g"):
            await gateways.connect("c", "g")


async def test_the_balancing_connector_takes_the_gateways_in_turn(
    autojump_clock: trio.testing.MockClock,
) -> None:
    gateways = MemoryGateways()
    connect = gateways.connector("c", balance=True)
    async with (
        tc.open_runner(entities=[Topic]) as runner,
        trio.open_nursery() as nursery,
    ):
        for name in ("a", "b"):
            await nursery.start(gateways.serve, name, runner, GATEWAY)
        for _ in range(4):
            end = await connect("ignored", 80)
            await end.aclose()
        assert [link.gateway for link in gateways._links] == ["b", "a", "b", "a"]
        nursery.cancel_scope.cancel()


async def test_link_ends_behave_like_a_tcp_connection() -> None:
    gateways = MemoryGateways()
    from trio_cluster.testing import MemoryLink

    link = MemoryLink("c", 1, "g")
    client, server = link.client_end, link.server_end
    await client.send_all(b"hello")
    assert await server.receive_some(3) == b"hel"
    assert await server.receive_some() == b"lo"
    link.stall()
    await server.send_all(b"held")
    await server.aclose()
    with trio.move_on_after(0.01) as waited:
        await client.receive_some()
    assert waited.cancelled_caught  # nothing arrives while stalled
    link.resume()
    assert await client.receive_some() == b"held"
    assert await client.receive_some() == b""  # then the close
    with pytest.raises(trio.BrokenResourceError):
        await client.send_all(b"to a closed end")
    await client.aclose()
    with pytest.raises(trio.ClosedResourceError):
        await client.receive_some()
    assert not link.open
    assert gateways.links() == []


async def test_a_writer_waits_while_its_reader_is_behind() -> None:
    from trio_cluster.testing import MemoryLink

    link = MemoryLink("c", 1, "g", buffer=4)
    await link.client_end.send_all(b"12345")  # room when it started
    with trio.move_on_after(0.01) as waited:
        await link.client_end.send_all(b"6")
    assert waited.cancelled_caught
    async with trio.open_nursery() as nursery:
        nursery.start_soon(link.client_end.send_all, b"6")
        assert await link.server_end.receive_some() == b"12345"
    assert await link.server_end.receive_some() == b"6"
