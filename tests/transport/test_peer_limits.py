"""Issue 12, item 7: a WebSocket endpoint bounds the connections it accepts
(in total, and those still handshaking), refuses the ones over a bound at
once, closes a silent one after ``connect_timeout``, and keeps serving its
real peers meanwhile.

Real sockets on 127.0.0.1, so real time with generous bounds.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import pytest
import trio

from trio_cluster import ConfigError
from trio_cluster.testing import RecordingHandler
from trio_cluster.transport import WebSocketEndpoint, WebSocketTransport

from .test_websocket import (
    LOCALHOST,
    TIMEOUT,
    make_transport,
    raw_client,
    still_works,
    wait_connected,
)


async def silent_socket(endpoint: WebSocketEndpoint) -> trio.SocketStream:
    """A TCP connection to ``endpoint`` that never sends nor reads."""
    address = endpoint.address
    return await trio.open_tcp_stream(address.host, address.port)


async def closed_by_peer(stream: trio.SocketStream) -> bool:
    """Whether the other end closed ``stream`` (EOF or reset), waiting a
    little for it."""
    with trio.move_on_after(0.5):
        try:
            return await stream.receive_some(4096) == b""
        except trio.BrokenResourceError:
            return True
    return False


async def wait_refused(endpoint: WebSocketEndpoint, count: int) -> None:
    while endpoint.statistics().connections_refused < count:  # noqa: ASYNC110
        await trio.sleep(0.005)


@contextlib.asynccontextmanager
async def hostile(
    endpoint: WebSocketEndpoint, n: int
) -> AsyncIterator[list[trio.SocketStream]]:
    streams = [await silent_socket(endpoint) for _ in range(n)]
    try:
        yield streams
    finally:
        for stream in streams:
            await trio.aclose_forcefully(stream)


async def test_handshakes_over_the_limit_are_refused_and_real_peers_still_connect():
    transport = make_transport(
        max_connections=4, max_pending_handshakes=2, connect_timeout=1.0
    )
    ha, hc = RecordingHandler(), RecordingHandler()
    with trio.fail_after(TIMEOUT):
        async with (
            transport.open_endpoint(LOCALHOST, ha) as a,
            transport.open_endpoint(LOCALHOST, hc) as c,
        ):
            a.send_nowait(c.address, ["before"])
            await hc.wait_received(1)
            async with hostile(c, 2) as held:
                await trio.sleep(0.1)  # both now hold c's pending handshakes
                async with hostile(c, 3) as extra:
                    start = trio.current_time()
                    await wait_refused(c, 3)
                    for stream in extra:
                        assert await closed_by_peer(stream)
                    assert trio.current_time() - start < 0.9  # before the timeout
                # The established connection did not suffer.
                await still_works(a, c, hc)
                # The silent ones are closed after connect_timeout...
                for stream in held:
                    with trio.fail_after(3):
                        while not await closed_by_peer(stream):
                            pass
            # ... which frees their slots: a new peer connects.
            hb = RecordingHandler()
            async with transport.open_endpoint(LOCALHOST, hb) as b:
                b.send_nowait(c.address, ["new peer"])
                await hc.wait_received(3)
                await wait_connected(c, b.address)
                assert c.statistics().connections_refused == 3


async def test_connections_over_the_total_are_refused_until_one_closes():
    transport = make_transport(
        max_connections=3, max_pending_handshakes=2, connect_timeout=1.0
    )
    ha, hc = RecordingHandler(), RecordingHandler()
    with trio.fail_after(TIMEOUT):
        async with (
            transport.open_endpoint(LOCALHOST, ha) as a,
            transport.open_endpoint(LOCALHOST, hc) as c,
        ):
            a.send_nowait(c.address, ["first"])
            await hc.wait_received(1)  # a's connection: one slot of c's three
            async with hostile(c, 2) as held:
                await trio.sleep(0.1)
                async with hostile(c, 1) as (over,):
                    await wait_refused(c, 1)
                    assert await closed_by_peer(over)
                await still_works(a, c, hc)
                # A silent client that goes away frees its slot at the
                # latest when its handshake times out.
                await trio.aclose_forcefully(held[0])
                with trio.fail_after(3):
                    while not await closed_by_peer(held[1]):
                        pass
                async with raw_client(c) as ws:  # admitted: handshake answered
                    await ws.ping(b"x")
            assert c.statistics().connections_refused == 1


async def test_a_large_message_before_the_hello_is_refused():
    transport = make_transport(max_message_size=64 * 1024)
    with trio.fail_after(TIMEOUT):
        async with (
            transport.open_endpoint(LOCALHOST, RecordingHandler()) as c,
            raw_client(c) as ws,
        ):
            await ws.send_message(b"\x00" * 4096)  # under max_message_size
            with pytest.raises(Exception) as info:  # noqa: PT011
                await ws.get_message()
            reason = getattr(info.value, "reason", None)
            assert reason is not None
            assert reason.code == 1009


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"max_connections": 0}, "max_connections must be an int >= 1"),
        ({"max_pending_handshakes": 1.5}, "max_pending_handshakes"),
        (
            {"max_connections": 4, "max_pending_handshakes": 5},
            "at most max_connections",
        ),
    ],
)
def test_invalid_connection_limits_raise_config_error(options, match):
    with pytest.raises(ConfigError, match=match):
        WebSocketTransport(**options)
