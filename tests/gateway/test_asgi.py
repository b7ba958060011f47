"""The gateway under hypercorn's Trio worker (`asgi_app`), on 127.0.0.1:
calls, a topic with presence, an acked push, the JavaScript module over
HTTP, refusals as HTTP statuses, a bad message closing only its socket,
and the sockets closed with 1001 at shutdown."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
import pytest
import trio
from hypercorn.config import Config
from hypercorn.trio import serve
from trio_websocket import ConnectionClosed, ConnectionRejected

import trio_cluster as tc
from trio_cluster.gateway import (
    JSON,
    Gateway,
    GatewayAsgiApp,
    Handshake,
    Session,
    Topic,
    UnauthorizedError,
    asgi_app,
    expose,
    open_gateway_client,
    publish,
    send_reliable,
)

from .app import Add, Counter, exchange, open_raw, open_websocket, read_until_closed

SESSION = "asgi-session-0123456789"


async def by_token(handshake: Handshake) -> object:
    await trio.lowlevel.checkpoint()
    token = handshake.query.get("token") or handshake.headers.get("authorization")
    if token is None:
        raise UnauthorizedError(reason="who are you?", status=401)
    return token.removeprefix("Bearer ")


GATEWAY = Gateway(
    entities=[expose(Counter, "add")],
    authenticate=by_token,
    topics=lambda name: name.startswith("room:"),
    presence=lambda client, topic: {"user": client.principal},
    sessions=True,
    user=str,
)


@asynccontextmanager
async def open_hypercorn(
    app: GatewayAsgiApp,
) -> AsyncIterator[tuple[str, trio.Event]]:
    """``app`` served by hypercorn; its host:port and a shutdown trigger."""
    config = Config()
    config.bind = ["127.0.0.1:0"]
    config.graceful_timeout = 2.0
    config.accesslog = None
    shutdown = trio.Event()
    async with trio.open_nursery() as nursery:
        binds = await nursery.start(
            lambda task_status: serve(
                app,
                config,
                shutdown_trigger=shutdown.wait,
                task_status=task_status,
            )
        )
        yield binds[0].removeprefix("http://"), shutdown
        shutdown.set()


async def test_the_gateway_under_hypercorn() -> None:
    with trio.fail_after(60):
        async with (
            tc.open_runner(entities=[Counter, Topic, Session]) as runner,
            open_hypercorn(app := asgi_app(runner, GATEWAY)) as (host, shutdown),
        ):
            url = f"ws://{host}/ws"
            async with (
                open_gateway_client(url, token="ada", session=SESSION) as client,
                client.subscribe("room:1", presence=True) as room,
            ):
                assert await client.entities(Counter)("a").add(Add(2)) == 2
                assert room.presence is not None
                assert list(room.presence.values()) == [{"user": "ada"}]
                await publish(runner, "room:1", "hello")
                publication = await anext(aiter(room))
                assert publication.data == "hello"

                async def take() -> None:
                    push = await anext(aiter(client.pushes))
                    assert push.data == {"n": 1}

                async with trio.open_nursery() as nursery:
                    nursery.start_soon(take)
                    assert await send_reliable(runner, SESSION, {"n": 1}) == 1

            async with httpx.AsyncClient() as http:
                script = await http.get(f"http://{host}/gateway.js")
                assert script.status_code == 200
                assert "export class GatewayClient" in script.text
                assert (await http.get(f"http://{host}/nothing")).status_code == 404

            # Refusals are HTTP statuses (the denial response extension).
            with pytest.raises(ConnectionRejected) as caught:
                async with open_websocket(url, [JSON]):
                    pass
            assert caught.value.status_code == 401
            with pytest.raises(ConnectionRejected) as caught:
                async with open_websocket(f"ws://{host}/elsewhere?token=x", [JSON]):
                    pass
            assert caught.value.status_code == 404

            # A message that is not JSON closes its socket only.
            async with (
                open_raw(f"{url}?token=bob") as good,
                open_raw(f"{url}?token=eve") as bad,
            ):
                await bad.send_message("{not json")
                with pytest.raises(ConnectionClosed) as closed:
                    await read_until_closed(bad)
                assert closed.value.reason is not None
                assert closed.value.reason.code == 1007
                frame = {"t": "call", "id": 1, "op": "Counter.add", "key": "a"}
                answer = await exchange(good, {**frame, "msg": {"amount": 1}})
                assert answer == {"t": "reply", "id": 1, "v": 3}

                assert app.server.statistics().connections == 1  # the bad one closed
                # Shutdown: the socket is closed with 1001.
                await app.aclose()
                with pytest.raises(ConnectionClosed) as closed:
                    await read_until_closed(good)
                assert closed.value.reason is not None
                assert closed.value.reason.code == 1001
                shutdown.set()
