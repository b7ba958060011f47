"""`open_gateway_client` against a real gateway on 127.0.0.1: typed calls,
errors, cancellation, streams, reconnects and refusals."""

from __future__ import annotations

from functools import partial

import pytest
import trio
from trio_websocket import WebSocketRequest, serve_websocket

from trio_cluster.gateway import (
    JSON,
    MSGPACK,
    ClientConfig,
    CloseCode,
    Gateway,
    GatewayCallError,
    GatewayDisconnectedError,
    GatewayRefusedError,
    UnauthorizedError,
    WindowLimit,
    expose,
    open_gateway_client,
)

from .app import (
    Add,
    Blocker,
    Count,
    Counter,
    LimitExceededError,
    Wait,
    Whoami,
    open_gateway,
)

FAST = ClientConfig(open_timeout=5.0)


@pytest.mark.parametrize("subprotocol", [JSON, MSGPACK])
async def test_typed_calls_errors_and_streams(subprotocol: str) -> None:
    config = ClientConfig(subprotocol=subprotocol)
    with trio.fail_after(30):
        async with open_gateway() as server:  # noqa: SIM117 - checked after the client
            async with open_gateway_client(server.url, config=config) as client:
                counter = client.entities(Counter)("c1")
                assert await counter.add(Add(2)) == 2
                assert await counter.add(Add(3)) == 5
                with pytest.raises(LimitExceededError) as declared:
                    await counter.add(Add(1000))
                assert declared.value.limit == 100
                with pytest.raises(GatewayCallError) as internal:
                    await client.entities(Counter)("crashes").crash(Add(1))
                assert internal.value.code == "internal"
                assert "secret" not in str(internal.value)
                with pytest.raises(GatewayCallError) as hidden:
                    await counter.reset(Add(1))  # not exposed
                assert hidden.value.code == "not_found"
                assert await client.service(Whoami).get(None) == "None"
                async with counter.count(Count(40)) as items:
                    assert [item async for item in items] == list(range(40))
                assert await client.call("Counter.add", {"amount": 1}, key="c1") == 6
                state = client.state
                assert state.connected
                assert state.reconnect_count == 0
                assert state.last_connect_time is not None
                assert state.connection_id is not None
                assert [c.statistics().id for c in server.connections()] == [
                    state.connection_id
                ]
        # The client closed its socket on the way out.
        assert server.connections() == []


async def test_cancelling_a_call_cancels_it_on_the_server() -> None:
    Blocker.cancelled = 0
    with trio.fail_after(30):
        async with open_gateway() as server, open_gateway_client(server.url) as client:
            with trio.move_on_after(0.2):
                await client.entities(Blocker)("b").wait(Wait())
            while Blocker.cancelled == 0:  # noqa: ASYNC110 - counted by the entity
                await trio.sleep(0.01)
            assert await client.entities(Counter)("c").add(Add(1)) == 1


async def test_a_dropped_socket_fails_calls_in_flight_then_reconnects() -> None:
    with trio.fail_after(30):
        async with open_gateway() as server, open_gateway_client(server.url) as client:
            await client.wait_connected()
            first = client.state.connection_id
            async with trio.open_nursery() as nursery:
                failed: list[BaseException] = []

                async def blocked() -> None:
                    try:
                        await client.entities(Blocker)("b").wait(Wait())
                    except GatewayDisconnectedError as exc:
                        failed.append(exc)

                nursery.start_soon(blocked)
                await trio.sleep(0.2)
                for connection in server.connections():
                    connection.end(CloseCode.GOING_AWAY, "maintenance")
            assert len(failed) == 1
            assert isinstance(failed[0], GatewayDisconnectedError)
            assert failed[0].code == 1001
            # The client reconnects by itself; calls wait for it.
            assert await client.entities(Counter)("c").add(Add(1)) == 1
            state = client.state
            assert state.reconnect_count == 1
            assert state.connection_id != first
            assert state.last_error is not None
            assert "1001" in state.last_error


async def test_an_unauthenticated_client_gives_up_with_a_typed_error() -> None:
    async def authenticate(handshake: object) -> str:
        raise UnauthorizedError(reason="who are you")

    gateway = Gateway(entities=[expose(Counter)], authenticate=authenticate)
    with trio.fail_after(30):
        async with (
            open_gateway(gateway) as server,
            open_gateway_client(server.url) as client,
        ):
            with pytest.raises(GatewayRefusedError) as caught:
                await client.entities(Counter)("c").add(Add(1))
            assert caught.value.status == 401
            assert client.state.failed_attempts == 1
            assert not client.state.connected


async def test_the_token_is_sent_as_a_bearer_header() -> None:
    async def authenticate(handshake: object) -> str:
        if handshake.headers.get("authorization") != "Bearer t0k":  # type: ignore[attr-defined]
            raise UnauthorizedError()
        return "bob"

    gateway = Gateway(services=[Whoami()], authenticate=authenticate)
    with trio.fail_after(30):
        async with (
            open_gateway(gateway) as server,
            open_gateway_client(server.url, token="t0k") as client,
        ):
            assert await client.service(Whoami).get(None) == "bob"


async def _silent_server(request: WebSocketRequest, accepted: list[float]) -> None:
    """Welcomes, promises pings every 0.1 s, then says nothing."""
    ws = await request.accept(subprotocol=MSGPACK)
    accepted.append(trio.current_time())
    welcome = {
        "t": "welcome",
        "v": 1,
        "id": "x",
        "ping_interval": 0.1,
        "ping_timeout": 0.1,
    }
    await ws.send_message(__import__("msgpack").packb(welcome))
    await trio.sleep_forever()


async def test_a_silent_server_is_dropped_and_redialed() -> None:
    accepted: list[float] = []
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            server = await nursery.start(
                partial(serve_websocket, ssl_context=None),
                partial(_silent_server, accepted=accepted),
                "127.0.0.1",
                0,
            )
            url = f"ws://127.0.0.1:{server.port}/ws"
            async with open_gateway_client(url) as client:
                while len(accepted) < 2:  # noqa: ASYNC110 - appended by the server
                    await trio.sleep(0.01)
                assert client.state.last_error is not None
                assert "heartbeat" in client.state.last_error
            # Silence is noticed after ping_interval + ping_timeout, then
            # the client waits its first backoff delay (<= 0.1 s).
            assert 0.2 <= accepted[1] - accepted[0] < 2.0
            nursery.cancel_scope.cancel()


async def test_no_welcome_within_open_timeout_counts_as_a_failed_attempt() -> None:
    async def mute(stream: trio.SocketStream) -> None:
        await trio.sleep_forever()

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            (listener,) = await nursery.start(
                partial(trio.serve_tcp, mute, 0, host="127.0.0.1")
            )
            port = listener.socket.getsockname()[1]
            config = ClientConfig(open_timeout=0.1, max_attempts=2)
            async with open_gateway_client(
                f"ws://127.0.0.1:{port}/ws", config=config
            ) as client:
                with pytest.raises(GatewayRefusedError) as caught:
                    await client.wait_connected()
                assert "no welcome frame in time" in caught.value.reason
                assert client.state.failed_attempts == 2
            nursery.cancel_scope.cancel()


async def test_giving_up_after_a_429_says_so_with_its_retry_after() -> None:
    config = ClientConfig(max_attempts=1)
    limit = WindowLimit(1, per=60.0, block_for=300.0)
    with trio.fail_after(30):
        async with (
            open_gateway(connect_rate=limit) as server,
            open_gateway_client(server.url) as first,
        ):
            await first.wait_connected()
            async with open_gateway_client(server.url, config=config) as second:
                with pytest.raises(GatewayRefusedError) as caught:
                    await second.wait_connected()
            assert caught.value.status == 429
            assert caught.value.retry_after == 300.0
            assert "gave up after 1 attempts: HTTP 429" in caught.value.reason
