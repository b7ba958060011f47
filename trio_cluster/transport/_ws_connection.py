"""One established WebSocket connection between two runners (Trio driver of
the transport edge).

Theory of operation: once both hellos are exchanged, a `Connection` runs three
tasks until one of them ends it:

* the *reader* decodes each WebSocket message as a frame and hands the
  envelopes to the endpoint handler, every `DISPATCH_SLICE` envelopes
  sending what the handler queued meanwhile (its answers) itself, if it can
  (`send_now`), else yielding (bad input from the peer, a handler exception,
  or the peer closing ends the connection). The messages are handled in
  trio-websocket's own reader task, as it parses them (`_ws_tap.Tap`: no
  task wakes per message); the reader task itself hands over the messages
  that arrived before the connection existed, then waits for the end;
* the *writer* waits on the peer's `SendQueue` and sends one frame per wake-up
  with everything queued meanwhile (up to ``max_message_size``), once the
  previous frames are written out (`Outbox.wait_drained`: the bound on what
  waits for a slow peer);
* the *pinger* sends a ping with a unique payload every ``ping_interval``; no
  pong within ``ping_timeout`` means the peer is gone.

**Sending from the calling task** (`send_now`). Over plain TCP the socket is
an `Outbox`, whose writes never wait for the peer, and every frame of ours
is written synchronously (`write_message`: wsproto makes the frame, the
outbox takes it, no lock and no checkpoint). When the connection is idle
(nothing waits in the outbox), the task that queued an envelope (a caller,
or the reader with its answers) writes the queue out as one frame itself,
rather than wake the writer for it: a request or an answer leaves in the
task that made it. When frames wait in the outbox it leaves the envelope
queued instead, for the writer, which waits until the outbox is drained.
Order is kept as every write takes the queue's head and writes it in one
step; a write cannot be cut by a cancellation, and never waits for a slow
peer. Over TLS (no `Outbox`), the writer sends everything with
trio-websocket's ``send_message``, as those frames may wait for the peer.

`Connection.end` records the first reason and cancels the three tasks;
`Connection.close` then sends the WebSocket close frame (code and reason) and
waits a bounded time for the peer's answer.

This module is also where trio-websocket and wsproto exceptions are
translated (`CONNECTION_ERRORS`, `describe`; anything else a connection
raises is described by `unexpected_failure`): none of them leaves the
transport.
"""

from __future__ import annotations

import enum
import math
import random
import ssl
from typing import TYPE_CHECKING, Any, Final

import attrs
import trio
from trio_websocket import (
    CloseReason,
    ConnectionClosed,
    ConnectionRejected,
    HandshakeError,
    WebSocketConnection,
)
from wsproto.utilities import ProtocolError

from .._core._addresses import RunnerAddress
from .._core._auth import ClusterSecrets
from .._core._retry import Backoff
from .._errors import ConfigError, MalformedMessageError
from .._log_limit import LogLimiter
from .._transport_abc import EndpointHandler
from ._framing import decode_frame
from ._peers import Counters, Limits, SendQueue, handler_raised, log
from ._ws_admission import ConnectionLimits
from ._ws_outbox import Outbox, can_write_message, outbox_of, write_message
from ._ws_tap import Tap, install_tap

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from .._transport_abc import Envelope

__all__ = [
    "CONNECTION_ERRORS",
    "DISPATCH_SLICE",
    "CloseCode",
    "ConnectFailedError",
    "Connection",
    "Settings",
    "Timing",
    "close_websocket",
    "describe",
    "unexpected_failure",
]


class CloseCode(enum.IntEnum):
    """WebSocket close codes used between runners."""

    NORMAL = 1000
    GOING_AWAY = 1001
    PROTOCOL_ERROR = 1002
    UNSUPPORTED_DATA = 1003
    INVALID_PAYLOAD = 1007
    POLICY_VIOLATION = 1008
    """The peer did not prove the cluster secret."""
    MESSAGE_TOO_BIG = 1009
    INTERNAL_ERROR = 1011
    DUPLICATE = 4001
    """The peer keeps another connection between the same two runners."""
    PING_TIMEOUT = 4002


class ConnectFailedError(Exception):
    """A connection attempt failed before the connection was up (internal)."""


CONNECTION_ERRORS: Final = (
    ConnectionClosed,
    HandshakeError,
    OSError,
    trio.BrokenResourceError,
    trio.ClosedResourceError,
    ProtocolError,
    ConnectFailedError,
)
"""Everything a connection may raise because of the network or the peer."""

_MAX_CLOSE_REASON: Final = 123  # bytes, RFC 6455 §5.5.1

DISPATCH_SLICE: Final = 32
"""The reader sends (or has the writer send) the answers queued so far and
yields after this many envelopes of one frame, so the answers to the first
ones leave while the rest are processed: with many callers, both runners then
work at once instead of in turns (the frames of a busy connection carry about
a hundred envelopes)."""


def _duration(_: object, attribute: attrs.Attribute[float], value: Any) -> None:
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or value <= 0
    ):
        raise ConfigError(
            f"{attribute.name} must be a finite number of seconds > 0, got {value!r}"
        )


@attrs.frozen
class Timing:
    """Durations of the WebSocket transport, in seconds (validated eagerly).

    Raises:
        ConfigError: a value that is not a finite positive number.
    """

    ping_interval: float = attrs.field(validator=_duration)
    """Time between two pings on a connection."""
    ping_timeout: float = attrs.field(validator=_duration)
    """A pong later than this after its ping means the peer is gone."""
    connect_timeout: float = attrs.field(validator=_duration)
    """Longest time to connect and exchange hellos."""
    close_timeout: float = attrs.field(validator=_duration)
    """Longest wait for the peer to answer a close frame."""


@attrs.frozen
class Settings:
    """What an endpoint needs of its transport's options (one record, so the
    endpoint does not hold the transport)."""

    limits: Limits
    timing: Timing
    backoff: Backoff
    """Delays before redialing a peer after failed attempts."""
    rng: random.Random
    """The random source of the backoff's jitter."""
    client_ssl_context: ssl.SSLContext | None
    """TLS for dialed connections; None for plain WebSocket."""
    connections: ConnectionLimits
    """How many accepted connections the endpoint holds at once."""
    secrets: ClusterSecrets | None = None
    """The cluster secrets peers must prove (and this endpoint proves);
    None: the cluster does not authenticate."""


def close_reason_text(text: str) -> str:
    """Truncate ``text`` to what fits in a close frame."""
    data = text.encode()
    if len(data) <= _MAX_CLOSE_REASON:
        return text
    return data[: _MAX_CLOSE_REASON - 3].decode(errors="ignore") + "..."


def describe_close(reason: CloseReason | None) -> str:
    """Words for a WebSocket close reason."""
    if reason is None:
        return "connection closed"
    text = f"connection closed ({reason.code} {reason.name}"
    return text + (f": {reason.reason})" if reason.reason else ")")


def describe(exc: BaseException) -> str:
    """Words for a connection failure (the first of a group), for logs and
    ``peer_lost`` reasons."""
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    if isinstance(exc, ConnectionClosed):
        return describe_close(exc.reason)
    if isinstance(exc, ConnectionRejected):
        return f"WebSocket handshake rejected with HTTP status {exc.status_code}"
    if isinstance(exc, HandshakeError):
        cause = exc.__cause__
        return f"WebSocket handshake failed: {cause or type(exc).__name__}"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    if isinstance(exc, trio.BrokenResourceError) and exc.__cause__ is not None:
        return f"connection broken: {exc.__cause__}"
    return str(exc) or type(exc).__name__


def unexpected_failure(exc: BaseException) -> str:
    """Words for an exception that is not a connection error (the first of
    a group): its type and message."""
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    return f"unexpected {type(exc).__name__}: {exc}"


async def close_websocket(
    ws: WebSocketConnection, code: CloseCode, reason: str, wait: float
) -> None:
    """Close ``ws`` with ``code`` and ``reason``, waiting at most ``wait``
    seconds for the peer's answer; the TCP connection is closed either way.

    Cancellation: the close frame may not be sent; the TCP connection is
    closed anyway (trio-websocket closes its stream in a ``finally``).
    """
    with trio.move_on_after(wait):
        try:
            await ws.aclose(int(code), close_reason_text(reason))
        except CONNECTION_ERRORS as exc:
            log.debug("closing a WebSocket failed: %s", describe(exc))


@attrs.frozen
class _Ending:
    reason: str
    """Why, for logs and ``peer_lost``."""
    code: CloseCode
    sent: str
    """The close reason sent to the peer."""
    report: bool
    """Whether the handler hears of it (not when this endpoint closed it)."""


@attrs.define(eq=False)
class Connection:
    """A connection to ``peer`` after the hellos; see the module docstring."""

    ws: WebSocketConnection
    peer: RunnerAddress
    """The address the peer announced."""
    initiated: bool = attrs.field(kw_only=True)
    """Whether this endpoint dialed it."""
    _queue: SendQueue = attrs.field(kw_only=True)
    _handler: EndpointHandler = attrs.field(kw_only=True)
    _limits: Limits = attrs.field(kw_only=True)
    _timing: Timing = attrs.field(kw_only=True)
    _counters: Counters = attrs.field(kw_only=True)
    _warnings: LogLimiter = attrs.field(kw_only=True)
    """The endpoint's: bounds what the peer makes it log (issue 12, item 8)."""
    ending: _Ending | None = attrs.field(init=False, default=None)
    closed: trio.Event = attrs.field(init=False, factory=trio.Event)
    """Set once the connection is closed (its task is done)."""
    _scope: trio.CancelScope = attrs.field(init=False, factory=trio.CancelScope)
    _pings: int = attrs.field(init=False, default=0)
    _outbox: Outbox | None = attrs.field(init=False)
    """The socket, over plain TCP."""
    _direct: bool = attrs.field(init=False)
    """Whether our frames are written synchronously (`write_message`): an
    outbox, and a trio-websocket whose wsproto object is found."""
    _sending: bool = attrs.field(init=False, default=False)
    """Whether the writer is in trio-websocket's ``send_message`` (which
    may yield): then envelopes wait in the queue for its next frame."""

    _tap: Tap | None = attrs.field(init=False)
    """Where trio-websocket's reader hands messages over (see `_ws_tap`)."""

    @_outbox.default
    def _find_outbox(self) -> Outbox | None:
        return outbox_of(self.ws)

    @_direct.default
    def _writes_directly(self) -> bool:
        return self._outbox is not None and can_write_message(self.ws)

    @_tap.default
    def _install_tap(self) -> Tap | None:
        return install_tap(self.ws, self._received)

    @property
    def tapped(self) -> bool:
        """Whether trio-websocket's reader hands messages over directly (see
        `_ws_tap`; False with a trio-websocket that keeps them otherwise)."""
        return self._tap is not None

    def can_send_now(self) -> bool:
        """Whether the calling task may write the queue itself (`send_now`):
        over plain TCP, when the writer is not in ``send_message``, nothing
        waits in the outbox and the connection is not ending."""
        outbox = self._outbox
        return (
            self._direct
            and outbox is not None
            and not self._sending
            and not outbox.backlog
            and self.ending is None
        )

    def send_now(self) -> None:
        """Write the head of the queue (one frame) now, from the calling
        task, if `can_send_now` (check it first, in the same scheduler step
        as the envelope was queued): a synchronous write (`write_message`),
        so neither a cancellation nor another sender can come between.
        What is queued after it is left to the writer (woken if needed).

        A connection error ends the connection (the envelopes are then lost,
        as with any lost connection); nothing is raised.
        """
        queue = self._queue
        outbox = self._outbox
        assert queue
        assert outbox is not None
        assert self.can_send_now()
        frame, count = queue.take_frame()
        try:
            write_message(self.ws, outbox, frame)
        except CONNECTION_ERRORS as exc:
            self.end(describe(exc))
        else:
            self._counters.sent(frame, count)
        queue.wake()

    def end(
        self,
        reason: str,
        *,
        code: CloseCode = CloseCode.NORMAL,
        sent: str | None = None,
        report: bool = True,
    ) -> None:
        """Stop the connection's tasks; the first reason given wins."""
        if self.ending is None:
            self.ending = _Ending(
                reason, code, reason if sent is None else sent, report
            )
        self._scope.cancel()

    async def run(self) -> None:
        """Run the reader, writer and pinger until `end`.

        Cancellation: propagates; the tasks stop.
        """
        with self._scope:
            async with trio.open_nursery() as nursery:
                for loop in (self._read, self._write, self._ping):
                    nursery.start_soon(self._until_broken, loop)

    async def _until_broken(self, loop: Callable[[], Awaitable[None]]) -> None:
        """Run one of the connection's loops; a connection error ends it."""
        try:
            await loop()
        except CONNECTION_ERRORS as exc:
            self.end(describe(exc))

    async def close(self) -> None:
        """Send the close frame and wait (bounded) for the answer."""
        ending = self.ending
        assert ending is not None
        await close_websocket(
            self.ws, ending.code, ending.sent, self._timing.close_timeout
        )

    def _bad_input(self, problem: str, code: CloseCode) -> None:
        self._counters.bad_peers += 1
        self._warnings.warning(
            self.peer,
            "refused connections",
            "closing the connection from %s: %s",
            self.peer,
            problem,
        )
        self.end(problem, code=code)

    async def _read(self) -> None:
        try:
            if self._tap is not None:
                await self._tap.run()
            else:
                while await self._received(await self.ws.get_message()):
                    pass
        except ConnectionClosed as exc:
            reason = exc.reason
            if reason is not None and reason.code == CloseCode.MESSAGE_TOO_BIG:
                self._counters.bad_peers += 1
                self._warnings.warning(
                    self.peer,
                    "oversized messages",
                    "connection with %s closed, a message was over max_message_size: %s",
                    self.peer,
                    describe_close(reason),
                )
            self.end(describe_close(reason))

    async def _received(self, message: bytes | str) -> bool:
        """Decode a message and dispatch its envelopes (from the reader, or
        from trio-websocket's reader through the `Tap`); False once the
        connection ends."""
        if self.ending is not None:
            return False
        if isinstance(message, str):
            self._bad_input(
                "text message received; runners exchange binary frames only",
                CloseCode.UNSUPPORTED_DATA,
            )
            return False
        try:
            envelopes = decode_frame(message, self._limits.max_message_size)
        except MalformedMessageError as exc:
            self._bad_input(str(exc), CloseCode.INVALID_PAYLOAD)
            return False
        self._counters.frames_received += 1
        for start in range(0, len(envelopes), DISPATCH_SLICE):
            if not self._dispatch(envelopes, start):
                return False
            await self._answer(more=start + DISPATCH_SLICE < len(envelopes))
        return True

    def _dispatch(self, envelopes: list[Envelope], start: int) -> bool:
        """Hand envelopes ``start`` to ``start + DISPATCH_SLICE`` to the
        handler, holding the queue (what it queues is sent by `_answer`);
        False if the connection ends."""
        if self.ending is not None:
            return False
        queue = self._queue
        handler, peer = self._handler, self.peer
        batch = envelopes[start : start + DISPATCH_SLICE]
        # Counted as handed over (a handler that raises ends the connection).
        self._counters.envelopes_received += len(batch)
        queue.held = True
        try:
            # One call for the slice: the handler sets up once for all of its
            # envelopes. Nothing it does synchronously ends this connection
            # (only other tasks do), so `ending` is checked once per slice.
            handler.envelopes_received(peer, batch)
        except Exception as exc:
            self.end(
                handler_raised(peer, exc),
                code=CloseCode.INTERNAL_ERROR,
                sent="internal error",
            )
            return False
        finally:
            queue.held = False
        return True

    async def _answer(self, *, more: bool) -> None:
        """Send what the handler queued: from the reader if the connection is
        idle, else by the writer. With ``more`` envelopes of the frame to
        dispatch, yield to the scheduler."""
        queue = self._queue
        if queue and self.can_send_now():
            self.send_now()
        else:
            queue.wake()
        if more:
            await trio.lowlevel.checkpoint()

    async def _write(self) -> None:
        queue = self._queue
        outbox = self._outbox
        while True:
            await queue.wait()
            if outbox is not None:
                # At most one frame waits for a slow peer in the outbox:
                # beyond it, envelopes wait in the (bounded) queue.
                await outbox.wait_drained()
            if self.ending is not None:
                return
            if not queue:
                continue  # sent by send_now meanwhile
            if self.can_send_now():
                self.send_now()  # no wait: the outbox is drained
                continue
            frame, count = queue.take_frame()
            self._sending = True
            try:
                await self.ws.send_message(frame)
            finally:
                self._sending = False
            self._counters.sent(frame, count)

    async def _ping(self) -> None:
        timing = self._timing
        while True:
            await trio.sleep(timing.ping_interval)
            self._pings += 1
            with trio.move_on_after(timing.ping_timeout) as scope:
                # Unique per connection, as trio-websocket requires.
                await self.ws.ping(self._pings.to_bytes(8, "big"))
            if scope.cancelled_caught:
                self.end(
                    f"no pong within {timing.ping_timeout} s",
                    code=CloseCode.PING_TIMEOUT,
                )
                return
