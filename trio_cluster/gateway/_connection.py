"""One client's socket on the gateway, after its upgrade (Trio driver).

Theory of operation. `ClientConnection.run` is the socket's task; all its
work runs in one nursery under the connection's own cancel scope, so ending
the connection (`ClientConnection.end`, the first reason wins) cancels
exactly its work and nothing else. An idle socket has this one task and no
other:

* the *reader* (the task itself: `ServerSocket.read_messages` runs in it)
  takes each message, counts it against the
  socket's message rate (`TokenBucket.try_take`; more than `_AHEAD`
  messages ahead of it: the other tasks run between two of the socket's
  messages; over its burst: close 4008, then what the client sends is
  discarded unparsed; an
  ack of pushes the socket was sent and still owes is not counted: their
  number is bounded by the pushes),
  tells the heartbeats the client is alive, decodes it (unreadable: close
  with `BadFrame`'s code) and dispatches it by kind. A readable frame that
  is wrong is answered with an error frame and the socket stays up;
* each request (call or stream) is a task with its own cancel scope, kept
  by request id while it runs: a ``cancel`` frame cancels that scope only,
  and is answered ``cancelled``. At most ``max_concurrent_requests`` run at
  once; one more is refused (``too_many_requests``), so the reader never
  waits for a request. The exception is a call that cannot wait (a
  volatile entity handler that cannot suspend, its entity here and idle,
  no authorization hook: `Router.call_nowait`): it runs in the reader and
  is answered at once, with no task or scope (nothing could cancel it
  before its reply);
* frames are written at once by the task that makes them (over TCP into
  the socket's `Outbox`, which never waits) while nothing waits; else they
  join the bounded send queue, and a *writer* task, started then and ended
  when all is written, drains the outbox and writes what is queued as one
  batch. A frame that finds the queue full, or a write that takes over
  ``send_timeout``, closes the socket with 4001 (slow consumer): a client
  that stops reading costs a bounded queue, then nothing;
* pings come from the server's one heartbeat structure
  (`trio_cluster._core._heartbeat`), never from a task of this socket.

Frames are encoded once, in the task that makes them. Cancellation: the
socket's work is cancelled, then the close frame is sent (bounded by
``close_timeout``).
"""

from __future__ import annotations

import logging
from functools import partial
from typing import TYPE_CHECKING, Any, Final, Protocol

import attrs
import trio
from trio_websocket import CloseReason, ConnectionClosed

from .._core._addresses import EntityId
from .._core._link_quality import LinkQuality
from .._core._ratelimit import TokenBucket
from ..transport._ws_connection import CONNECTION_ERRORS, close_reason_text, describe
from ._client_info import ClientInfo, current_info
from ._definition import Operation
from ._frames import data_frame
from ._protocol import (
    SUBPROTOCOLS,
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
    parse_client_frame,
    ping_frame,
    pong_frame,
)
from ._requests import StreamCredit, admit, failure_frame
from ._sending import FrameSender
from ._socket import LATER, MORE, STOP, ServerSocket
from ._statistics import ConnectionStatistics
from ._topics import Position

if TYPE_CHECKING:
    from collections import deque
    from collections.abc import Awaitable, Callable

    from .._log_limit import LogLimiter
    from ..transport._ws_outbox import Outbox
    from ._definition import GatewayConfig, Route
    from ._hub import TopicAccess
    from ._sessions import Pushed, SessionLink
    from ._statistics import GatewayCounters

__all__ = ["ClientConnection", "MessageSocket"]

log = logging.getLogger("trio_cluster.gateway")


class MessageSocket(Protocol):
    """What a connection needs of a WebSocket that is not a `ServerSocket`
    (the ASGI server's socket: `asgi_app`)."""

    async def get_message(self) -> bytes | str:
        """The next message.

        Raises:
            ConnectionClosed: the socket closed.
        """
        ...

    async def send_message(self, message: bytes | str) -> None: ...

    async def aclose(self, code: int = 1000, reason: str | None = None) -> None: ...


_HANDLERS: Final[dict[type[Any], Callable[[ClientConnection, Any], None]]] = {}
"""What `ClientConnection._deliver` does with each kind of client frame
(filled below the class)."""

_PING_FRAMES: Final = {
    subprotocol: data_frame(ping_frame(subprotocol)) for subprotocol in SUBPROTOCOLS
}
"""The ping frame as a WebSocket frame, per subprotocol."""

_AHEAD: Final = 2
"""Messages a socket may be ahead of its message rate before the other
tasks run between two of its messages (`_socket.LATER`)."""
_BROKE_A_RULE: Final = frozenset(
    (
        CloseCode.RATE_LIMITED,
        CloseCode.SLOW_CONSUMER,
        CloseCode.UNSUPPORTED_DATA,
        CloseCode.INVALID_PAYLOAD,
    )
)
"""Closes after which what the client sends is not parsed (discarded
whole: `ServerSocket.aclose`'s ``unread``)."""
_MAX_OWED: Final = 4096
"""Pushes a socket remembers as owed an ack (more: the oldest are
forgotten, and their late acks count against the message rate)."""


@attrs.define
class _Ending:
    code: int
    reason: str


class ClientConnection(FrameSender):
    """One upgraded socket (see the module docstring)."""

    # A gateway holds tens of thousands of these: no per-instance dict.
    __slots__ = (
        "__weakref__",
        "_authorize",
        "_bucket",
        "_config",
        "_counters",
        "_credits",
        "_direct",
        "_gone",
        "_now",
        "_nursery",
        "_owed",
        "_ping_sent_at",
        "_requests",
        "_routes",
        "_seen",
        "_session",
        "_topics",
        "_user",
        "_warnings",
        "ending",
        "errors",
        "frames_received",
        "info",
        "link",
        "number",
        "rtt",
        "ws",
    )

    def __init__(
        self,
        ws: ServerSocket | MessageSocket,
        info: ClientInfo,
        *,
        number: int,
        routes: dict[str, Route],
        config: GatewayConfig,
        authorize: Callable[[object, Operation], Any] | None,
        counters: GatewayCounters,
        warnings: LogLimiter,
        seen: Callable[[int, float], None],
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
        self._now = trio.lowlevel.current_clock().current_time
        """`trio.current_time`, without its two calls on the way (per message)."""
        self._direct: tuple[ServerSocket, Outbox] | None = None
        """The socket and its `Outbox`, over plain TCP (writes never wait)."""
        if outbox is not None and isinstance(ws, ServerSocket):
            self._direct = (ws, outbox)
            outbox.on_backlog = self._start_writer
        self._topics = topics
        self._session = session
        """Its link to its session's entity (None: no session)."""
        self._user = user
        self._owed: dict[tuple[str, int], None] = {}
        """Pushes sent and not acked yet (epoch, seq), oldest first."""
        self._gone = False
        """Whether the work is cancelled (the client is gone, or `end`)."""
        self._nursery: trio.Nursery | None = None
        """The nursery of the socket's work, while `run` has it open."""
        self._requests: dict[int, trio.CancelScope] = {}
        self._credits: dict[int, StreamCredit] = {}
        self._queue: deque[bytes | str] | None = None
        """Frames waiting for the writer (None: none)."""
        self._writing = False
        self._together = None
        """Whether the writer task runs."""
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

    # ------------------------------------------------------------------
    # Lifecycle

    def end(self, code: int, reason: str) -> None:
        """End the connection with ``code`` (the first reason wins): its
        work is cancelled, then `run` sends the close frame."""
        if self.ending is None:
            self.ending = _Ending(code, reason)
            self._counters.closed(code)
        self._cancel()

    def _cancel(self) -> None:
        """Cancel the socket's work (the reader included)."""
        self._gone = True
        if self._nursery is not None:
            self._nursery.cancel_scope.cancel()

    async def run(self) -> None:
        """Serve the socket until the client closes it or `end` is called;
        then close it (bounded by ``close_timeout``).

        Cancellation: the work is cancelled; the close frame is not sent.
        """
        # Requests start from the reader (`_deliver`), in this task: with
        # this context, so that they see `current_client`.
        token = current_info.set(self.info)
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                if self._gone:  # ended before it ran
                    nursery.cancel_scope.cancel()
                if self._session is not None:
                    nursery.start_soon(
                        self._session.run, self._user, self._push, self._detached
                    )
                if self._queue:  # frames sent before the nursery opened
                    self._start_writer()
                ws = self.ws
                if isinstance(ws, ServerSocket):
                    await ws.read_messages(self._deliver)
                    self._closed_by_client(ws.closed)
                else:
                    await self._read_others(ws)
                nursery.cancel_scope.cancel()
        finally:
            self._nursery = None
            current_info.reset(token)
            if self._topics is not None:
                self._topics.hub.forget(self)
            self._warnings.flush(self.info.remote)
        ending = self.ending
        if ending is not None:
            ws = self.ws
            reason = close_reason_text(ending.reason)
            with trio.move_on_after(self._config.close_timeout):
                try:
                    if isinstance(ws, ServerSocket):
                        unread = ending.code in _BROKE_A_RULE
                        await ws.aclose(ending.code, reason, unread=unread)
                    else:
                        await ws.aclose(ending.code, reason)
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
            send_queue=len(self._queue or ()),
            rtt=self.rtt,
            rtt_average=self.link.average,
            quality=self.link.quality,
        )

    def ping(self) -> None:
        """Send a ping frame (the heartbeats found the client quiet)."""
        self._ping_sent_at = trio.current_time()
        subprotocol = self.info.subprotocol
        self.send_encoded(ping_frame(subprotocol), _PING_FRAMES[subprotocol])

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

    async def _read_others(self, ws: MessageSocket) -> None:
        """Hand every message of a socket that is not a `ServerSocket` (the
        ASGI server's) to `_deliver`, until it closes or a message ends the
        connection."""
        try:
            while state := self._deliver(await ws.get_message()):
                if state == LATER:
                    await trio.lowlevel.cancel_shielded_checkpoint()
        except ConnectionClosed as exc:
            self._closed_by_client(exc.reason)

    def _closed_by_client(self, reason: CloseReason | None) -> None:
        """Count the close of a message over ``max_message_size`` (the
        socket sent it)."""
        if self.ending is None and reason is not None and reason.code == 1009:
            self._counters.closed(CloseCode.MESSAGE_TOO_BIG)

    def _deliver(self, message: bytes | str) -> int:
        """Handle one message (a frame or a batch of them, each counted
        against the message rate); `STOP` once the connection ends,
        `LATER` while the socket is more than `_AHEAD` messages ahead of
        its rate (the reader lets the others run first), else `MORE`. It
        runs in the reader, and never waits (the reads are its schedule
        points)."""
        now = self._now()
        self._seen(self.number, now)
        try:
            frames = decode_frames(message, self.info.subprotocol)
        except BadFrame as exc:
            self._warn("unreadable frames", "unreadable frame: %s", exc.reason)
            self.end(exc.code, exc.reason)
            return STOP
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
                return STOP
            try:
                parsed = parse_client_frame(frame)
                _HANDLERS[type(parsed)](self, parsed)
            except FrameError as exc:
                self._refuse(exc.request_id, exc.code, exc.message)
            if self.ending is not None:
                return STOP
        if self.ending is not None:
            return STOP
        if bucket is not None and bucket.ahead > _AHEAD:
            return LATER
        return MORE

    def _cancel_request(self, frame: Cancel) -> None:
        scope = self._requests.get(frame.id)
        if scope is not None:
            scope.cancel()

    def _credit(self, frame: Credit) -> None:
        credit = self._credits.get(frame.id)
        if credit is not None:
            credit.grant(frame.n)

    def _unsubscribe(self, frame: Unsubscribe) -> None:
        topics = self._topics
        dropped = topics is not None and topics.hub.unsubscribe(self, frame.topic)
        self._send({"t": "reply", "id": frame.id, "v": dropped})

    def _ack(self, frame: Ack) -> None:
        if self._session is not None and self._nursery is not None:
            for seq in frame.seqs:
                self._owed.pop((frame.epoch, seq), None)
            self._nursery.start_soon(self._session.ack, frame.epoch, frame.seqs)

    def _ping(self, frame: Ping) -> None:
        self.send_encoded(pong_frame(self.info.subprotocol))

    def _pong(self, frame: Pong) -> None:
        if self._ping_sent_at is not None:
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
        self._counters.requests += 1
        nowait = route.invoke_nowait
        if nowait is not None and self._authorize is None and type(frame) is Call:
            # The fast path: a call that cannot wait runs right here, in the
            # reader, and is answered at once (no task, no cancel scope: a
            # ``cancel`` frame can only come after the reply).
            request_id = frame.id
            try:
                value = nowait(frame.key, message)
                codec = route.reply
                reply = {
                    "t": "reply",
                    "id": request_id,
                    "v": value
                    if codec.unstructures_to_itself
                    else codec.unstructure(value),
                }
            except trio.WouldBlock:
                pass  # it must wait: in its own task
            except Exception as exc:
                self._send(self._failure(request_id, route, exc), request_id=request_id)
                return
            else:
                self.send_encoded(self._encode(reply, request_id))  # `_send`
                return
        scope = self._requests[frame.id] = trio.CancelScope()
        assert self._nursery is not None
        start_soon = self._nursery.start_soon
        if isinstance(frame, OpenStream):
            credit = self._credits[frame.id] = StreamCredit(frame.credit)
            start_soon(
                self._request,
                frame.id,
                scope,
                partial(self._stream, frame.id, route, frame.key, message, credit),
            )
        else:
            start_soon(self._call, frame.id, scope, route, frame.key, message)

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
        if (
            isinstance(frame, Subscribe)
            and not frame.presence
            and self._authorize is None
            and topics.presence is None
        ):
            # Nothing to fetch or ask: answered now if the gateway follows
            # the topic already and keeps what a resume missed (no task, no
            # call to the topic's entity).
            hub = topics.hub
            with self.writing_together():  # what a resume missed, its answer
                value = (
                    hub.subscribe_now(self, frame.topic)
                    if frame.since is None
                    else hub.resume_now(self, frame.topic, Position(*frame.since))
                )
                if value is not None:
                    self._counters.requests += 1
                    self._send({"t": "reply", "id": request_id, "v": value})
            if value is not None:
                return
        scope = self._requests[request_id] = trio.CancelScope()
        self._counters.requests += 1
        assert self._nursery is not None
        self._nursery.start_soon(
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
        self,
        request_id: int,
        scope: trio.CancelScope,
        route: Route,
        key: str | None,
        message: Any,
    ) -> None:
        """A call's task (one coroutine: calls are the commonest requests):
        its reply, error frame, or ``cancelled``."""
        frame: dict[str, Any] | None = None
        try:
            with scope:
                try:
                    if self._authorize is not None and not await self._authorized(
                        route, key, message
                    ):
                        frame = self._forbidden(request_id, route)
                    else:
                        assert route.invoke is not None
                        value = await route.invoke(key, message)
                        frame = {
                            "t": "reply",
                            "id": request_id,
                            "v": route.reply.unstructure(value),
                        }
                except Exception as exc:
                    frame = self._failure(request_id, route, exc)
            if scope.cancelled_caught:
                frame = error_frame(request_id, ErrorCode.CANCELLED, "cancelled")
        finally:
            del self._requests[request_id]
        if frame is not None:
            self._send(frame, request_id=request_id)

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


_HANDLERS.update(
    {
        Call: ClientConnection._start,
        OpenStream: ClientConnection._start,
        Cancel: ClientConnection._cancel_request,
        Credit: ClientConnection._credit,
        Subscribe: ClientConnection._start_subscription,
        ListPresence: ClientConnection._start_subscription,
        Unsubscribe: ClientConnection._unsubscribe,
        Ack: ClientConnection._ack,
        Ping: ClientConnection._ping,
        Pong: ClientConnection._pong,
    }
)
