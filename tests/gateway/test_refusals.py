"""Refusals before the upgrade, shutdown, and replies a subprotocol cannot
carry; the CLI's ``--gateway`` mistakes."""

from __future__ import annotations

import argparse
from collections.abc import AsyncIterator

import pytest
import trio
import trio.lowlevel
from trio_websocket import ConnectionClosed, ConnectionRejected

import trio_cluster as tc
from trio_cluster import ConfigError
from trio_cluster._cli._main import _gateway, main
from trio_cluster.gateway import (
    JSON,
    MSGPACK,
    CloseCode,
    Gateway,
    GatewayConfig,
    Service,
    expose,
)

from .app import (
    Counter,
    encode,
    exchange,
    open_gateway,
    open_raw,
    open_websocket,
    read_until_closed,
)


async def raw_http(port: int, request: bytes) -> bytes:
    async with await trio.open_tcp_stream("127.0.0.1", port) as stream:
        await stream.send_all(request)
        response = b""
        while chunk := await stream.receive_some():
            response += chunk
        return response


async def test_malformed_and_oversized_heads_get_400_and_431() -> None:
    with trio.fail_after(30):
        async with open_gateway() as server:
            assert (await raw_http(server.port, b"NOT HTTP\r\n\r\n")).startswith(
                b"HTTP/1.1 400 "
            )
            huge = b"GET /ws HTTP/1.1\r\nX: " + b"a" * 20_000 + b"\r\n\r\n"
            assert (await raw_http(server.port, huge)).startswith(b"HTTP/1.1 431 ")
            plain = await raw_http(server.port, b"GET /ws HTTP/1.1\r\nHost: x\r\n\r\n")
            assert plain.startswith(b"HTTP/1.1 426 ")
            assert server.statistics().refused_other == 3


async def test_a_client_that_never_upgrades_is_closed_after_open_timeout() -> None:
    with trio.fail_after(30):
        async with open_gateway(open_timeout=0.2) as server:
            async with await trio.open_tcp_stream("127.0.0.1", server.port) as stream:
                await stream.send_all(b"GET /ws HTTP/1.1\r\n")  # and nothing more
                assert await stream.receive_some() == b""  # closed, unanswered
            assert server.statistics().refused_other == 1


async def test_over_max_connections_the_stream_is_closed_unread() -> None:
    with trio.fail_after(30):
        async with (
            open_gateway(max_connections=1, max_pending_upgrades=1) as server,
            open_raw(server.url),
        ):
            async with await trio.open_tcp_stream("127.0.0.1", server.port) as stream:
                assert await stream.receive_some() == b""
            assert server.statistics().refused_other == 1


async def test_a_failing_authentication_hook_is_a_500() -> None:
    async def authenticate(handshake: object) -> str:
        raise RuntimeError("database down")

    gateway = Gateway(entities=[expose(Counter)], authenticate=authenticate)
    with trio.fail_after(30):
        async with open_gateway(gateway) as server:
            with pytest.raises(ConnectionRejected) as caught:
                async with open_websocket(server.url, [JSON]):
                    pass
            assert caught.value.status_code == 500
            assert b"database" not in (caught.value.body or b"")


async def test_aclose_says_going_away_to_every_socket_and_new_ones() -> None:
    with trio.fail_after(30):
        async with open_gateway() as server, open_raw(server.url, MSGPACK) as ws:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(server.aclose)
                with pytest.raises(ConnectionClosed) as caught:
                    await read_until_closed(ws)
            assert caught.value.reason is not None
            assert caught.value.reason.code == CloseCode.GOING_AWAY
            async with open_websocket(server.url, [JSON]) as late:
                with pytest.raises(ConnectionClosed) as caught:
                    await read_until_closed(late)
            assert caught.value.reason is not None
            assert caught.value.reason.code == CloseCode.GOING_AWAY


class Blobs(Service):
    name = "blobs"

    @tc.rpc
    async def get(self, msg: None) -> bytes:
        return b"\x00\x01"


async def test_a_reply_json_cannot_carry_is_an_internal_error() -> None:
    gateway = Gateway(services=[Blobs()])
    call = {"t": "call", "id": 1, "op": "blobs.get", "msg": None}
    with trio.fail_after(30):
        async with open_gateway(gateway) as server:
            async with open_raw(server.url, JSON) as ws:
                answer = await exchange(ws, call, JSON)
                assert answer["code"] == "internal"
                assert answer["id"] == 1
            async with open_raw(server.url, MSGPACK) as ws:
                assert (await exchange(ws, call, MSGPACK))["v"] == b"\x00\x01"


def test_gateway_configuration_is_checked_eagerly() -> None:
    with pytest.raises(ConfigError, match="path"):
        GatewayConfig(path="ws")
    with pytest.raises(ConfigError, match="max_pending_upgrades"):
        GatewayConfig(max_connections=1, max_pending_upgrades=2)
    with pytest.raises(ConfigError, match="ping_interval"):
        GatewayConfig(ping_interval=0)
    with pytest.raises(ConfigError, match="expose"):
        Gateway(entities=[Counter])  # type: ignore[list-item]
    with pytest.raises(ConfigError, match="no handlers"):
        expose(Counter, "nothing")


async def test_two_operations_of_one_name_are_refused_when_served() -> None:
    gateway = Gateway(entities=[expose(Counter, "add"), expose(Counter, "count")])
    with pytest.raises(ConfigError, match="Counter"):
        async with open_gateway(Gateway(entities=[*gateway.entities, expose(Counter)])):
            pass


def test_the_cli_pairs_the_gateway_option_with_the_target() -> None:
    gateway = Gateway(entities=[expose(Counter)])
    args = argparse.Namespace(target="app:APP", gateway=None)
    assert _gateway(args, None) is None
    with pytest.raises(ConfigError, match="--gateway HOST:PORT"):
        _gateway(args, gateway)
    args.gateway = "127.0.0.1:8765"
    with pytest.raises(ConfigError, match="names no gateway"):
        _gateway(args, None)
    with pytest.raises(ConfigError, match="must be a Gateway"):
        _gateway(args, "nope")
    definition, where = _gateway(args, gateway)  # type: ignore[misc]
    assert definition is gateway
    assert (where.host, where.port) == ("127.0.0.1", 8765)
    args.gateway = "nonsense"
    with pytest.raises(ConfigError, match="--gateway"):
        _gateway(args, gateway)


def test_run_refuses_a_gateway_option_without_a_gateway(
    capsys: pytest.CaptureFixture[str],
) -> None:
    code = main(
        [
            "run",
            "tests.helpers:ENTITIES_FOR_CLI",
            "--dsn",
            "postgresql://127.0.0.1/test",
            "--listen",
            "127.0.0.1:0",
            "--gateway",
            "127.0.0.1:0",
        ]
    )
    assert code == 2
    assert "names no gateway" in capsys.readouterr().err


class Firehose(Service):
    name = "firehose"

    @tc.stream
    async def blobs(self, msg: None) -> AsyncIterator[str]:
        while True:
            yield "x" * 60_000
            await trio.lowlevel.checkpoint()


async def test_a_tcp_client_that_stops_reading_is_closed_as_slow_consumer() -> None:
    """Over TCP, replies go through the socket's outbox without waiting;
    once the kernel's buffers are full they queue, and a full queue (or a
    write waiting over send_timeout) closes the socket: 4001."""
    gateway = Gateway(
        services=[Firehose()], config=GatewayConfig(send_queue=8, send_timeout=1.0)
    )
    stream = {
        "t": "stream",
        "id": 1,
        "op": "firehose.blobs",
        "msg": None,
        "credit": 100_000,
    }
    with trio.fail_after(30):
        async with open_gateway(gateway) as server:
            async with open_raw(server.url, MSGPACK, message_queue_size=1) as ws:
                await ws.send_message(encode(stream, MSGPACK))
                while server.statistics().closed != {"slow_consumer": 1}:  # noqa: ASYNC110
                    await trio.sleep(0.05)
            assert server.connections() == []


class Big(Service):
    name = "big"

    @tc.rpc
    async def get(self, msg: int) -> str:
        return "x" * msg


async def test_a_reply_over_max_message_size_is_an_error_not_a_close() -> None:
    gateway = Gateway(services=[Big()], config=GatewayConfig(max_message_size=1000))
    with trio.fail_after(30):
        async with open_gateway(gateway) as server, open_raw(server.url, JSON) as ws:
            big = await exchange(
                ws, {"t": "call", "id": 1, "op": "big.get", "msg": 5000}
            )
            assert (big["code"], big["message"]) == (
                "internal",
                "reply over max_message_size",
            )
            small = await exchange(
                ws, {"t": "call", "id": 2, "op": "big.get", "msg": 10}
            )
            assert small["v"] == "x" * 10
