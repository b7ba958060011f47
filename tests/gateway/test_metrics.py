"""A gateway's metrics on virtual time (memory links): publications and
their fan-out latency, drops, refusals by rate and limit, ping round trips
and the links' quality, per socket and on ``/metrics``."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio
import trio.testing
from trio_websocket import (
    ConnectionClosed,
    ConnectionRejected,
    WebSocketConnection,
    wrap_client_stream,
)

import trio_cluster as tc
from trio_cluster.gateway import (
    JSON,
    MSGPACK,
    ClientConfig,
    Gateway,
    GatewayConfig,
    GatewayServer,
    RateLimit,
    Topic,
    WindowLimit,
    expose,
    open_gateway_client,
    publish,
)
from trio_cluster.testing import MemoryGateways

from .app import Blocker, decode, encode, read_until_closed

GATEWAY = Gateway(
    entities=[expose(Blocker)],
    topics=lambda name: name.startswith("room:"),
    config=GatewayConfig(
        connect_rate=WindowLimit(3, per=60.0),
        message_rate=RateLimit(20, burst=20),
        max_concurrent_requests=1,
        ping_interval=1.0,
        ping_timeout=20.0,
        send_queue=8,
        send_timeout=30.0,
    ),
)


@asynccontextmanager
async def open_raw(
    gateways: MemoryGateways, client: str, subprotocol: str = JSON
) -> AsyncIterator[WebSocketConnection]:
    """A bare WebSocket over a memory link, its welcome frame read."""
    stream = await gateways.connect(client, "g")
    try:
        async with trio.open_nursery() as nursery:
            ws = await wrap_client_stream(
                nursery,
                stream,  # type: ignore[arg-type]  # any trio Stream works
                "g",
                "/ws",
                subprotocols=[subprotocol],
            )
            assert decode(await ws.get_message())["t"] == "welcome"
            yield ws
            nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:  # a refused upgrade, unwrapped
        if len(group.exceptions) == 1 and isinstance(group.exceptions[0], Exception):
            raise group.exceptions[0] from None
        raise


class Later:
    """A clock ``by`` seconds later than ``clock``."""

    def __init__(self, clock: tc.Clock, by: float) -> None:
        self.clock = clock
        self.by = by

    def now(self) -> float:
        return self.clock.now() + self.by


async def until(condition: Any) -> None:
    with trio.fail_after(30):
        while not condition():  # noqa: ASYNC110
            await trio.sleep(0.05)


async def test_the_gateway_counts_what_happens(
    autojump_clock: trio.testing.MockClock,
) -> None:
    gateways = MemoryGateways(buffer=512)
    async with (
        tc.open_runner(entities=[Blocker, Topic]) as runner,
        trio.open_nursery() as nursery,
    ):
        server: GatewayServer = await nursery.start(
            gateways.serve, "g", runner, GATEWAY
        )
        async with (
            open_gateway_client(
                "ws://g/ws",
                config=ClientConfig(subprotocol=JSON),
                connect=gateways.connector("json"),
            ) as text,
            open_gateway_client(
                "ws://g/ws",
                config=ClientConfig(subprotocol=MSGPACK),
                connect=gateways.connector("msgpack"),
            ) as binary,
            text.subscribe("room:1") as text_room,
            binary.subscribe("room:1") as binary_room,
        ):
            # Publications: each brought once, queued to both sockets but a
            # JSON one for bytes (dropped), with its fan-out latency (the
            # gateway's clock made 0.25 s later than the topic's).
            # The hub's stream open first (a subscribe's reply does not wait
            # for it), so that both publications are live ones, one each.
            hub = server._topics.hub  # type: ignore[union-attr]
            hub._clock = Later(runner.clock, 0.25)
            await hub._followers["room:1"].synced.wait()
            await publish(runner, "room:1", {"n": 1})
            assert (await anext(aiter(text_room))).data == {"n": 1}
            assert (await anext(aiter(binary_room))).data == {"n": 1}
            await publish(runner, "room:1", b"\x00binary")
            assert (await anext(aiter(binary_room))).data == b"\x00binary"
            stats = server.statistics()
            assert stats.publications == 2
            assert stats.publication_deliveries == 3
            assert stats.dropped == {"unencodable": 1}
            assert stats.fanout_latency is not None
            assert stats.fanout_latency.count == 2
            assert stats.fanout_latency.total == pytest.approx(0.5)

            # Pings: answered at once over memory links (virtual time).
            await trio.sleep(3)
            (connection,) = [
                c for c in server.connections() if c.info.remote.startswith("json:")
            ]
            per_socket = connection.statistics()
            assert per_socket.rtt == 0.0
            assert per_socket.rtt_average == 0.0
            assert per_socket.quality == "good"
            assert per_socket.frames_sent >= 3  # welcome, the reply, a publication

            # A link that holds the pings' answers for over a second turns
            # fair, then poor (a moving average).
            (link,) = [link for link in gateways.links("g") if link.client == "json"]
            qualities = []
            for _ in range(6):
                link.stall()
                await trio.sleep(2.5)
                link.resume()
                await trio.sleep(0.1)
                qualities.append(connection.statistics().quality)
            assert qualities[0] == "fair"
            assert qualities[-1] == "poor"
            slow = connection.statistics()
            assert slow.rtt is not None
            assert 1.0 < slow.rtt < 2.5
            assert server.statistics().quality == {"poor": 1, "good": 1}

        # Refusals: the message rate (close 4008), concurrent requests
        # (too_many_requests), the connect rate (HTTP 429).
        async with open_raw(gateways, "flood") as flood:
            for _ in range(30):
                try:
                    await flood.send_message(encode({"t": "ping"}))
                except ConnectionClosed:
                    break
            with pytest.raises(ConnectionClosed) as caught:
                await read_until_closed(flood)
            assert caught.value.reason is not None
            assert caught.value.reason.code == 4008
        async with open_raw(gateways, "busy") as busy:
            for request in (1, 2):
                frame = {"t": "call", "id": request, "op": "Blocker.wait"}
                await busy.send_message(encode({**frame, "key": "b", "msg": {}}))
            answer = decode(await busy.get_message())
            assert answer["code"] == "too_many_requests"
        for _ in range(2):
            async with open_raw(gateways, "busy"):
                pass
        with pytest.raises(ConnectionRejected) as rejected:
            async with open_raw(gateways, "busy"):
                pass
        assert rejected.value.status_code == 429

        # A socket that reads nothing: its link fills, its writer waits,
        # its send queue fills: closed 4001, the frame dropped.
        async with open_raw(gateways, "stuck") as stuck:
            await stuck.send_message(
                encode({"t": "subscribe", "id": 1, "topic": "room:2"})
            )
            await until(lambda: server.statistics().requests >= 3)
            for n in range(40):
                await publish(runner, "room:2", "x" * 100 + str(n))
            await until(lambda: server.statistics().closed.get("slow_consumer") == 1)

        stats = server.statistics()
        assert stats.dropped["send_queue_full"] == 1
        assert stats.refused["too_many_requests"] == 1
        assert stats.closed["rate_limited"] == 1
        assert stats.refused_rate_limited == 1
        text_metrics = server.render_metrics()
        label = f'runner="{runner.address}"'
        for line in (
            f'trio_cluster_gateway_rate_limited_total{{limit="connect",{label}}} 1',
            f'trio_cluster_gateway_rate_limited_total{{limit="messages",{label}}} 1',
            f'trio_cluster_gateway_rate_limited_total{{limit="requests",{label}}} 1',
            f'trio_cluster_gateway_dropped_total{{reason="unencodable",{label}}} 1',
            f'trio_cluster_gateway_dropped_total{{reason="send_queue_full",{label}}} 1',
            "trio_cluster_gateway_requests_refused_by_code_total{code="
            f'"too_many_requests",{label}}} 1',
            f"trio_cluster_gateway_publication_deliveries_total{{{label}}} "
            f"{stats.publication_deliveries}",
            f"trio_cluster_gateway_fanout_latency_seconds_count{{{label}}} "
            f"{stats.fanout_latency.count if stats.fanout_latency else 0}",
            f'trio_cluster_gateway_fanout_latency_seconds_bucket{{le="+Inf",{label}}}',
            f'trio_cluster_gateway_ping_rtt_seconds_bucket{{le="2.5",{label}}}',
            "# TYPE trio_cluster_gateway_fanout_latency_seconds histogram",
            f'trio_cluster_gateway_connections_by_quality{{quality="good",{label}}}',
        ):
            assert line in text_metrics, line
        nursery.cancel_scope.cancel()
