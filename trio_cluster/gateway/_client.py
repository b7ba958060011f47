"""`open_gateway_client`: a Trio client of the gateway, with reconnect
(Trio driver, client side).

Theory of operation. The client keeps one socket up from a background task
(`GatewayClient._maintain`): connect and read the welcome frame within
``open_timeout``, then read frames until the socket ends, then wait a
jittered backoff delay (`Backoff`) and connect again. A refusal that will
not change by retrying (HTTP 400, 401, 403, 404) stops the client: calls
then raise `GatewayRefusedError`. A 429 waits at least its ``Retry-After``.
A server silent for ``ping_interval + ping_timeout`` (the values of its
welcome frame; it pings a quiet client every ``ping_interval``) is taken
for dead: the socket is dropped and the client reconnects.

Calls wait for a connection (bound them with a cancel scope). A call in
flight when the socket ends raises `GatewayDisconnectedError`: whether it
ran is unknown. Cancelling a call sends a ``cancel`` frame for it. Replies
decode to the handler's reply type, declared errors to their class (the
classes are read from the entity or service classes handed to
`GatewayClient.entities` / `GatewayClient.service`).
"""

from __future__ import annotations

import logging
import random
from contextlib import AbstractAsyncContextManager, asynccontextmanager, suppress
from typing import TYPE_CHECKING, Any, TypeAlias, TypeVar, cast
from urllib.parse import urlsplit

import attrs
import trio
from trio_websocket import ConnectionClosed, ConnectionRejected, wrap_client_stream

from .._entity import Entity
from .._errors import ConfigError
from ..serialization import make_converter
from ..transport._ws_connection import CONNECTION_ERRORS, describe
from ..transport._ws_outbox import Outbox, open_outbox, write_message
from ..transport._ws_tap import install_tap
from ._client_config import ClientConfig, ConnectionState
from ._definition import Service, client_routes
from ._errors import (
    GatewayCallError,
    GatewayDisconnectedError,
    GatewayRefusedError,
)
from ._handles import EntityHandles, Handle
from ._protocol import (
    PROTOCOL_VERSION,
    BadFrame,
    CloseCode,
    decode_frame,
    decode_frames,
    encode_frame,
)
from ._pushes import PushInbox, new_session, with_session
from ._subscriptions import ClientTopics, Subscription

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Awaitable, Callable, Sequence

    import cattrs
    from trio_websocket import WebSocketConnection

    from ._definition import Route

    Connect: TypeAlias = Callable[[str, int], Awaitable[trio.abc.Stream]]
    """Opens the byte stream to a gateway's ``host`` and ``port``."""

__all__ = ["ClientConfig", "ConnectionState", "GatewayClient", "open_gateway_client"]

log = logging.getLogger("trio_cluster.gateway.client")

E = TypeVar("E", bound=Entity)
S = TypeVar("S", bound=Service)

_PERMANENT = frozenset({400, 401, 403, 404})
"""HTTP refusals a retry cannot cure."""


class _Pending:
    """A call waiting for its reply, or a stream for its items."""

    def __init__(self, route: Route | None, *, stream: bool) -> None:
        self.route = route
        self.done = trio.Event()
        self.frame: dict[str, Any] | None = None
        self.items: (
            tuple[
                trio.MemorySendChannel[dict[str, Any]],
                trio.MemoryReceiveChannel[dict[str, Any]],
            ]
            | None
        ) = trio.open_memory_channel[dict[str, Any]](1 << 20) if stream else None


class GatewayClient(ClientTopics):
    """A client of one gateway (made by `open_gateway_client`)."""

    def __init__(
        self,
        url: str,
        config: ClientConfig,
        headers: Sequence[tuple[str, str]],
        converter: cattrs.Converter,
        rng: random.Random,
        connect: Connect | None = None,
    ) -> None:
        self._url = url
        self._connect: Connect = connect or trio.open_tcp_stream
        self._config = config
        self._headers = [(name.encode(), value.encode()) for name, value in headers]
        self._converter = converter
        self._rng = rng
        self._routes: dict[str, Route] = {}
        self._ws: WebSocketConnection | None = None
        self._connected = trio.Event()
        self._next_id = 0
        self._pending: dict[int, _Pending] = {}
        self._subscriptions: dict[str, Subscription] = {}
        self._state = ConnectionState(False, None, 0, None, 0, None)
        self._fatal: GatewayRefusedError | None = None
        self._opened = 0
        self._welcome: dict[str, Any] = {}
        self._silence: tuple[trio.CancelScope, float] = (trio.CancelScope(), 0.0)
        """The scope of the socket being read, cancelled when the server
        has been silent too long, and how long that is."""
        self._ending: tuple[int, str] | None = None
        self._closing: trio.Event | None = None
        """Set once the client's own close handshake is over."""
        self._outbox: Outbox | None = None
        """The current socket's `Outbox` (writes that never wait)."""
        self._retry_after = 0.0
        """Seconds a 429's ``Retry-After`` asks to wait at least."""
        self._refusal: GatewayRefusedError | None = None
        """The last attempt's HTTP refusal (None: it failed otherwise)."""
        self.pushes = PushInbox(self._send)
        """The pushes of the client's session (``async for push in
        client.pushes``: each once, acked when taken)."""

    @property
    def state(self) -> ConnectionState:
        return self._state

    async def wait_connected(self) -> None:
        """Wait until a socket is up.

        Raises:
            GatewayRefusedError: the client gave up (see the module
                docstring). After ``max_attempts`` failed attempts, its
                ``status`` is the last attempt's HTTP status if it was
                refused (429 with ``retry_after``, say), else 0.

        Cancellation: stops waiting (the client keeps connecting).
        """
        if self._fatal is not None:
            raise self._fatal
        await self._connected.wait()
        if self._fatal is not None:
            raise self._fatal

    # ------------------------------------------------------------------
    # Typed handles

    def entities(self, cls: type[E]) -> EntityHandles[E]:
        """Typed handles on entities of ``cls``: ``client.entities(Counter)("a").increment(msg)``.

        Raises:
            ConfigError, EntityDefinitionError: ``cls`` cannot be encoded.
        """
        self._learn(cls)
        return EntityHandles(self, cls)

    def service(self, cls: type[S]) -> S:
        """A typed handle on a service: ``client.service(Clock).now(msg)``."""
        self._learn(cls)
        return cast("S", Handle(self, cls, None))

    def _learn(self, cls: type) -> None:
        self._routes.update(client_routes([cls], self._converter))

    # ------------------------------------------------------------------
    # Calls

    async def call(self, op: str, message: Any, *, key: str | None = None) -> Any:
        """Call operation ``op`` (``"Counter.increment"``) with ``message``
        as plain data (what JSON or msgpack carries: dicts, lists, strings,
        numbers); the reply is plain data too. Typed handles (`entities`,
        `service`) encode messages from their classes and decode replies
        and declared errors.

        Raises:
            GatewayCallError: refused, or an error of the handler (a
                declared one has ``code == "declared"`` here).
            GatewayDisconnectedError: the socket closed before the reply.
            GatewayRefusedError: the client gave up connecting.

        Cancellation: a ``cancel`` frame is sent; the server cancels the call.
        """
        return await self._call(None, op, key, message)

    def stream(
        self, op: str, message: Any, *, key: str | None = None, credit: int = 16
    ) -> AbstractAsyncContextManager[AsyncIterator[Any]]:
        """Open a stream: ``async with client.stream(op, msg) as items:``,
        plain data both ways (see `call`). The server sends at most
        ``credit`` items ahead of what was read.

        Raises:
            as `call`, from the iteration.

        Cancellation: leaving the block early cancels the stream's handler.
        """
        return self._stream(None, op, key, message, credit)

    async def _call(
        self, route: Route | None, op: str, key: str | None, message: Any
    ) -> Any:
        pending = _Pending(route, stream=False)
        request_id = await self._request("call", op, key, message, pending)
        try:
            await pending.done.wait()
        except trio.Cancelled:
            if self._pending.pop(request_id, None) is not None:
                await self._cancel(request_id)
            raise
        frame = pending.frame
        assert frame is not None
        return self._result(frame, route)

    @asynccontextmanager
    async def _stream(
        self, route: Route | None, op: str, key: str | None, message: Any, credit: int
    ) -> AsyncIterator[AsyncIterator[Any]]:
        pending = _Pending(route, stream=True)
        request_id = await self._request(
            "stream", op, key, message, pending, credit=credit
        )
        assert pending.items is not None
        receive = pending.items[1]

        async def items() -> AsyncIterator[Any]:
            read = 0
            async for frame in receive:
                if frame["t"] == "end":
                    return
                if frame["t"] != "item":
                    self._result(frame, route)  # raises
                read += 1
                if read >= max(1, credit // 2):
                    await self._send({"t": "credit", "id": request_id, "n": read})
                    read = 0
                yield self._result(frame, route)

        try:
            yield items()
        finally:
            if self._pending.pop(request_id, None) is not None:
                await self._cancel(request_id)

    def _new_id(self) -> int:
        self._next_id += 1
        return self._next_id

    async def _exchange(self, frame: dict[str, Any]) -> Any:
        """Send a request frame (its id is added) and wait for its reply's
        value.

        Raises:
            GatewayCallError, GatewayDisconnectedError: as `call`.
        """
        pending = _Pending(None, stream=False)
        request_id = await self._submit(frame, pending)
        try:
            await pending.done.wait()
        except trio.Cancelled:
            self._pending.pop(request_id, None)
            raise
        assert pending.frame is not None
        return self._result(pending.frame, None)

    async def _request(
        self,
        kind: str,
        op: str,
        key: str | None,
        message: Any,
        pending: _Pending,
        **extra: Any,
    ) -> int:
        route = pending.route
        msg = message if route is None else route.message.unstructure(message)
        frame = {"t": kind, "op": op, "msg": msg, **extra}
        if key is not None:
            frame["key"] = key
        return await self._submit(frame, pending)

    async def _submit(self, frame: dict[str, Any], pending: _Pending) -> int:
        """Send a request frame with a new id, once a socket is up, and
        register ``pending`` for its answer; the id.

        Raises:
            GatewayDisconnectedError: the socket closed during the write.
            GatewayRefusedError: the client gave up connecting.
        """
        request_id = self._new_id()
        message = encode_frame({**frame, "id": request_id}, self._config.subprotocol)
        while True:
            await self.wait_connected()
            ws = self._ws
            if ws is None:
                continue
            self._pending[request_id] = pending
            try:
                await self._write(ws, message)
            except CONNECTION_ERRORS as exc:
                self._pending.pop(request_id, None)
                raise GatewayDisconnectedError(
                    code=1006, reason=describe(exc)
                ) from None
            return request_id

    async def _write(self, ws: WebSocketConnection, data: bytes | str) -> None:
        """Write one message: over TCP into the socket's `Outbox`, from this
        task and without a lock, once what waits in it is written out; else
        with trio-websocket's ``send_message``.

        Raises:
            CONNECTION_ERRORS: the socket is closed or broken.
        """
        outbox = self._outbox
        if outbox is None:
            await ws.send_message(data)
            return
        if outbox.backlog:
            await outbox.wait_drained()
        else:
            await trio.lowlevel.checkpoint()
        write_message(ws, outbox, data)

    async def _send(self, frame: dict[str, Any]) -> None:
        ws = self._ws
        if ws is None:
            await trio.lowlevel.checkpoint()
            return
        # A socket ending: its reader fails the requests.
        with suppress(*CONNECTION_ERRORS):
            await self._write(ws, encode_frame(frame, self._config.subprotocol))

    async def _cancel(self, request_id: int) -> None:
        with (
            trio.CancelScope(shield=True),
            trio.move_on_after(self._config.close_timeout),
        ):
            await self._send({"t": "cancel", "id": request_id})

    def _result(self, frame: dict[str, Any], route: Route | None) -> Any:
        kind = frame["t"]
        if kind in ("reply", "item"):
            value = frame.get("v")
            return value if route is None else route.reply.structure(value)
        if kind == "closed":
            raise GatewayDisconnectedError(code=frame["code"], reason=frame["reason"])
        code = str(frame.get("code"))
        type_name = frame.get("type")
        if code == "declared" and route is not None and isinstance(type_name, str):
            declared = route.errors.get(type_name)
            if declared is not None:
                raise declared[1].structure(frame.get("data"))
        raise GatewayCallError(
            code=code,
            message=str(frame.get("message", "")),
            type_name=type_name if isinstance(type_name, str) else None,
        )

    # ------------------------------------------------------------------
    # The connection

    async def _maintain(self) -> None:
        """Keep a socket up: connect, serve, back off, again."""
        config = self._config
        failures = 0
        while True:
            error = await self._connect_and_serve()
            if self._fatal is None and error:
                failures += 1
                if config.max_attempts is not None and failures >= config.max_attempts:
                    refusal = self._refusal
                    self._fatal = GatewayRefusedError(
                        status=0 if refusal is None else refusal.status,
                        reason=f"gave up after {failures} attempts: {error}",
                        retry_after=None if refusal is None else refusal.retry_after,
                    )
            elif not error:
                failures = 0
            if self._fatal is not None:
                self._connected.set()  # wake the waiters: they raise
                return
            delay = config.reconnect.delay(max(failures - 1, 0), self._rng.random())
            await trio.sleep(max(delay, self._retry_after))
            self._retry_after = 0.0

    async def _connect_and_serve(self) -> str:
        """One socket: ``""`` if it was up and ended, else why it failed.

        trio-websocket raises a refused upgrade from its reader task (in
        the nursery), and leaves the TCP stream open when the server closed
        first: the stream is opened and closed here.
        """
        failed_before = self._state.failed_attempts
        self._refusal = None
        streams: list[trio.abc.Stream] = []
        failure: list[str] = []
        try:
            async with trio.open_nursery() as nursery:
                ws = await self._open(nursery, streams)
                if ws is None:
                    failure.append("no welcome frame in time")
                else:
                    await self._serve(ws, nursery)
                nursery.cancel_scope.cancel()
        except* ConnectionRejected as group:
            failure.append(self._rejected(group.exceptions[0]))  # type: ignore[arg-type]
        except* BadFrame as group:
            failure.append(str(group.exceptions[0]))
        except* CONNECTION_ERRORS as group:
            failure.append(describe(group))
        finally:
            for stream in streams:
                await trio.aclose_forcefully(stream)
        if not failure:
            return ""
        return self._failed(failure[0], failed_before)

    async def _open(
        self, nursery: trio.Nursery, streams: list[trio.abc.Stream]
    ) -> WebSocketConnection | None:
        """Connect, upgrade and read the welcome frame within
        ``open_timeout``; None if that took too long."""
        config = self._config
        parts = urlsplit(self._url)
        if parts.scheme != "ws" or parts.hostname is None:
            raise ConfigError(
                f"a gateway URL is ws://host:port/path, got {self._url!r}"
            )
        resource = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        with trio.move_on_after(config.open_timeout):
            stream = await self._connect(parts.hostname, parts.port or 80)
            streams.append(stream)
            outbox = open_outbox(nursery, stream)
            self._outbox = outbox if isinstance(outbox, Outbox) else None
            ws = await wrap_client_stream(
                nursery,
                outbox,  # type: ignore[arg-type]  # any trio Stream works
                parts.netloc,
                resource,
                subprotocols=[config.subprotocol],
                extra_headers=self._headers,
                max_message_size=config.max_message_size,
            )
            welcome = decode_frame(await ws.get_message(), config.subprotocol)
            if welcome.get("t") != "welcome":
                raise BadFrame(CloseCode.INVALID_PAYLOAD, "no welcome frame first")
            if welcome.get("v") != PROTOCOL_VERSION:
                raise BadFrame(
                    CloseCode.INVALID_PAYLOAD,
                    f"protocol version {welcome.get('v')!r:.20}, expected"
                    f" {PROTOCOL_VERSION}",
                )
            self._welcome = welcome
            return ws
        return None

    async def _serve(self, ws: WebSocketConnection, nursery: trio.Nursery) -> None:
        """Read the socket until it ends, then fail the requests in flight.
        The subscriptions subscribe again meanwhile (in ``nursery``)."""
        welcome = self._welcome
        self._ws = ws
        self._opened += 1
        self._state = ConnectionState(
            True,
            self._state.last_error,
            self._opened - 1,
            trio.current_time(),
            0,
            str(welcome.get("id")),
        )
        self._connected.set()
        if self._subscriptions:
            nursery.start_soon(self._resubscribe_all)
        silence = float(welcome.get("ping_interval", 25.0)) + float(
            welcome.get("ping_timeout", 10.0)
        )
        code, reason = await self._read(ws, silence)
        if self._closing is not None:
            await self._closing.wait()
        self._ws = None
        self._connected = trio.Event()
        self._state = attrs.evolve(
            self._state, connected=False, last_error=f"closed ({code}: {reason})"
        )
        for request_id, pending in list(self._pending.items()):
            del self._pending[request_id]
            self._finish(pending, {"t": "closed", "code": code, "reason": reason})
        if code == CloseCode.HEARTBEAT_TIMEOUT:
            return  # a dead server answers no close frame: drop the socket now
        with (
            trio.move_on_after(self._config.close_timeout),
            suppress(*CONNECTION_ERRORS),
        ):
            await ws.aclose()

    def _rejected(self, exc: ConnectionRejected) -> str:
        status = exc.status_code
        body = (exc.body or b"").decode(errors="replace").strip()
        if status in _PERMANENT:
            self._fatal = GatewayRefusedError(status=status, reason=body)
        elif status == 429:
            headers = {name.lower(): value for name, value in exc.headers or ()}
            try:
                self._retry_after = float(headers.get(b"retry-after", b"1"))
            except ValueError:
                self._retry_after = 1.0
        self._refusal = GatewayRefusedError(
            status=status,
            reason=body,
            retry_after=self._retry_after if status == 429 else None,
        )
        return f"HTTP {status} {body}"

    def _failed(self, error: str, failed_before: int) -> str:
        self._state = attrs.evolve(
            self._state,
            connected=False,
            last_error=error,
            failed_attempts=failed_before + 1,
        )
        log.debug("gateway connection to %s failed: %s", self._url, error)
        return error

    async def _read(self, ws: WebSocketConnection, silence: float) -> tuple[int, str]:
        """Handle the socket's frames until it ends: the close code and
        reason (4000 if the server was silent for ``silence`` seconds).
        Frames are handled in trio-websocket's reader task (`install_tap`):
        a reply wakes its caller, and no other task."""
        self._ending = None
        with trio.CancelScope(deadline=trio.current_time() + silence) as scope:
            self._silence = (scope, silence)
            try:
                tap = install_tap(ws, self._deliver)
                if tap is not None:
                    await tap.run()
                else:  # pragma: no cover - another trio-websocket
                    while await self._deliver(await ws.get_message()):
                        pass
            except ConnectionClosed as exc:
                reason = exc.reason
                if reason is None:
                    return 1006, "connection lost"
                return reason.code, reason.reason or reason.name
        return self._ending_or_silence()

    async def _close(self) -> None:
        """Close the socket, if one is up, with 1000 (bounded by
        ``close_timeout``)."""
        ws = self._ws
        if ws is None:
            await trio.lowlevel.checkpoint()
            return
        # The socket's reader must live until the server's answer arrives:
        # `_serve` waits for this before its nursery is cancelled.
        self._closing = trio.Event()
        try:
            with (
                trio.move_on_after(self._config.close_timeout),
                suppress(*CONNECTION_ERRORS),
            ):
                await ws.aclose(1000, "client closed")
        finally:
            self._closing.set()

    def _ending_or_silence(self) -> tuple[int, str]:
        """Why `_read`'s scope was cancelled: a bad frame, else silence."""
        return self._ending or (4000, "heartbeat timeout: the server was silent")

    async def _deliver(self, message: bytes | str) -> bool:
        """Handle one frame (in trio-websocket's reader task); False if it
        ends the socket."""
        scope, silence = self._silence
        scope.deadline = trio.current_time() + silence
        try:
            frames = decode_frames(message, self._config.subprotocol)
        except BadFrame as exc:
            self._ending = (1007, exc.reason)
            scope.cancel()
            return False
        for frame in frames:
            await self._received(frame)
        return True

    async def _received(self, frame: dict[str, Any]) -> None:
        kind = frame["t"]
        if kind == "ping":
            await self._send({"t": "pong"})
            return
        await trio.lowlevel.checkpoint()
        if kind == "push":
            await self.pushes.deliver(frame)
            return
        if kind in ("pub", "presence"):
            subscription = self._subscriptions.get(frame.get("topic"))  # type: ignore[arg-type]
            if subscription is not None:
                subscription.deliver(frame)
            return
        request_id = frame.get("id")
        pending = self._pending.get(request_id) if isinstance(request_id, int) else None
        if pending is None:
            return  # a reply to a call given up, a pong, a frame of a newer protocol
        if kind != "item":
            del self._pending[request_id]  # type: ignore[arg-type]
        self._finish(pending, frame)

    @staticmethod
    def _finish(pending: _Pending, frame: dict[str, Any]) -> None:
        if pending.items is not None:
            send = pending.items[0]
            with suppress(trio.WouldBlock, trio.BrokenResourceError):
                send.send_nowait(frame)
            if frame["t"] != "item":
                send.close()
            return
        pending.frame = frame
        pending.done.set()


@asynccontextmanager
async def open_gateway_client(
    url: str,
    *,
    config: ClientConfig | None = None,
    token: str | None = None,
    headers: Sequence[tuple[str, str]] = (),
    converter: cattrs.Converter | None = None,
    rng: random.Random | None = None,
    session: str | None = None,
    connect: Connect | None = None,
) -> AsyncIterator[GatewayClient]:
    """A client of the gateway at ``url`` (``ws://host:port/ws``), kept
    connected in the background for the block.

    Args:
        config: subprotocol, open timeout, reconnect backoff.
        token: sent as ``Authorization: Bearer <token>``.
        headers: more request headers.
        converter: the converter of the message classes (the default
            `make_converter()` otherwise; use the runner's if you registered
            hooks on it).
        rng: the jitter's random source (tests pass a seeded one).
        session: the session's token (16-64 of ``A-Z a-z 0-9 _ -``; a
            random one by default), sent as ``?session=`` on every connect:
            `send_reliable` reaches the client through it
            (``client.pushes``), across reconnects to any gateway.
        connect: ``await connect(host, port)`` opens the byte stream of
            each attempt (`trio.open_tcp_stream` by default): a stream of
            your own (a proxy, a choice among several gateways), or
            `trio_cluster.testing.MemoryGateways.connect` in tests. What it
            raises (`OSError`, `trio.BrokenResourceError`) is a failed
            attempt, retried with the backoff.

    On exit the acks of the pushes taken are sent, then the socket is
    closed with 1000, each waiting at most ``close_timeout`` (also when the
    block is cancelled); calls still waiting are cancelled.
    """
    config = config or ClientConfig()
    all_headers = list(headers)
    if token is not None:
        all_headers.append(("Authorization", f"Bearer {token}"))
    url = with_session(url, session or new_session())
    client = GatewayClient(
        url,
        config,
        all_headers,
        converter or make_converter(),
        rng or random.Random(),
        connect,
    )
    async with trio.open_nursery() as nursery:
        nursery.start_soon(client._maintain)
        nursery.start_soon(client.pushes.send_acks)
        try:
            yield client
        finally:
            client.pushes.close()
            with trio.CancelScope(shield=True):
                # The acks of the pushes taken, then the close handshake.
                with trio.move_on_after(config.close_timeout):
                    await client.pushes.flush()
                await client._close()
            nursery.cancel_scope.cancel()
