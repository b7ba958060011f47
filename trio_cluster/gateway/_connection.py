"""One client's socket on the gateway, after its upgrade (Trio driver).

Theory of operation. `ClientConnection.run` is the socket's task; all its
work runs in one nursery under the connection's own cancel scope, so ending
the connection (`ClientConnection.end`, the first reason wins) cancels
exactly its work and nothing else:

* the *reader* (the task itself) takes each message, counts it against the
  socket's message rate (`TokenBucket.try_take`; over it: close 4008; an
  ack of pushes the socket was sent and still owes is not counted: their
  number is bounded by the pushes),
  tells the heartbeats the client is alive, decodes it (unreadable: close
  with `BadFrame`'s code) and dispatches it by kind. A readable frame that
  is wrong is answered with an error frame and the socket stays up;
* each request (call or stream) is a task with its own cancel scope, kept
  by request id while it runs: a ``cancel`` frame cancels that scope only,
  and is answered ``cancelled``. At most ``max_concurrent_requests`` run at
  once; one more is refused (``too_many_requests``), so the reader never
  waits for a request;
* the *writer* drains the bounded send queue. A frame that finds the queue
  full, or a write that takes over ``send_timeout``, closes the socket with
  4001 (slow consumer): a client that stops reading costs a bounded queue,
  then nothing;
* pings come from the server's one heartbeat structure
  (`trio_cluster._core._heartbeat`), never from a task of this socket.

Frames are encoded once, in the task that makes them. Cancellation: the
socket's work is cancelled, then the close frame is sent (bounded by
``close_timeout``).
"""

from __future__ import annotations

import contextvars
import logging
from functools import partial
from typing import TYPE_CHECKING, Any, Final, Protocol

import attrs
import trio
from trio_websocket import ConnectionClosed, WebSocketConnection

from .._core._addresses import EntityId
from .._core._link_quality import LinkQuality
from .._core._ratelimit import TokenBucket
from ..transport._ws_connection import CONNECTION_ERRORS, close_reason_text, describe
from ..transport._ws_outbox import Outbox, write_message
from ..transport._ws_tap import install_tap
from ._client_info import ClientInfo, current_info
from ._definition import Operation
from ._protocol import (
    Ack,
    BadFrame,
    Call,
    Cancel,
    CloseCode,
    Credit,
    ErrorCode,
    FrameError,
    ListPresence,
    OpenStream,
    Ping,
    Pong,
    Subscribe,
    Unsubscribe,
    decode_frames,
    encode_frame,
    error_frame,
    join_frames,
    parse_client_frame,
)
from ._requests import StreamCredit, admit, failure_frame
from ._statistics import ConnectionStatistics
from ._topics import Position

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from .._log_limit import LogLimiter
    from ._definition import GatewayConfig, Route
    from ._hub import TopicAccess
    from ._sessions import Pushed, SessionLink
    from ._statistics import GatewayCounters

__all__ = ["ClientConnection", "MessageSocket"]

log = logging.getLogger("trio_cluster.gateway")


class MessageSocket(Protocol):
    """What a connection needs of its WebSocket: trio-websocket's
    `WebSocketConnection`, or the ASGI server's socket (`asgi_app`)."""

    async def get_message(self) -> bytes | str:
        """The next message.

        Raises:
            ConnectionClosed: the socket closed.
        """
        ...

    async def send_message(self, message: bytes | str) -> None: ...

    async def aclose(self, code: int = 1000, reason: str | None = None) -> None: ...


_MAX_OWED: Final = 4096
"""Pushes a socket remembers as owed an ack (more: the oldest are
forgotten, and their late acks count against the message rate)."""


@attrs.define
class _Ending:
    code: int
    reason: str


class ClientConnection:
    """One upgraded socket (see the module docstring)."""

    def __init__(
        self,
        ws: MessageSocket,
        info: ClientInfo,
        *,
        number: int,
        routes: dict[str, Route],
        config: GatewayConfig,
        authorize: Callable[[object, Operation], Any] | None,
        counters: GatewayCounters,
        warnings: LogLimiter,
        seen: Callable[[int], None],
        outbox: Outbox | None = None,
        topics: TopicAccess | None = None,
        session: SessionLink | None = None,
        user: str | None = None,
    ) -> None:
        self.ws = ws
        self.info = info
        self.number = number
        self._routes = routes
        self._config = config
        self._authorize = authorize
        self._counters = counters
        self._warnings = warnings
        self._seen = seen
        self._direct: tuple[WebSocketConnection, Outbox] | None = (
            (ws, outbox)
            if outbox is not None and isinstance(ws, WebSocketConnection)
            else None
        )
        """The socket and its `Outbox`, over plain TCP (writes never wait)."""
        self._topics = topics
        self._session = session
        """Its link to its session's entity (None: no session)."""
        self._user = user
        self._owed: dict[tuple[str, int], None] = {}
        """Pushes sent and not acked yet (epoch, seq), oldest first."""
        self._scope = trio.CancelScope()
        self._nursery: trio.Nursery | None = None
        self._requests: dict[int, trio.CancelScope] = {}
        self._credits: dict[int, StreamCredit] = {}
        self._send_channel, self._receive_channel = trio.open_memory_channel[
            bytes | str
        ](config.send_queue)
        rate = config.message_rate
        self._bucket = None if rate is None else TokenBucket(rate, trio.current_time())
        self.ending: _Ending | None = None
        self.frames_received = 0
        self.frames_sent = 0
        self.errors = 0
        self.rtt: float | None = None
        """Round-trip time of the last ping answered, in seconds."""
        self.link = LinkQuality()
        """The round trips' average and the link's quality."""
        self._ping_sent_at: float | None = None
        self._context = contextvars.copy_context()

    # ------------------------------------------------------------------
    # Lifecycle

    def end(self, code: int, reason: str) -> None:
        """End the connection with ``code`` (the first reason wins): its
        work is cancelled, then `run` sends the close frame."""
        if self.ending is None:
            self.ending = _Ending(code, reason)
            self._counters.closed(code)
        self._scope.cancel()

    async def run(self) -> None:
        """Serve the socket until the client closes it or `end` is called;
        then close it (bounded by ``close_timeout``).

        Cancellation: the work is cancelled; the close frame is not sent.
        """
        token = current_info.set(self.info)
        # Requests start from trio-websocket's reader task (`_deliver`): in
        # this task's context, so that they see `current_client`.
        self._context = contextvars.copy_context()
        try:
            with self._scope:
                async with trio.open_nursery() as nursery:
                    self._nursery = nursery
                    nursery.start_soon(self._write)
                    if self._session is not None:
                        nursery.start_soon(
                            self._session.run, self._user, self._push, self._detached
                        )
                    await self._read()
                    nursery.cancel_scope.cancel()
        finally:
            current_info.reset(token)
            if self._topics is not None:
                self._topics.hub.forget(self)
            self._warnings.flush(self.info.remote)
        ending = self.ending
        if ending is not None:
            with trio.move_on_after(self._config.close_timeout):
                try:
                    await self.ws.aclose(ending.code, close_reason_text(ending.reason))
                except CONNECTION_ERRORS as exc:
                    log.debug("closing %s: %s", self.info.remote, describe(exc))

    def statistics(self) -> ConnectionStatistics:
        """A snapshot of this socket's traffic."""
        info = self.info
        return ConnectionStatistics(
            id=info.id,
            remote=info.remote,
            subprotocol=info.subprotocol,
            frames_received=self.frames_received,
            frames_sent=self.frames_sent,
            errors=self.errors,
            requests_in_flight=len(self._requests),
            send_queue=self._send_channel.statistics().current_buffer_used,
            rtt=self.rtt,
            rtt_average=self.link.average,
            quality=self.link.quality,
        )

    def ping(self) -> None:
        """Send a ping frame (the heartbeats found the client quiet)."""
        self._ping_sent_at = trio.current_time()
        self._send({"t": "ping"})

    def send_welcome(self) -> None:
        config = self._config
        frame = {
            "t": "welcome",
            "v": 1,
            "id": self.info.id,
            "ping_interval": config.ping_interval,
            "ping_timeout": config.ping_timeout,
            "max_message_size": config.max_message_size,
        }
        if self._session is not None:
            frame["session"] = self._session.name
        self._send(frame)

    def _push(self, pushed: Pushed) -> None:
        """A push of the socket's session: to the client."""
        owed = self._owed
        owed[(pushed.epoch, pushed.seq)] = None
        if len(owed) > _MAX_OWED:  # pushes never acked (given up by now)
            del owed[next(iter(owed))]
        self._send(
            {"t": "push", "epoch": pushed.epoch, "seq": pushed.seq, "data": pushed.data}
        )

    def _owed_ack(self, frame: dict[str, Any]) -> bool:
        """Whether ``frame`` acks only pushes this socket was sent and did
        not ack yet: such acks are not counted against the message rate
        (their number is bounded by the pushes)."""
        if frame["t"] != "ack" or not self._owed:
            return False
        epoch, seqs = frame.get("epoch"), frame.get("seqs")
        return (
            isinstance(epoch, str)
            and isinstance(seqs, list)
            and 0 < len(seqs) <= len(self._owed)
            and all(isinstance(seq, int) and (epoch, seq) in self._owed for seq in seqs)
        )

    def _detached(self, reason: str) -> None:
        self.end(CloseCode.SESSION_DETACHED, reason)

    # ------------------------------------------------------------------
    # Reading

    async def _read(self) -> None:
        """Hand every message to `_deliver` until the client closes the
        socket or a message ends the connection. Messages are handled in
        trio-websocket's own reader task (`install_tap`): no task wakes per
        message."""
        ws = self.ws
        try:
            tap = (
                install_tap(ws, self._deliver)
                if isinstance(ws, WebSocketConnection)
                else None
            )
            if tap is not None:
                await tap.run()
            else:  # the ASGI server's socket
                while await self._deliver(await ws.get_message()):
                    pass
        except ConnectionClosed as exc:
            reason = exc.reason
            if self.ending is None and reason is not None and reason.code == 1009:
                self._counters.closed(CloseCode.MESSAGE_TOO_BIG)

    async def _deliver(self, message: bytes | str) -> bool:
        """Handle one message (a frame or a batch of them, each counted
        against the message rate); False once the connection ends. It runs
        in trio-websocket's reader task: it never waits."""
        now = trio.current_time()
        self._seen(self.number)
        try:
            frames = decode_frames(message, self.info.subprotocol)
        except BadFrame as exc:
            self._warn("unreadable frames", "unreadable frame: %s", exc.reason)
            self.end(exc.code, exc.reason)
            return False
        bucket = self._bucket
        for frame in frames:
            self.frames_received += 1
            self._counters.frames_received += 1
            if (
                bucket is not None
                and not self._owed_ack(frame)
                and bucket.try_take(now) > 0
            ):
                self.end(CloseCode.RATE_LIMITED, "message rate limit exceeded")
                return False
            try:
                self._dispatch(parse_client_frame(frame))
            except FrameError as exc:
                self._refuse(exc.request_id, exc.code, exc.message)
            if self.ending is not None:
                return False
        await trio.lowlevel.checkpoint()
        return self.ending is None

    def _dispatch(self, frame: object) -> None:
        if isinstance(frame, Call | OpenStream):
            self._start(frame)
        elif isinstance(frame, Cancel):
            scope = self._requests.get(frame.id)
            if scope is not None:
                scope.cancel()
        elif isinstance(frame, Credit):
            credit = self._credits.get(frame.id)
            if credit is not None:
                credit.grant(frame.n)
        elif isinstance(frame, Subscribe | ListPresence):
            self._start_subscription(frame)
        elif isinstance(frame, Unsubscribe):
            topics = self._topics
            dropped = topics is not None and topics.hub.unsubscribe(self, frame.topic)
            self._send({"t": "reply", "id": frame.id, "v": dropped})
        elif isinstance(frame, Ack):
            if self._session is not None and self._nursery is not None:
                for seq in frame.seqs:
                    self._owed.pop((frame.epoch, seq), None)
                self._nursery.start_soon(self._session.ack, frame.epoch, frame.seqs)
        elif isinstance(frame, Ping):
            self._send({"t": "pong"})
        elif isinstance(frame, Pong) and self._ping_sent_at is not None:
            self.rtt = trio.current_time() - self._ping_sent_at
            self._ping_sent_at = None
            self._measured(self.rtt)

    def _measured(self, rtt: float) -> None:
        """A ping's round trip: into the link's quality and the metrics;
        a link turning poor is logged (bounded)."""
        was = self.link.quality
        self._counters.rtt.observe(rtt)
        if self.link.observe(rtt) == "poor" and was != "poor":
            self._warn("poor links", "poor link: round trips of %.3f s", rtt)

    def _refuse(self, request_id: int | None, code: ErrorCode, message: str) -> None:
        self.errors += 1
        self._counters.refused(code)
        self._send(error_frame(request_id, code, message))

    def _warn(self, kind: str, message: str, *args: object) -> None:
        self._warnings.log(logging.INFO, self.info.remote, kind, message, *args)

    # ------------------------------------------------------------------
    # Requests

    def _start(self, frame: Call | OpenStream) -> None:
        route, message = admit(
            frame, self._routes, self._requests, self._config.max_concurrent_requests
        )
        scope = self._requests[frame.id] = trio.CancelScope()
        self._counters.requests += 1
        assert self._nursery is not None
        start_soon = self._nursery.start_soon
        if isinstance(frame, OpenStream):
            credit = self._credits[frame.id] = StreamCredit(frame.credit)
            self._context.run(
                start_soon,
                self._request,
                frame.id,
                scope,
                partial(self._stream, frame.id, route, frame.key, message, credit),
            )
        else:
            self._context.run(
                start_soon,
                self._request,
                frame.id,
                scope,
                partial(self._call, frame.id, route, frame.key, message),
            )

    def _start_subscription(self, frame: Subscribe | ListPresence) -> None:
        topics = self._topics
        request_id = frame.id
        if request_id in self._requests:
            raise FrameError(request_id, ErrorCode.DUPLICATE_ID, "request id in use")
        if len(self._requests) >= self._config.max_concurrent_requests:
            raise FrameError(
                request_id, ErrorCode.TOO_MANY_REQUESTS, "too many requests at once"
            )
        if topics is None or not topics.allowed(frame.topic):
            raise FrameError(
                request_id, ErrorCode.NOT_FOUND, f"no topic {frame.topic!r:.100}"
            )
        try:
            EntityId(frame.topic)
        except ValueError as exc:
            raise FrameError(request_id, ErrorCode.BAD_REQUEST, str(exc)) from None
        scope = self._requests[request_id] = trio.CancelScope()
        self._counters.requests += 1
        assert self._nursery is not None
        self._context.run(
            self._nursery.start_soon,
            self._request,
            request_id,
            scope,
            partial(self._subscribe, topics, frame),
        )

    async def _subscribe(
        self, topics: TopicAccess, frame: Subscribe | ListPresence
    ) -> dict[str, Any]:
        """A subscribe's answer (after the publications it missed), or a
        presence list's."""
        request_id, topic = frame.id, frame.topic
        try:
            since = None
            if isinstance(frame, Subscribe) and frame.since is not None:
                since = Position(*frame.since)
            authorize = self._authorize
            if authorize is not None:
                operation = Operation(
                    "subscribe" if isinstance(frame, Subscribe) else "presence",
                    topic,
                    None,
                    since,
                )
                if not await authorize(self.info.principal, operation):
                    self.errors += 1
                    self._counters.refused(ErrorCode.FORBIDDEN)
                    return error_frame(
                        request_id, ErrorCode.FORBIDDEN, f"not allowed: {topic}"
                    )
            value: Any
            if isinstance(frame, ListPresence):
                value = await topics.hub.presence(topic)
            else:
                hook = topics.presence
                data = None if hook is None else hook(self.info, topic)
                value = await topics.hub.subscribe(
                    self, topic, since, data, with_presence=frame.presence
                )
            return {"t": "reply", "id": request_id, "v": value}
        except Exception as exc:
            self.errors += 1
            self._counters.requests_failed += 1
            return failure_frame(request_id, None, exc, self._warnings)

    async def _request(
        self,
        request_id: int,
        scope: trio.CancelScope,
        work: Callable[[], Awaitable[dict[str, Any]]],
    ) -> None:
        frame: dict[str, Any] | None = None
        try:
            with scope:
                frame = await work()
            if scope.cancelled_caught:
                frame = error_frame(request_id, ErrorCode.CANCELLED, "cancelled")
        finally:
            del self._requests[request_id]
            self._credits.pop(request_id, None)
        if frame is not None:
            self._send(frame, request_id=request_id)

    async def _authorized(self, route: Route, key: str | None, message: Any) -> bool:
        authorize = self._authorize
        if authorize is None:
            return True
        operation = Operation(route.kind, route.name, key, message)
        return bool(await authorize(self.info.principal, operation))

    async def _call(
        self, request_id: int, route: Route, key: str | None, message: Any
    ) -> dict[str, Any]:
        try:
            if not await self._authorized(route, key, message):
                return self._forbidden(request_id, route)
            assert route.invoke is not None
            value = await route.invoke(key, message)
            return {"t": "reply", "id": request_id, "v": route.reply.unstructure(value)}
        except Exception as exc:
            return self._failure(request_id, route, exc)

    async def _stream(
        self,
        request_id: int,
        route: Route,
        key: str | None,
        message: Any,
        credit: StreamCredit,
    ) -> dict[str, Any]:
        try:
            if not await self._authorized(route, key, message):
                return self._forbidden(request_id, route)
            assert route.open_items is not None
            async with route.open_items(key, message) as items:
                while True:
                    await credit.take()
                    try:
                        item = await items.__anext__()
                    except StopAsyncIteration:
                        break
                    self._send(
                        {
                            "t": "item",
                            "id": request_id,
                            "v": route.reply.unstructure(item),
                        },
                        request_id=request_id,
                    )
            return {"t": "end", "id": request_id}
        except Exception as exc:
            return self._failure(request_id, route, exc)

    def _forbidden(self, request_id: int, route: Route) -> dict[str, Any]:
        self.errors += 1
        self._counters.refused(ErrorCode.FORBIDDEN)
        return error_frame(
            request_id, ErrorCode.FORBIDDEN, f"not allowed: {route.name}"
        )

    def _failure(self, request_id: int, route: Route, exc: Exception) -> dict[str, Any]:
        self.errors += 1
        self._counters.requests_failed += 1
        return failure_frame(request_id, route, exc, self._warnings)

    # ------------------------------------------------------------------
    # Writing

    def _encode(self, frame: dict[str, Any], request_id: int | None) -> bytes | str:
        """``frame`` as a message; a reply the subprotocol cannot carry
        (bytes in JSON), or one over ``max_message_size`` (the client would
        close the socket for it), becomes an ``internal`` error for its
        request."""
        subprotocol = self.info.subprotocol
        try:
            data = encode_frame(frame, subprotocol)
        except ValueError as exc:
            self._warn("unencodable replies", "cannot encode a frame: %s", exc)
            problem = "reply cannot be encoded"
        else:
            if len(data) <= self._config.max_message_size:
                return data
            self._warn("oversized replies", "a frame of %d bytes", len(data))
            problem = "reply over max_message_size"
        return encode_frame(
            error_frame(request_id, ErrorCode.INTERNAL, problem), subprotocol
        )

    def _send(self, frame: dict[str, Any], *, request_id: int | None = None) -> None:
        """Encode ``frame`` and send it (`send_encoded`)."""
        self.send_encoded(self._encode(frame, request_id))

    def send_encoded(self, data: bytes | str) -> None:
        """Write an encoded frame now if nothing waits (over TCP: into the
        `Outbox`, synchronously, without waking the writer), else queue it
        for the writer; a full queue ends the connection (slow consumer)."""
        direct = self._direct
        if (
            direct is not None
            and not direct[1].backlog
            and not self._send_channel.statistics().current_buffer_used
        ):
            try:
                write_message(*direct, data)
            except CONNECTION_ERRORS:
                self._counters.dropped("socket_closed")
                self._scope.cancel()  # the client is gone
                return
            self.frames_sent += 1
            self._counters.frames_sent += 1
            return
        try:
            self._send_channel.send_nowait(data)
        except trio.WouldBlock:
            self._counters.dropped("send_queue_full")
            self.end(CloseCode.SLOW_CONSUMER, "send queue full")
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            # The writer is gone: the connection is ending.
            self._counters.dropped("socket_closed")

    async def _write_one(self, data: bytes | str) -> bool:
        """Write one message within ``send_timeout``: over TCP once the
        `Outbox` has drained, else with trio-websocket's ``send_message``;
        False if that ended the connection (the client is gone, or too
        slow)."""
        direct = self._direct
        with trio.move_on_after(self._config.send_timeout) as waited:
            try:
                if direct is not None:
                    await direct[1].wait_drained()
                    write_message(*direct, data)
                else:
                    await self.ws.send_message(data)
            except CONNECTION_ERRORS:
                self._scope.cancel()  # the client is gone
                return False
        if waited.cancelled_caught:
            self.end(CloseCode.SLOW_CONSUMER, "write over send_timeout")
            return False
        self.frames_sent += 1
        self._counters.frames_sent += 1
        return True

    async def _write(self) -> None:
        """Write what waits in the send queue: everything queued at once
        (as long as it fits in ``max_message_size``) as one batch."""
        receive = self._receive_channel
        limit = self._config.max_message_size - 16  # room for the list's own bytes
        carry: bytes | str | None = None
        async with receive:
            while True:
                if carry is None:
                    try:
                        carry = await receive.receive()
                    except trio.EndOfChannel:
                        return
                batch, carry = [carry], None
                size = len(batch[0])
                while True:
                    try:
                        more = receive.receive_nowait()
                    except (trio.WouldBlock, trio.EndOfChannel):
                        break
                    if size + len(more) + 1 > limit:
                        carry = more  # the next batch's first frame
                        break
                    batch.append(more)
                    size += len(more) + 1
                message = (
                    batch[0]
                    if len(batch) == 1
                    else join_frames(batch, self.info.subprotocol)
                )
                if not await self._write_one(message):
                    left = receive.statistics().current_buffer_used
                    self._counters.dropped(
                        "socket_closed", len(batch) + (carry is not None) + left
                    )
                    return
                self.frames_sent += len(batch) - 1
                self._counters.frames_sent += len(batch) - 1
