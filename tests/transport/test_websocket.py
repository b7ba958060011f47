"""Tests of `WebSocketTransport`: the conformance suite, then what only a real
network has: hostile or broken peers, the hello, duplicate connections, ping
liveness, backoff, TLS.

These tests use real sockets on loopback addresses (127.0.0.x) and so real
time; each keeps its timeouts short.
"""

from __future__ import annotations

import contextlib
import logging
import random
import socket
import ssl
import struct
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import msgpack
import pytest
import trio
import trio_websocket
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, BytesMessage, Request

from trio_cluster import ConfigError, RunnerAddress, RunnerUnavailableError
from trio_cluster.abc import Endpoint, Transport
from trio_cluster.testing import RecordingHandler, TransportConformance
from trio_cluster.transport import WebSocketEndpoint, WebSocketTransport, _ws_endpoint
from trio_cluster.transport._framing import MAGIC, encode_hello
from trio_cluster.transport._ws_connection import (
    DISPATCH_SLICE,
    CloseCode,
    close_reason_text,
    describe,
)
from trio_cluster.transport._ws_endpoint import AfterDial, after_dial
from trio_cluster.transport._ws_handshake import keep_inbound

from .wire_peers import raw_websocket

LOCALHOST = RunnerAddress("127.0.0.1", 0)
"""Where the tests open endpoints (port 0: any free port)."""
TIMEOUT = 10
LOG = "trio_cluster.transport"


def free_port(host: str = "127.0.0.1") -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
    return port


def make_transport(**options: Any) -> WebSocketTransport:
    defaults: dict[str, Any] = {
        "max_message_size": 64 * 1024,
        "connect_timeout": 2.0,
        "close_timeout": 0.5,
        "reconnect_backoff": 0.5,
        "rng": random.Random(1),
    }
    defaults.update(options)
    return WebSocketTransport(**defaults)


class TestWebSocketConformance(TransportConformance):
    @pytest.fixture
    def transport(self) -> Transport:
        return make_transport(
            max_message_size=self.MAX_MESSAGE_SIZE,
            max_queued_envelopes=self.MAX_QUEUED_ENVELOPES,
            max_queued_bytes=self.MAX_QUEUED_BYTES,
        )

    @pytest.fixture
    def unreachable(self) -> RunnerAddress:
        return RunnerAddress("127.0.0.1", free_port())


@pytest.fixture
def transport() -> WebSocketTransport:
    return make_transport()


def warnings_about(caplog: pytest.LogCaptureFixture, text: str) -> list[str]:
    return [
        record.getMessage()
        for record in caplog.records
        if record.name == LOG
        and record.levelno == logging.WARNING
        and text in record.getMessage()
    ]


@asynccontextmanager
async def raw_client(
    endpoint: Endpoint,
) -> AsyncIterator[trio_websocket.WebSocketConnection]:
    """A plain trio-websocket client connected to ``endpoint``."""
    async with raw_websocket(endpoint.address) as ws:
        yield ws


async def closed_with(
    ws: trio_websocket.WebSocketConnection,
) -> trio_websocket.CloseReason:
    """Read until the server closes ``ws``; return its close reason."""
    for _ in range(100):  # bounded: a few messages at most come first
        try:
            await ws.get_message()
        except trio_websocket.ConnectionClosed as exc:
            reason = exc.reason
            break
    else:  # pragma: no cover
        raise AssertionError("the connection was not closed")
    assert reason is not None
    return reason


def hello(address: str, *, magic: str = MAGIC, version: int = 1) -> bytes:
    data: bytes = msgpack.packb([magic, version, address])
    return data


async def wait_connected(endpoint: Endpoint, peer: RunnerAddress) -> None:
    """Poll until ``endpoint`` is connected to ``peer`` (no handler event
    marks a connection coming up). Bounded by the caller's ``fail_after``."""
    while not endpoint.is_connected(peer):  # noqa: ASYNC110
        await trio.sleep(0.005)


@asynccontextmanager
async def two_endpoints(
    transport: WebSocketTransport, hb: RecordingHandler | None = None
) -> AsyncIterator[
    tuple[WebSocketEndpoint, RecordingHandler, WebSocketEndpoint, RecordingHandler]
]:
    """Two endpoints of ``transport`` on loopback: ``(a, ha, b, hb)``, each
    endpoint with its recording handler (``hb``, if given, for ``b``)."""
    ha = RecordingHandler()
    hb = RecordingHandler() if hb is None else hb
    async with (
        transport.open_endpoint(LOCALHOST, ha) as a,
        transport.open_endpoint(LOCALHOST, hb) as b,
    ):
        yield a, ha, b, hb


async def still_works(a: Endpoint, c: Endpoint, hc: RecordingHandler) -> None:
    """The normal peer ``c`` of ``a`` still gets envelopes from it."""
    before = len(hc.received)
    a.send_nowait(c.address, ["still working", before])
    await hc.wait_received(before + 1)


# ----------------------------------------------------------------------
# Bad peers: only their connection is closed


@pytest.mark.parametrize(
    ("first", "code", "problem"),
    [
        (b"\xc1garbage", CloseCode.PROTOCOL_ERROR, "not msgpack"),
        ("a text hello", CloseCode.PROTOCOL_ERROR, "must be a binary message"),
        (
            hello("127.0.0.1:9", magic="not_trio_cluster"),
            CloseCode.PROTOCOL_ERROR,
            "not a trio_cluster peer",
        ),
        (
            hello("127.0.0.1:9", version=2),
            CloseCode.PROTOCOL_ERROR,
            "protocol version 2 is not supported (this runner speaks version 1)",
        ),
        (hello("nonsense"), CloseCode.PROTOCOL_ERROR, "not a runner address"),
        # Issue 12, item 1: an address this endpoint could not dial back.
        (hello("h" * 64 + ":1"), CloseCode.PROTOCOL_ERROR, "not a host name"),
        (hello("a b:1"), CloseCode.PROTOCOL_ERROR, "not a host name"),
        (hello("[fe80::zz]:1"), CloseCode.PROTOCOL_ERROR, "not a host name"),
    ],
)
async def test_bad_hello_is_refused_with_a_reason(
    transport, caplog, first, code, problem
):
    with trio.fail_after(TIMEOUT), caplog.at_level(logging.INFO, logger=LOG):
        async with two_endpoints(transport) as (a, ha, c, hc):
            await still_works(a, c, hc)
            async with raw_client(a) as ws:
                await ws.send_message(first)
                reason = await closed_with(ws)
            assert reason.code == code
            assert problem in (reason.reason or "")
            [warning] = warnings_about(caplog, "refusing the connection from")
            assert problem in warning
            await still_works(a, c, hc)
            assert ha.lost == []
            assert a.statistics().bad_peers == 1


async def test_a_client_repeating_bad_hellos_is_logged_a_few_times(transport, caplog):
    # Regression (issue 12, item 8): each refused connection wrote its
    # warning, so a client reconnecting in a loop flooded the logs.
    attempts = 30
    with trio.fail_after(TIMEOUT), caplog.at_level(logging.INFO, logger=LOG):
        async with two_endpoints(transport) as (a, _ha, c, hc):
            for _ in range(attempts):
                async with raw_client(a) as ws:
                    await ws.send_message(hello("nonsense"))
                    reason = await closed_with(ws)
                assert reason.code == CloseCode.PROTOCOL_ERROR
            # Every one counted, a few logged.
            assert a.statistics().bad_peers == attempts
            refused = warnings_about(caplog, "refusing the connection from")
            assert 1 <= len(refused) <= 10
            await still_works(a, c, hc)


async def test_an_undialable_host_is_refused_and_never_ends_the_endpoint(
    transport,
):
    # Issue 12, item 1: a hello announcing a host name with a label over 63
    # characters was accepted; dialing it back (to answer once its
    # connection had gone) raised UnicodeError out of the endpoint's tasks.
    announced = RunnerAddress("h" * 64, free_port())
    with trio.fail_after(TIMEOUT):
        async with two_endpoints(transport) as (a, ha, c, hc):
            async with raw_client(a) as ws:
                await ws.send_message(hello(str(announced)))
                with contextlib.suppress(trio_websocket.ConnectionClosed):
                    await ws.get_message()
                    await ws.send_message(msgpack.packb([["request"]]))
                    await ha.wait_received(1)
            assert ha.received == []
            assert a.statistics().bad_peers == 1
            # Such an address from elsewhere (a registration) is unreachable.
            a.send_nowait(announced, ["reply"])
            while not ha.lost:  # noqa: ASYNC110
                await trio.sleep(0.005)
            [(peer, reason)] = ha.lost
            assert peer == announced
            assert "cannot resolve" in reason
            await still_works(a, c, hc)


async def test_own_address_in_a_hello_is_refused(transport, caplog):
    with trio.fail_after(TIMEOUT):
        async with transport.open_endpoint(LOCALHOST, RecordingHandler()) as a:
            async with raw_client(a) as ws:
                await ws.send_message(encode_hello(a.address))
                reason = await closed_with(ws)
            assert reason.code == CloseCode.PROTOCOL_ERROR
            assert "announced our address" in (reason.reason or "")


@pytest.mark.parametrize(
    ("message", "code", "problem"),
    [
        (b"\xc1\xc1", CloseCode.INVALID_PAYLOAD, "malformed frame: not msgpack"),
        (msgpack.packb(12), CloseCode.INVALID_PAYLOAD, "must be an array, got int"),
        (
            msgpack.packb([["ok"], 3]),
            CloseCode.INVALID_PAYLOAD,
            "envelope 1 must be an array",
        ),
        ("a text frame", CloseCode.UNSUPPORTED_DATA, "text message received"),
        (b"\x91" + b"\xc6" + struct.pack(">I", 70_000) + b"x" * 70_000, 1009, ""),
    ],
)
async def test_bad_frame_closes_only_that_connection(
    transport, caplog, message, code, problem
):
    with trio.fail_after(TIMEOUT), caplog.at_level(logging.INFO, logger=LOG):
        async with two_endpoints(transport) as (a, ha, c, hc):
            await still_works(a, c, hc)
            me = RunnerAddress("127.0.0.1", free_port())
            async with raw_client(a) as ws:
                await ws.send_message(encode_hello(me))
                assert await ws.get_message() == encode_hello(a.address)
                await ws.send_message(msgpack.packb([["first"]]))
                await ha.wait_received(1)
                assert ha.received == [(me, ["first"])]
                await ws.send_message(message)
                reason = await closed_with(ws)
            assert reason.code == code
            await ha.wait_lost(me)
            if code == 1009:
                [warning] = warnings_about(caplog, "over max_message_size")
                assert "Exceeded maximum message size" in warning
            else:
                assert problem in (reason.reason or "")
                [warning] = warnings_about(caplog, "closing the connection from")
                assert str(me) in warning
                assert problem in warning
            assert a.statistics().bad_peers == 1
            await still_works(a, c, hc)
            assert hc.lost == []
            assert ha.lost_peers() == [me]


async def test_garbage_then_reset_at_tcp_level_does_not_stop_the_endpoint(
    caplog,
):
    # trio-websocket's own WebSocketServer dies on this (its reader task's
    # ConnectionClosed escapes); the endpoint must not.
    transport = make_transport(connect_timeout=0.3)
    hc = RecordingHandler()
    with trio.fail_after(TIMEOUT), caplog.at_level(logging.INFO, logger=LOG):
        async with (
            transport.open_endpoint(LOCALHOST, RecordingHandler()) as a,
            transport.open_endpoint(LOCALHOST, hc) as c,
        ):
            for _ in range(20):
                sock = trio.socket.socket()
                await sock.connect((a.address.host, a.address.port))
                await sock.send(b"GARBAGE GARBAGE\r\n\r\n" * 10)
                sock.setsockopt(
                    socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
                )
                sock.close()
            # A client that connects and says nothing is dropped too.
            async with await trio.open_tcp_stream(
                a.address.host, a.address.port
            ) as quiet:
                with trio.fail_after(2):
                    assert await quiet.receive_some(1024) == b""
            await still_works(a, c, hc)
    assert any(
        "no WebSocket handshake and hello" in record.getMessage()
        for record in caplog.records
    )


# ----------------------------------------------------------------------
# Fake servers (for what our dialing side does)


@asynccontextmanager
async def fake_server(
    handler: Callable[
        [trio_websocket.WebSocketRequest, RunnerAddress], Awaitable[None]
    ],
    host: str = "127.0.0.1",
) -> AsyncIterator[RunnerAddress]:
    """A trio-websocket server running ``handler(request, address)``."""
    async with trio.open_nursery() as nursery:
        box: list[RunnerAddress] = []

        async def serve(request):
            # A fake server's connection ends when the endpoint closes it.
            with contextlib.suppress(trio_websocket.ConnectionClosed):
                await handler(request, box[0])

        server = await nursery.start(
            trio_websocket.serve_websocket, serve, host, 0, None
        )
        box.append(RunnerAddress(host, server.port))
        yield box[0]
        nursery.cancel_scope.cancel()


@asynccontextmanager
async def dialing(
    transport: WebSocketTransport,
    serve: Callable[[trio_websocket.WebSocketRequest, RunnerAddress], Awaitable[None]],
    *,
    server_host: str = "127.0.0.1",
    host: str = "127.0.0.1",
) -> AsyncIterator[tuple[RunnerAddress, WebSocketEndpoint, RecordingHandler]]:
    """A `fake_server` running ``serve`` at ``server_host``, and an endpoint
    at ``host`` to dial it: ``(server address, endpoint, its handler)``."""
    handler = RecordingHandler()
    async with (
        fake_server(serve, host=server_host) as where,
        transport.open_endpoint(RunnerAddress(host, 0), handler) as endpoint,
    ):
        yield where, endpoint, handler


async def test_server_with_another_version_is_refused(transport, caplog):
    async def old_server(request, address):
        ws = await request.accept()
        await ws.get_message()
        await ws.send_message(hello(str(address), version=2))
        with pytest.raises(trio_websocket.ConnectionClosed):
            await ws.get_message()
        assert ws.closed is not None
        assert ws.closed.code == CloseCode.PROTOCOL_ERROR

    with trio.fail_after(TIMEOUT), caplog.at_level(logging.INFO, logger=LOG):
        async with dialing(transport, old_server) as (where, a, handler):
            a.send_nowait(where, ["hi"])
            await handler.wait_lost(where)
            [(_, reason)] = handler.lost
            assert reason.startswith(
                "cannot connect: malformed hello: protocol version 2"
            )
            [warning] = warnings_about(caplog, "refusing the connection to")
            assert "protocol version 2" in warning
            with pytest.raises(RunnerUnavailableError, match="next attempt in"):
                a.send_nowait(where, ["again"])
            assert a.statistics().connect_failures == 1


async def test_server_announcing_another_address_is_refused(transport):
    async def impostor(request, address):
        ws = await request.accept()
        await ws.get_message()
        await ws.send_message(hello("10.9.9.9:1"))
        await ws.get_message()  # until closed
        raise AssertionError(
            "the endpoint did not close the connection"
        )  # pragma: no cover

    with trio.fail_after(TIMEOUT):
        async with dialing(transport, impostor) as (where, a, handler):
            a.send_nowait(where, ["hi"])
            await handler.wait_lost(where)
            assert "announced itself as 10.9.9.9:1" in handler.lost[0][1]


async def test_connect_timeout_is_a_failure():
    transport = make_transport(connect_timeout=0.2)

    async def silent(request, address):
        await request.accept()
        await trio.sleep_forever()

    with trio.fail_after(TIMEOUT):
        async with dialing(transport, silent) as (where, a, handler):
            start = trio.current_time()
            a.send_nowait(where, ["hi"])
            await handler.wait_lost(where)
            assert 0.2 <= trio.current_time() - start < 1.5
            assert handler.lost == [
                (where, "cannot connect: no connection within 0.2 s")
            ]


async def test_backoff_grows_after_each_failure():
    transport = make_transport(
        reconnect_backoff=0.1, reconnect_backoff_max=0.4, reconnect_jitter=0
    )
    handler = RecordingHandler()
    nowhere = RunnerAddress("127.0.0.1", free_port())
    accepted: list[float] = []
    failed: list[float] = []
    with trio.fail_after(TIMEOUT):
        async with transport.open_endpoint(LOCALHOST, handler) as a:
            for attempt in range(5):
                while True:  # until the backoff is over
                    try:
                        a.send_nowait(nowhere, [attempt])
                    except RunnerUnavailableError as exc:
                        refused = exc
                    else:
                        break
                    assert "next attempt in" in refused.detail
                    await trio.sleep(0.01)
                accepted.append(trio.current_time())
                await handler.wait_for(lambda n=attempt: len(handler.lost) > n)  # type: ignore[misc]
                failed.append(trio.current_time())
                with pytest.raises(RunnerUnavailableError, match="unreachable"):
                    a.send_nowait(nowhere, ["during backoff"])
    assert [reason for _, reason in handler.lost] == [handler.lost[0][1]] * 5
    assert handler.lost[0][1].startswith("cannot connect: ")
    delays = [accepted[n + 1] - failed[n] for n in range(4)]
    for delay, wanted in zip(delays, [0.1, 0.2, 0.4, 0.4], strict=True):
        assert wanted <= delay < wanted + 0.15


# ----------------------------------------------------------------------
# One connection per pair


async def test_simultaneous_dials_keep_the_lower_addresss_connection(transport):
    for _ in range(5):
        with trio.fail_after(TIMEOUT):
            async with two_endpoints(transport) as (a, ha, b, hb):
                a.send_nowait(b.address, ["from a"])
                b.send_nowait(a.address, ["from b"])
                await ha.wait_received(1)
                await hb.wait_received(1)
                for _ in range(10):
                    await trio.sleep(0.01)
                low, high = sorted([a, b], key=lambda e: e.address)
                assert low.statistics().connects == 1
                assert high.statistics().connects == 1
                dialed = low._peers[high.address].connection
                accepted = high._peers[low.address].connection
                assert dialed is not None
                assert dialed.initiated
                assert accepted is not None
                assert not accepted.initiated
                assert ha.lost == hb.lost == []


async def test_a_lower_peers_connection_wins_over_our_pending_dial():
    # a (127.0.0.2) dials a slow fake at 127.0.0.1 (lower); meanwhile the
    # fake's runner dials a: a keeps that inbound connection, and what a
    # queued goes out on it.
    release = trio.Event()

    async def slow_lower(request, address):
        ws = await request.accept()
        await ws.get_message()
        await release.wait()
        await ws.aclose(CloseCode.DUPLICATE, "duplicate")

    with trio.fail_after(TIMEOUT):
        async with dialing(
            make_transport(), slow_lower, server_host="127.0.0.1", host="127.0.0.2"
        ) as (lower, a, handler):
            a.send_nowait(lower, ["queued while dialing"])
            async with raw_client(a) as ws:
                await ws.send_message(encode_hello(lower))
                assert await ws.get_message() == encode_hello(a.address)
                assert msgpack.unpackb(await ws.get_message()) == [
                    ["queued while dialing"]
                ]
                release.set()
                await trio.sleep(0.2)
                assert a.is_connected(lower)
                a.send_nowait(lower, ["later"])
                assert msgpack.unpackb(await ws.get_message()) == [["later"]]
                assert handler.lost == []


async def test_a_higher_peer_is_refused_while_we_dial_it():
    release = trio.Event()

    got_hi = trio.Event()

    async def slow_higher(request, address):
        ws = await request.accept()
        await ws.get_message()
        await release.wait()
        await ws.send_message(encode_hello(address))
        assert msgpack.unpackb(await ws.get_message()) == [["hi"]]
        got_hi.set()
        await ws.get_message()

    with trio.fail_after(TIMEOUT):
        async with dialing(
            make_transport(), slow_higher, server_host="127.0.0.2", host="127.0.0.1"
        ) as (higher, a, handler):
            a.send_nowait(higher, ["hi"])
            await trio.sleep(0.1)
            async with raw_client(a) as ws:
                await ws.send_message(encode_hello(higher))
                reason = await closed_with(ws)
            assert (reason.code, reason.reason) == (CloseCode.DUPLICATE, "duplicate")
            release.set()
            # Our own dial completes, and what we queued goes out on it.
            await got_hi.wait()
            assert a.is_connected(higher)
            assert a.statistics().connects == 1
            assert handler.lost == []


async def test_a_newer_inbound_connection_replaces_the_older_one(transport):
    handler = RecordingHandler()
    peer = RunnerAddress("127.0.0.1", free_port())
    with trio.fail_after(TIMEOUT):
        async with (
            transport.open_endpoint(LOCALHOST, handler) as a,
            raw_client(a) as old,
        ):
            await old.send_message(encode_hello(peer))
            await old.get_message()
            async with raw_client(a) as new:
                await new.send_message(encode_hello(peer))
                assert await new.get_message() == encode_hello(a.address)
                reason = await closed_with(old)
                assert reason.code == CloseCode.DUPLICATE
                assert handler.lost == [
                    (peer, "replaced by a new connection from the peer")
                ]
                a.send_nowait(peer, ["to the new one"])
                assert msgpack.unpackb(await new.get_message()) == [["to the new one"]]


@pytest.mark.parametrize(
    ("peer_is_lower", "dialing", "dialed_up", "keep"),
    [
        (True, False, False, True),
        (True, True, False, True),
        (True, False, True, True),
        (False, True, False, False),
        (False, False, True, False),
        (False, False, False, True),
    ],
)
def test_keep_inbound_table(peer_is_lower, dialing, dialed_up, keep):
    low, high = RunnerAddress("10.0.0.1", 9), RunnerAddress("10.0.0.2", 1)
    local, peer = (high, low) if peer_is_lower else (low, high)
    assert keep_inbound(local, peer, dialing=dialing, dialed_up=dialed_up) is keep


@pytest.mark.parametrize(
    ("connected", "failure", "peer_connected", "pending", "after"),
    [
        # The dial made a connection, which has ended.
        (True, None, False, True, AfterDial.REDIAL),
        (True, None, False, False, AfterDial.NOTHING),
        (True, "reset", True, True, AfterDial.NOTHING),
        # It made none: the peer's own connection, a failure, or neither.
        (False, "refused", True, True, AfterDial.NOTHING),
        (False, "refused", False, False, AfterDial.FAILED),
        (False, None, False, True, AfterDial.DROP),
        (False, None, False, False, AfterDial.NOTHING),
    ],
)
def test_after_dial_table(connected, failure, peer_connected, pending, after):
    conn = object() if connected else None
    attempt = _ws_endpoint._Attempt(conn, failure)  # type: ignore[arg-type]
    assert after_dial(attempt, peer_connected=peer_connected, pending=pending) is after


# ----------------------------------------------------------------------
# Liveness


async def serve_mute_peer(stream: trio.SocketStream, me: RunnerAddress) -> None:
    """A peer that completes the handshake, then never reads again, so it
    never answers a ping."""
    ws = WSConnection(ConnectionType.SERVER)
    while True:
        data = await stream.receive_some(65536)
        ws.receive_data(data)
        for event in ws.events():
            if isinstance(event, Request):
                await stream.send_all(ws.send(AcceptConnection()))
            elif isinstance(event, BytesMessage):
                await stream.send_all(ws.send(BytesMessage(data=encode_hello(me))))
                await trio.sleep_forever()


async def test_peer_that_stops_answering_pings_is_lost_within_the_timeout():
    transport = make_transport(ping_interval=0.1, ping_timeout=0.3)
    handler = RecordingHandler()
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            box: list[RunnerAddress] = []
            listeners = await nursery.start(
                trio.serve_tcp, lambda s: serve_mute_peer(s, box[0]), 0
            )
            mute = RunnerAddress("127.0.0.1", listeners[0].socket.getsockname()[1])
            box.append(mute)
            async with transport.open_endpoint(LOCALHOST, handler) as a:
                a.send_nowait(mute, ["are you there?"])
                await wait_connected(a, mute)
                up = trio.current_time()
                await handler.wait_lost(mute)
                elapsed = trio.current_time() - up
                assert handler.lost == [(mute, "no pong within 0.3 s")]
                # One interval, then the ping times out.
                assert 0.35 <= elapsed < 1.0
            nursery.cancel_scope.cancel()


async def test_pings_keep_an_idle_connection_up():
    transport = make_transport(ping_interval=0.02, ping_timeout=0.5)
    with trio.fail_after(TIMEOUT):
        async with two_endpoints(transport) as (a, ha, b, hb):
            a.send_nowait(b.address, ["x"])
            await hb.wait_received(1)
            await trio.sleep(0.3)
            assert a.is_connected(b.address)
            assert ha.lost == hb.lost == []


# ----------------------------------------------------------------------
# Listening, options, TLS


async def test_address_in_use_is_runner_unavailable(transport):
    with trio.fail_after(TIMEOUT):
        async with transport.open_endpoint(LOCALHOST, RecordingHandler()) as a:
            with pytest.raises(RunnerUnavailableError, match="cannot listen") as caught:
                async with transport.open_endpoint(a.address, RecordingHandler()):
                    pass  # pragma: no cover
            assert isinstance(caught.value.__cause__, OSError)


async def test_localhost_with_port_zero_has_one_address(transport):
    with trio.fail_after(TIMEOUT):
        handler = RecordingHandler()
        async with (
            transport.open_endpoint(RunnerAddress("localhost", 0), handler) as a,
            transport.open_endpoint(LOCALHOST, RecordingHandler()) as b,
        ):
            assert a.address.host == "localhost"
            assert a.address.port != 0
            b.send_nowait(a.address, ["via localhost"])
            await handler.wait_received(1)


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"ping_interval": 0}, "ping_interval must be a finite number"),
        ({"ping_timeout": float("nan")}, "ping_timeout"),
        ({"connect_timeout": "1"}, "connect_timeout"),
        ({"close_timeout": -1}, "close_timeout"),
        ({"reconnect_backoff": 0}, "backoff initial"),
        ({"reconnect_jitter": 2}, "jitter"),
        ({"max_message_size": 10}, "max_message_size"),
        ({"server_ssl_context": ssl.create_default_context()}, "both"),
    ],
)
def test_invalid_options_raise_config_error(options, match):
    with pytest.raises(ConfigError, match=match):
        WebSocketTransport(**options)


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    folder = tmp_path_factory.mktemp("tls")
    cert, key = str(folder / "cert.pem"), str(folder / "key.pem")
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "ec",
            "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
            "-keyout", key, "-out", cert, "-days", "1",
            "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
        ],
        check=True,
        capture_output=True,
    )  # fmt: skip
    return cert, key


async def test_tls_round_trip(certificate):
    cert, key = certificate
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server.load_cert_chain(cert, key)
    client = ssl.create_default_context(cafile=cert)
    transport = make_transport(server_ssl_context=server, client_ssl_context=client)
    with trio.fail_after(TIMEOUT):
        async with two_endpoints(transport) as (a, ha, b, hb):
            a.send_nowait(b.address, ["secret"])
            await hb.wait_received(1)
            b.send_nowait(a.address, ["reply"])
            await ha.wait_received(1)
            # A plain client gets nowhere, and breaks nothing.
            plain = make_transport()
            hp = RecordingHandler()
            async with plain.open_endpoint(LOCALHOST, hp) as p:
                p.send_nowait(a.address, ["in clear"])
                await hp.wait_lost(a.address)
            a.send_nowait(b.address, ["still secret"])
            await hb.wait_received(2)


# ----------------------------------------------------------------------
# Error translation helpers


def test_describe_translates_foreign_errors():
    closed = trio_websocket.ConnectionClosed(trio_websocket.CloseReason(1001, "bye"))
    assert describe(closed) == "connection closed (1001 GOING_AWAY: bye)"
    assert describe(trio_websocket.ConnectionClosed(None)) == "connection closed"
    rejected = trio_websocket.ConnectionRejected(403, (), None)
    assert describe(rejected) == "WebSocket handshake rejected with HTTP status 403"
    refused = ConnectionRefusedError(111, "Connection refused")
    assert describe(ExceptionGroup("g", [refused])) == "Connection refused"
    handshake = trio_websocket.HandshakeError()
    handshake.__cause__ = refused
    assert "handshake failed" in describe(handshake)
    broken = trio.BrokenResourceError()
    broken.__cause__ = ssl.SSLError("bad record")
    assert describe(broken).startswith("connection broken:")
    assert describe(trio.ClosedResourceError()) == "ClosedResourceError"


def test_close_reasons_fit_in_a_close_frame():
    assert close_reason_text("short") == "short"
    long = close_reason_text("é" * 200)
    assert len(long.encode()) <= 123
    assert long.endswith("...")


# ----------------------------------------------------------------------
# Dispatch


async def test_reader_yields_within_a_large_frame(transport):
    # Answers to the first envelopes of a big frame can leave while the rest
    # are processed: the reader yields every DISPATCH_SLICE envelopes.
    ticks = 0
    seen: list[int] = []

    class Ticking(RecordingHandler):
        def envelope_received(self, peer, envelope):
            seen.append(ticks)
            super().envelope_received(peer, envelope)

    async def tick() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await trio.lowlevel.checkpoint()

    hb = Ticking()
    count = 3 * DISPATCH_SLICE + 5
    with trio.fail_after(TIMEOUT):
        async with (
            transport.open_endpoint(LOCALHOST, RecordingHandler()) as a,
            transport.open_endpoint(LOCALHOST, hb) as b,
            trio.open_nursery() as nursery,
        ):
            a.send_nowait(b.address, ["connect"])
            await hb.wait_received(1)
            nursery.start_soon(tick)
            frames = b.statistics().frames_received
            seen.clear()
            for seq in range(count):  # one tick: one frame
                a.send_nowait(b.address, [seq])
            await hb.wait_received(1 + count)
            assert b.statistics().frames_received == frames + 1
            nursery.cancel_scope.cancel()
    slices = [seen[i : i + DISPATCH_SLICE] for i in range(0, count, DISPATCH_SLICE)]
    # No yield inside a slice; between slices the ticker may run (Trio
    # shuffles each batch, so not always, but at least once in three).
    assert [len(set(part)) for part in slices] == [1, 1, 1, 1]
    firsts = [part[0] for part in slices]
    assert firsts == sorted(firsts)
    assert firsts[-1] > firsts[0]


async def test_idle_peers_are_forgotten_past_the_limit(transport, monkeypatch):
    monkeypatch.setattr(_ws_endpoint, "MAX_IDLE_PEERS", 2)
    ha = RecordingHandler()
    with trio.fail_after(TIMEOUT):
        async with transport.open_endpoint(LOCALHOST, ha) as a:
            gone: list[RunnerAddress] = []
            for _ in range(2):  # peers that come and go
                hb = RecordingHandler()
                async with transport.open_endpoint(LOCALHOST, hb) as b:
                    a.send_nowait(b.address, ["hi"])
                    await hb.wait_received(1)
                    gone.append(b.address)
                await ha.wait_lost(gone[-1])
            assert set(a._peers) == set(gone)
            hc = RecordingHandler()
            async with transport.open_endpoint(LOCALHOST, hc) as c:
                a.send_nowait(c.address, ["hi"])
                await hc.wait_received(1)
                assert set(a._peers) == {c.address}


async def test_a_send_from_peer_lost_is_not_stranded_behind_the_ended_dial():
    """The runtime routes a failed call again from inside ``peer_lost``: that
    envelope must start a new dial (and fail or arrive), not wait forever in
    the queue of the connection that just ended."""

    class Resender(RecordingHandler):
        endpoint: Endpoint | None = None

        def peer_lost(self, peer: RunnerAddress, reason: str) -> None:
            super().peer_lost(peer, reason)
            if len(self.lost) == 1:
                assert self.endpoint is not None
                self.endpoint.send_nowait(peer, ["routed again"])

    transport = WebSocketTransport()
    first, second = Resender(), RecordingHandler()
    with trio.fail_after(10):
        async with transport.open_endpoint(RunnerAddress("127.0.0.1", 0), first) as a:
            first.endpoint = a
            async with transport.open_endpoint(
                RunnerAddress("127.0.0.1", 0), second
            ) as b:
                a.send_nowait(b.address, ["hello"])
                while not second.received:  # noqa: ASYNC110
                    await trio.sleep(0.01)
            # B is gone, listener included: the re-sent envelope's new dial
            # fails, which is reported as a second peer_lost.
            while len(first.lost) < 2:  # noqa: ASYNC110
                await trio.sleep(0.01)


# ----------------------------------------------------------------------
# Listening at one address, advertising another (issue 12, item 10)


async def test_an_endpoint_listens_at_listen_at_and_advertises_its_address():
    # It listens on loopback's numeric address and advertises the name
    # peers dial ("localhost"), with the port it got.
    listen = WebSocketTransport(listen_at=RunnerAddress("127.0.0.1", 0))
    plain = WebSocketTransport()
    hb = RecordingHandler()
    with trio.fail_after(10):
        async with (
            listen.open_endpoint(
                RunnerAddress("localhost", 0), RecordingHandler()
            ) as a,
            plain.open_endpoint(LOCALHOST, hb) as b,
        ):
            assert a.address.host == "localhost"
            assert a.address.port != 0
            a.send_nowait(b.address, ["hello", 1])
            await hb.wait_received(1)
            assert hb.received[0][0] == a.address


async def test_a_handler_raising_mid_frame_ends_the_connection_there(transport, caplog):
    # The envelopes of a frame before the failing one were handled; none
    # after it is; the traceback is logged and the peer hears why.
    failing = RecordingHandler(fail_on=["boom"])
    with trio.fail_after(TIMEOUT):
        async with two_endpoints(transport, failing) as (a, ha, b, hb):
            a.send_nowait(b.address, ["connect"])
            await hb.wait_received(1)
            frames = b.statistics().frames_received
            for envelope in (["before"], ["boom"], ["after"]):  # one frame
                a.send_nowait(b.address, envelope)
            await ha.wait_lost(b.address)
            await hb.wait_lost(a.address)
            assert b.statistics().frames_received == frames + 1
    assert hb.envelopes() == [["connect"], ["before"], ["boom"]]
    [(_, reason)] = hb.lost
    assert reason == "the handler raised RuntimeError"
    [record] = [r for r in caplog.records if "handler raised on" in r.getMessage()]
    assert record.levelno == logging.ERROR
    assert record.exc_info is not None
    assert record.exc_info[0] is RuntimeError
