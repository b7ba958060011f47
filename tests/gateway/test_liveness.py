"""Heartbeats and slow consumers, in virtual time over memory streams
(`GatewayServer.handle_stream`)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import pytest
import trio
import trio.testing
from trio_websocket import ConnectionClosed, WebSocketConnection, wrap_client_stream

from trio_cluster.gateway import JSON, CloseCode, GatewayServer

from .app import decode, encode, open_gateway

StreamPair = Callable[[], tuple[trio.abc.Stream, trio.abc.Stream]]


@asynccontextmanager
async def connect(
    server: GatewayServer, pair: StreamPair = trio.testing.memory_stream_pair
) -> AsyncIterator[WebSocketConnection]:
    client_stream, server_stream = pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.handle_stream, server_stream)
        ws = await wrap_client_stream(
            nursery,
            client_stream,  # type: ignore[arg-type]
            "test",
            "/ws",
            subprotocols=[JSON],
            message_queue_size=1,
        )
        assert decode(await ws.get_message())["t"] == "welcome"
        yield ws
        nursery.cancel_scope.cancel()


async def test_a_client_that_never_answers_is_closed_after_interval_plus_timeout(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with (
        open_gateway(ping_interval=10.0, ping_timeout=5.0) as server,
        connect(server) as ws,
    ):
        start = trio.current_time()
        assert decode(await ws.get_message()) == {"t": "ping"}
        assert trio.current_time() == start + 10.0
        with pytest.raises(ConnectionClosed) as caught:
            await ws.get_message()
        assert caught.value.reason is not None
        assert caught.value.reason.code == CloseCode.HEARTBEAT_TIMEOUT
        assert trio.current_time() == start + 15.0
        assert server.statistics().closed == {"heartbeat_timeout": 1}


async def test_a_client_answering_pings_stays(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with (
        open_gateway(ping_interval=10.0, ping_timeout=5.0) as server,
        connect(server) as ws,
    ):
        pings = 0
        with trio.move_on_after(105.0):
            while True:
                frame = decode(await ws.get_message())
                if frame["t"] == "ping":
                    pings += 1
                    await ws.send_message(encode({"t": "pong"}))
        assert pings == 10
        (connection,) = server.connections()
        stats = connection.statistics()
        assert stats.rtt == 0.0  # virtual time: the pong came at once
        assert stats.frames_sent == 11  # the welcome and ten pings
        assert stats.frames_received == 10
        assert (stats.errors, stats.requests_in_flight, stats.send_queue) == (0, 0, 0)
        # The one timer structure serves every socket: no task per socket.
        assert server.statistics().closed == {}


async def test_a_client_that_stops_reading_is_closed_as_slow_consumer(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with (
        open_gateway(send_queue=4, send_timeout=1.0) as server,
        connect(server, trio.testing.lockstep_stream_pair) as ws,
    ):
        stream = {
            "t": "stream",
            "id": 1,
            "op": "Counter.count",
            "key": "a",
            "msg": {"upto": 1000},
            "credit": 1000,
        }
        await ws.send_message(encode(stream))
        await trio.sleep(5.0)  # read nothing
        assert server.statistics().closed == {"slow_consumer": 1}
        assert server.connections() == []


async def test_frames_waiting_for_a_slow_socket_leave_as_batches(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with (
        open_gateway() as server,
        connect(server, trio.testing.lockstep_stream_pair) as ws,
    ):
        stream = {
            "t": "stream",
            "id": 1,
            "op": "Counter.count",
            "key": "a",
            "msg": {"upto": 200},
            "credit": 1000,
        }
        await ws.send_message(encode(stream))
        await trio.sleep(1.0)  # the frames wait meanwhile
        frames: list[dict[str, object]] = []
        batches = 0
        while not frames or frames[-1]["t"] != "end":
            message = decode(await ws.get_message())
            if isinstance(message, list):
                batches += 1
                frames += message
            else:
                frames.append(message)
        assert [frame.get("v") for frame in frames[:-1]] == list(range(200))
        assert batches >= 1
        await trio.testing.wait_all_tasks_blocked()  # the writer's last batch is done
        (connection,) = server.connections()
        assert connection.statistics().frames_sent == 1 + 201  # with the welcome
