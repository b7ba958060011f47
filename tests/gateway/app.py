"""Entities, a service and helpers shared by the gateway tests."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import urlsplit

import attrs
import msgpack
import trio
from trio_websocket import WebSocketConnection, wrap_client_stream

import trio_cluster as tc
from trio_cluster.gateway import (
    JSON,
    Gateway,
    GatewayConfig,
    GatewayServer,
    Service,
    Session,
    Topic,
    current_client,
    expose,
    serve_gateway,
)


@attrs.frozen
class Add:
    amount: int


@attrs.frozen
class Wait:
    pass


@attrs.frozen
class Count:
    upto: int


@attrs.define(eq=False, kw_only=True)
class LimitExceededError(Exception):
    limit: int


class Counter(tc.Entity):
    type_name = "Counter"

    def __init__(self) -> None:
        self.value = 0

    @tc.rpc(errors=[LimitExceededError])
    async def add(self, msg: Add) -> int:
        if msg.amount > 100:
            raise LimitExceededError(limit=100)
        self.value += msg.amount
        return self.value

    @tc.rpc
    async def crash(self, msg: Add) -> int:
        raise RuntimeError("secret internals")

    @tc.rpc
    async def reset(self, msg: Add) -> int:  # never exposed
        self.value = 0
        return 0

    @tc.stream
    async def count(self, msg: Count) -> AsyncIterator[int]:
        for number in range(msg.upto):
            yield number


class Blocker(tc.Entity):
    """Its ``wait`` blocks until cancelled; ``calls`` counts them."""

    type_name = "Blocker"
    cancelled = 0

    @tc.rpc
    async def wait(self, msg: Wait) -> int:
        try:
            await trio.sleep_forever()
        finally:
            Blocker.cancelled += 1


class Whoami(Service):
    name = "whoami"

    @tc.rpc
    async def get(self, msg: None) -> str:
        return str(current_client().principal)


def gateway_definition(**config: Any) -> Gateway:
    return Gateway(
        entities=[expose(Counter, "add", "crash", "count"), expose(Blocker)],
        services=[Whoami()],
        config=GatewayConfig(**config),
    )


@asynccontextmanager
async def open_gateway(
    gateway: Gateway | None = None, **config: Any
) -> AsyncIterator[GatewayServer]:
    """A runner on memory storage with ``gateway`` served on 127.0.0.1."""
    async with (
        tc.open_runner(entities=[Counter, Blocker, Topic, Session]) as runner,
        trio.open_nursery() as nursery,
    ):
        server: GatewayServer = await nursery.start(
            serve_gateway,
            runner,
            gateway or gateway_definition(**config),
            "127.0.0.1",
            0,
        )
        yield server
        nursery.cancel_scope.cancel()


@asynccontextmanager
async def _first_error() -> AsyncIterator[None]:
    """Raise a nursery's single error (a refused upgrade) unwrapped."""
    try:
        yield
    except BaseExceptionGroup as group:
        if len(group.exceptions) == 1 and isinstance(group.exceptions[0], Exception):
            raise group.exceptions[0] from None
        raise


@asynccontextmanager
async def open_websocket(
    url: str, subprotocols: list[str], **options: Any
) -> AsyncIterator[WebSocketConnection]:
    """A bare WebSocket client whose TCP stream is closed at the end
    (trio-websocket leaves it open when the server closed first)."""
    parts = urlsplit(url)
    assert parts.hostname is not None
    assert parts.port is not None
    resource = parts.path + (f"?{parts.query}" if parts.query else "")
    stream = await trio.open_tcp_stream(parts.hostname, parts.port)
    try:
        async with _first_error(), trio.open_nursery() as nursery:
            ws = await wrap_client_stream(
                nursery,
                stream,
                parts.hostname,
                resource,
                subprotocols=subprotocols,
                **options,
            )
            try:
                yield ws
            finally:
                with trio.move_on_after(2):
                    await ws.aclose()
                nursery.cancel_scope.cancel()
    finally:
        await trio.aclose_forcefully(stream)


@asynccontextmanager
async def open_raw(
    url: str, subprotocol: str = JSON, **options: Any
) -> AsyncIterator[WebSocketConnection]:
    """A bare WebSocket to the gateway, its welcome frame read."""
    async with open_websocket(url, [subprotocol], **options) as ws:
        welcome = decode(await ws.get_message())
        assert welcome["t"] == "welcome"
        assert welcome["v"] == 1
        yield ws


def encode(frame: Any, subprotocol: str = JSON) -> bytes | str:
    if subprotocol == JSON:
        return json.dumps(frame)
    return msgpack.packb(frame)  # type: ignore[no-any-return]


def decode(message: bytes | str) -> Any:
    if isinstance(message, str):
        return json.loads(message)
    return msgpack.unpackb(message)


async def exchange(ws: WebSocketConnection, frame: Any, subprotocol: str = JSON) -> Any:
    """Send a frame, return the next frame that is not a ping."""
    await ws.send_message(encode(frame, subprotocol))
    while True:
        answer = decode(await ws.get_message())
        if answer["t"] != "ping":
            return answer


async def read_until_closed(ws: WebSocketConnection) -> None:
    """Read (and drop) frames until the socket closes (raises ConnectionClosed)."""
    while True:
        await ws.get_message()
