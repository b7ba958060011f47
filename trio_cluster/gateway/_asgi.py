"""`asgi_app`: the gateway as an ASGI application, for hypercorn's Trio
worker (Trio driver).

Theory of operation. The ASGI server (hypercorn) accepts TCP connections,
parses HTTP and speaks WebSocket; the application gets one call per
request with a scope and two coroutines, ``receive`` and ``send``. This
module maps them onto the same parts as `serve_gateway`:

* **lifespan**: at startup, the gateway's own tasks (heartbeats, topics)
  start in a nursery of the lifespan call; they stop at shutdown. The
  server must run the lifespan protocol (hypercorn does). Hypercorn tells
  the application nothing when it stops: `GatewayAsgiApp.aclose` closes
  the sockets with 1001 first;
* **http**: ``GET /gateway.js`` and the definition's pages; anything else
  is 404;
* **websocket**: the same steps as the accept loop, in order, each able to
  refuse with nothing the client sent processed: a connection slot, the
  connect rate of the client's address, the path, a subprotocol both sides
  speak, the authentication hook. A refusal is an HTTP response (the ASGI
  *WebSocket Denial Response* extension; hypercorn has it), or a close
  before the accept (an HTTP 403) on a server without it. Then the socket
  is accepted with its subprotocol and served by a `ClientConnection` over
  `AsgiSocket` (``receive``/``send`` as a `MessageSocket`).

The ASGI server owns the socket's bytes: its own limits apply first
(hypercorn's ``websocket_max_message_size``, 16 MiB by default); the
gateway's ``max_message_size`` closes the socket with 1009 after.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from contextlib import suppress
from typing import TYPE_CHECKING, Any

import trio
from trio_websocket import CloseReason, ConnectionClosed

from ._definition import resolve_routes
from ._http import Head
from ._protocol import CloseCode
from ._server import GatewayServer, handshake_of

if TYPE_CHECKING:
    from .._runner import Runner
    from ._definition import Gateway

__all__ = ["AsgiApp", "AsgiSocket", "GatewayAsgiApp", "asgi_app"]

Scope = Mapping[str, Any]
Message = Mapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Any], Awaitable[None]]
"""Takes an event (typed loosely: each server types its own events)."""
AsgiApp = Callable[[Scope, Receive, Send], Awaitable[None]]


class AsgiSocket:
    """An accepted ASGI WebSocket as a `MessageSocket`."""

    def __init__(self, receive: Receive, send: Send, max_message_size: int) -> None:
        self._receive = receive
        self._send = send
        self._max = max_message_size
        self._closed: CloseReason | None = None

    async def get_message(self) -> bytes | str:
        """The next message.

        Raises:
            ConnectionClosed: the client closed the socket (or it broke), or
                a message over ``max_message_size`` arrived (closed 1009).
        """
        if self._closed is not None:
            raise ConnectionClosed(self._closed)
        event = await self._receive()
        kind = event.get("type")
        if kind == "websocket.receive":
            text = event.get("text")
            data: bytes | str = text if text is not None else event.get("bytes") or b""
            if len(data) > self._max:
                await self.aclose(CloseCode.MESSAGE_TOO_BIG, "message too big")
                raise ConnectionClosed(CloseReason(CloseCode.MESSAGE_TOO_BIG, None))
            return data
        self._closed = CloseReason(int(event.get("code", 1005)), event.get("reason"))
        raise ConnectionClosed(self._closed)

    async def send_message(self, message: bytes | str) -> None:
        """Send one message.

        Raises:
            ConnectionClosed: the socket is closed.
        """
        if self._closed is not None:
            raise ConnectionClosed(self._closed)
        if isinstance(message, str):
            await self._send({"type": "websocket.send", "text": message})
        else:
            await self._send({"type": "websocket.send", "bytes": message})

    async def aclose(self, code: int = 1000, reason: str | None = None) -> None:
        """Send the close frame (once)."""
        if self._closed is not None:
            await trio.lowlevel.checkpoint()
            return
        self._closed = CloseReason(code, reason)
        with suppress(OSError):  # the client is gone already
            await self._send(
                {"type": "websocket.close", "code": code, "reason": reason or ""}
            )


class GatewayAsgiApp:
    """The ASGI application `asgi_app` returns."""

    def __init__(self, runner: Runner, gateway: Gateway) -> None:
        self._gateway = gateway
        routes = resolve_routes(runner, gateway)
        self.server = GatewayServer(runner, gateway, routes, "", 0)
        """Its `GatewayServer`: ``statistics()``, ``connections()``,
        ``render_metrics()``."""
        self._started = False

    async def aclose(self) -> None:
        """Close every socket with 1001 (going away) and wait, at most
        ``close_timeout``, for the clients; call it before stopping the
        ASGI server (which would otherwise cut the sockets without a close
        frame once its own graceful timeout is over). Sockets that open
        meanwhile are closed too. Cancellation: stops waiting."""
        await self.server.aclose()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "lifespan":
            await self._lifespan(receive, send)
        elif kind == "http":
            await self._http(scope, send)
        elif kind == "websocket":
            await self._websocket(scope, receive, send)
        else:
            await trio.lowlevel.checkpoint()

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        event = await receive()
        if event["type"] != "lifespan.startup":
            return
        server = self.server
        async with trio.open_nursery() as nursery:
            server.start_background(nursery)
            self._started = True
            await send({"type": "lifespan.startup.complete"})
            while (await receive())["type"] != "lifespan.shutdown":
                pass
            self._started = False
            await server.aclose()
            nursery.cancel_scope.cancel()
        await send({"type": "lifespan.shutdown.complete"})

    async def _http(self, scope: Scope, send: Send) -> None:
        answer = self.server.static(scope["path"])
        if answer is None or scope["method"] != "GET":
            await _respond(send, 404, b"not found\n", "text/plain; charset=utf-8", ())
            return
        body, content_type, headers = answer
        await _respond(send, 200, body, content_type, headers)

    async def _websocket(self, scope: Scope, receive: Receive, send: Send) -> None:
        server = self.server
        if not self._started:  # no lifespan: nothing runs the heartbeats
            await _refuse(scope, send, 503, "the gateway is not started", ())
            return
        slot = server.admission.admit()
        if slot is None:
            await _refuse(scope, send, 503, "too many connections", ())
            return
        try:
            await self._serve(server, scope, receive, send)
        finally:
            slot.release()

    async def _serve(
        self, server: GatewayServer, scope: Scope, receive: Receive, send: Send
    ) -> None:
        if (await receive())["type"] != "websocket.connect":
            await trio.lowlevel.checkpoint()
            return
        client = scope.get("client") or ("unknown", 0)
        remote = f"{client[0]}:{client[1]}"
        headers = {
            name.decode("latin-1").lower(): value.decode("latin-1")
            for name, value in scope.get("headers", ())
        }
        headers.setdefault("upgrade", "websocket")  # a websocket scope is one
        query = scope.get("query_string", b"").decode("latin-1")
        head = Head.from_parts("GET", scope["path"], query, headers)
        refusal = server.refusal(head, remote)
        if refusal is not None:
            status, reason, extra = refusal
            await _refuse(scope, send, status, reason, extra)
            return
        handshake = handshake_of(head, remote)
        principal, denied = await server.authenticate(handshake)
        if denied is not None:
            await _refuse(scope, send, denied[0], denied[1], ())
            return
        await send({"type": "websocket.accept", "subprotocol": handshake.subprotocol})
        config = self._gateway.config
        socket = AsgiSocket(receive, send, config.max_message_size)
        connection = server.connection_for(
            socket, handshake, principal, head.query.get("session")
        )
        await server.serve_connection(connection)


async def _respond(
    send: Send,
    status: int,
    body: bytes,
    content_type: str,
    headers: tuple[tuple[str, str], ...],
    *,
    prefix: str = "http.response",
) -> None:
    await send(
        {
            "type": f"{prefix}.start",
            "status": status,
            "headers": [
                (b"content-type", content_type.encode()),
                (b"content-length", str(len(body)).encode()),
                *((name.lower().encode(), value.encode()) for name, value in headers),
            ],
        }
    )
    await send({"type": f"{prefix}.body", "body": body})


async def _refuse(
    scope: Scope,
    send: Send,
    status: int,
    reason: str,
    headers: tuple[tuple[str, str], ...],
) -> None:
    """Refuse a WebSocket before its accept: an HTTP response with the
    denial extension, else a close (the server answers 403)."""
    if "websocket.http.response" in scope.get("extensions", {}):
        await _respond(
            send,
            status,
            f"{reason}\n".encode(),
            "text/plain; charset=utf-8",
            headers,
            prefix="websocket.http.response",
        )
    else:
        await send({"type": "websocket.close", "code": CloseCode.POLICY_VIOLATION})


def asgi_app(runner: Runner, gateway: Gateway) -> GatewayAsgiApp:
    """``gateway`` for ``runner`` as an ASGI 3 application: the same
    protocol, limits and hooks as `serve_gateway`, under an ASGI server
    running on Trio (hypercorn's Trio worker: ``pip install
    trio-cluster[asgi]``)::

        async with tc.open_runner(entities=[...]) as runner:
            config = hypercorn.config.Config()
            config.bind = ["0.0.0.0:8765"]
            app = asgi_app(runner, gateway)
            await hypercorn.trio.serve(app, config, shutdown_trigger=...)

    Before stopping the server, ``await app.aclose()`` closes the sockets
    with 1001 (reconnect elsewhere); hypercorn alone would cut them.

    The server must run the ASGI lifespan protocol: the gateway's tasks
    start at ``lifespan.startup`` (an invalid definition fails it:
    `ConfigError`); until the startup, sockets are refused (503).

    Raises:
        ConfigError, EntityDefinitionError: the definition cannot be served.

    Cancellation: each request's work is cancelled with it, as the server
    decides.
    """
    return GatewayAsgiApp(runner, gateway)
