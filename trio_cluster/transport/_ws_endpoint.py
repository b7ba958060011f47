"""`WebSocketEndpoint`: one runner's end of the WebSocket transport (Trio
driver of the transport edge).

Theory of operation. The endpoint keeps a `_Peer` per runner it knows: its
`SendQueue`, its connection (if one is up), whether a dial is in progress,
and its backoff state.

* **Sending.** ``send_nowait`` encodes the envelope and queues it for the
  peer; with no connection and no dial in progress it starts a dial (unless
  a backoff after a failure is still running: then it raises at once).
* **Dialing** (`_dial`, one task per attempt): connect, hellos, then the
  connection runs until it ends. A refused dial (`CloseCode.DUPLICATE`, the
  peer keeps its own connection to us) waits for that connection instead of
  failing.
* **Accepting** (`_accept`, one task per accepted stream): a slot from
  `Admission` (or the stream is closed at once), handshake, hello, then
  `keep_inbound` decides whether this connection is the pair's one.
* **One connection per pair.** `_attach` makes a connection the peer's
  (ending an older one); `_detach` forgets it, drops what was queued and
  reports ``peer_lost`` (a liveness signal for sharding), unless this
  endpoint itself is closing.
* **Failures.** A failed dial drops the queue, reports ``peer_lost`` and
  starts the backoff (`trio_cluster._core._retry.Backoff`, jitter from the
  transport's random source). A connection that was up and drops is reported
  too; the next send dials again at once.

Every task is started in the context the endpoint was opened in, never in
that of whichever task happened to send first (a memory of `contextvars`
such as the current entity must not leak into a connection's reader).
"""

from __future__ import annotations

import contextvars
import enum
import logging
import math
from functools import partial
from typing import TYPE_CHECKING, Any, Final

import attrs
import trio

from .._errors import RunnerUnavailableError
from .._log_limit import LogLimiter
from .._transport_abc import Endpoint
from ._framing import ACCEPTED, encode_envelope, encode_hello, new_packer
from ._peers import Counters, EndpointStatistics, SendQueue, log, report_lost
from ._ws_admission import Admission, Slot
from ._ws_auth import authenticate_dialer, authenticate_listener, new_nonce
from ._ws_connection import (
    CONNECTION_ERRORS,
    CloseCode,
    ConnectFailedError,
    Connection,
    close_websocket,
    describe,
    unexpected_failure,
)
from ._ws_handshake import (
    Refusals,
    allow_messages,
    check_client_hello,
    check_server_hello,
    keep_inbound,
    open_client,
    open_server,
    receive_unless_duplicate,
    remote_host,
    remote_name,
)

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from trio_websocket import WebSocketConnection

    from .._core._addresses import RunnerAddress
    from .._transport_abc import EndpointHandler, Envelope
    from ._peers import Limits
    from ._ws_connection import Settings

__all__ = ["MAX_IDLE_PEERS", "Listener", "WebSocketEndpoint"]

Listener = trio.abc.Listener[trio.abc.Stream]

MAX_IDLE_PEERS: Final = 256
"""Peers tracked before idle ones are forgotten (see `_new_peer`)."""


@attrs.define
class _Attempt:
    """One connection, dialed or accepted, and how it failed (if it did)."""

    conn: Connection | None = None
    """The connection, once the handshake made one."""
    failure: str | None = None
    """A connection error that ended it."""


class AfterDial(enum.Enum):
    """What a dialing task does once its connection attempt is over."""

    NOTHING = enum.auto()
    REDIAL = enum.auto()
    """Envelopes were queued while the connection ended: dial again."""
    FAILED = enum.auto()
    """The attempt failed: back off and report the peer lost."""
    DROP = enum.auto()
    """The peer's own connection came and went: drop what is queued."""


def after_dial(attempt: _Attempt, *, peer_connected: bool, pending: bool) -> AfterDial:
    """The step after a dial ended (pure).

    Args:
        attempt: the dial, its connection already detached.
        peer_connected: whether the peer has a connection now.
        pending: whether envelopes are queued for the peer (and the
            endpoint is not closing).
    """
    if attempt.conn is not None:
        return AfterDial.REDIAL if pending and not peer_connected else AfterDial.NOTHING
    if peer_connected:
        return AfterDial.NOTHING  # the peer's own connection is up instead
    if attempt.failure is not None:
        return AfterDial.FAILED
    return AfterDial.DROP if pending else AfterDial.NOTHING


class _Peer:
    """What an endpoint knows about one peer runner."""

    def __init__(self, address: RunnerAddress, limits: Limits) -> None:
        self.address = address
        self.queue = SendQueue(address, limits)
        self.connection: Connection | None = None
        self.dialing = False
        self.attached = trio.Event()
        self.failures = 0
        self.retry_at = -math.inf
        self.last_failure = ""


class WebSocketEndpoint(Endpoint):
    """An endpoint of a `WebSocketTransport` (made by its ``open_endpoint``)."""

    def __init__(
        self,
        settings: Settings,
        address: RunnerAddress,
        handler: EndpointHandler,
        nursery: trio.Nursery,
    ) -> None:
        self._settings = settings
        self._limits = settings.limits
        self._address = address
        self._handler = handler
        self._nursery = nursery
        self._context = contextvars.copy_context()
        self._packer = new_packer()
        self._peers: dict[RunnerAddress, _Peer] = {}
        self._counters = Counters()
        self._warnings = LogLimiter(logger=log)
        """Bounds what peers make this endpoint log (issue 12, item 8)."""
        self._closing = False
        self._listen_scope = trio.CancelScope()
        self._admission = Admission(settings.connections)
        self._refusals = Refusals(
            self._counters, self._warnings, settings.timing.close_timeout
        )

    @property
    def address(self) -> RunnerAddress:
        return self._address

    def send_nowait(self, peer: RunnerAddress, envelope: Envelope) -> None:
        """See `trio_cluster.abc.Endpoint.send_nowait`.

        The first envelope to a peer that is not connected starts a
        connection attempt and is queued; if the attempt fails, the queue is
        dropped, ``peer_lost`` is reported, and until the backoff delay is
        over every ``send_nowait`` to that peer raises at once.

        Raises:
            trio.ClosedResourceError: the endpoint's block has ended.
            ValueError: ``peer`` is this endpoint's own address.
        """
        if self._closing:
            raise trio.ClosedResourceError("this WebSocket endpoint is closed")
        data = encode_envelope(envelope, self._limits.max_message_size, self._packer)
        entry = self._peers.get(peer)
        if entry is not None and entry.connection is not None:
            entry.queue.push(data)  # the hot path: connected
            return
        if peer == self._address:
            raise ValueError(f"an endpoint cannot send to itself ({peer})")
        if entry is None:
            entry = self._new_peer(peer)
        if entry.dialing:
            entry.queue.push(data)
            return
        wait = entry.retry_at - trio.current_time()
        if wait > 0:
            raise RunnerUnavailableError(
                runner=str(peer),
                detail=f"unreachable ({entry.last_failure}),"
                f" next attempt in {wait:.3g} s",
            )
        entry.queue.push(data)
        entry.dialing = True
        entry.attached = trio.Event()
        self._spawn(self._dial, entry)

    async def send(self, peer: RunnerAddress, envelope: Envelope) -> None:
        """See `trio_cluster.abc.Endpoint.send`: when the connection to
        ``peer`` is up and idle, the envelope is written from the calling
        task (`Connection.send_now`), else it is queued as by
        `send_nowait`.

        Raises:
            trio.ClosedResourceError, ValueError, MessageTooLargeError,
            RunnerUnavailableError, MalformedMessageError: as
            `send_nowait` (nothing was queued).

        Cancellation: as the default (if cancelled, the envelope leaves
        anyway).
        """
        entry = self._peers.get(peer)
        conn = None if entry is None else entry.connection
        if conn is None or self._closing or not conn.can_send_now():
            self.send_nowait(peer, envelope)
            await trio.lowlevel.checkpoint()
            return
        assert entry is not None
        data = encode_envelope(envelope, self._limits.max_message_size, self._packer)
        entry.queue.push(data, wake=False)
        conn.send_now()
        await trio.lowlevel.checkpoint()

    def is_connected(self, peer: RunnerAddress) -> bool:
        entry = self._peers.get(peer)
        return entry is not None and entry.connection is not None

    def statistics(self) -> EndpointStatistics:
        """A snapshot of this endpoint's traffic counters."""
        up = sum(entry.connection is not None for entry in self._peers.values())
        return self._counters.snapshot(up)

    def _new_peer(self, address: RunnerAddress) -> _Peer:
        """Start tracking ``address``; past `MAX_IDLE_PEERS` entries, first
        forget the peers with nothing going on (no connection, no attempt,
        nothing queued, backoff over), so a long-lived runner that saw many
        peers come and go does not keep them all."""
        if len(self._peers) >= MAX_IDLE_PEERS:
            now = trio.current_time()
            for old in [
                entry
                for entry in self._peers.values()
                if entry.connection is None
                and not entry.dialing
                and not entry.queue
                and entry.retry_at <= now
            ]:
                del self._peers[old.address]
        entry = self._peers[address] = _Peer(address, self._limits)
        return entry

    def _spawn(self, fn: Callable[..., Any], *args: Any) -> None:
        # Nursery.start_soon copies the *current* context: run it in ours.
        self._context.run(self._nursery.start_soon, fn, *args)

    # ------------------------------------------------------------------
    # Shutdown

    async def aclose(self) -> None:
        """Stop listening and close every connection: gracefully (close
        frames, bounded by ``close_timeout``), or at once if cancelled.
        Connection attempts still in progress are cancelled."""
        self._closing = True
        self._listen_scope.cancel()
        closing: list[Connection] = []
        for entry in self._peers.values():
            entry.queue.clear()
            if entry.connection is not None:
                closing.append(entry.connection)
                entry.connection.end(
                    "endpoint closed", code=CloseCode.GOING_AWAY, report=False
                )
        try:
            with trio.move_on_after(self._settings.timing.close_timeout):
                for conn in closing:
                    await conn.closed.wait()
        finally:
            self._nursery.cancel_scope.cancel()

    # ------------------------------------------------------------------
    # Peers: attach, detach, failed dials

    def _attach(self, entry: _Peer, conn: Connection) -> None:
        old = entry.connection
        if old is not None:
            old.end(
                "replaced by a new connection from the peer", code=CloseCode.DUPLICATE
            )
            self._detach(old, None)
        entry.connection = conn
        entry.failures = 0
        entry.retry_at = -math.inf
        entry.attached.set()
        self._counters.connects += 1
        log.debug(
            "connected to %s (%s)",
            entry.address,
            "dialed" if conn.initiated else "accepted",
        )

    def _detach(self, conn: Connection, failure: str | None) -> None:
        entry = self._peers.get(conn.peer)
        if entry is None or entry.connection is not conn:
            return
        entry.connection = None
        self._counters.envelopes_dropped += entry.queue.clear()
        ending = conn.ending
        reason = ending.reason if ending is not None else failure or "connection closed"
        if (ending is None or ending.report) and not self._closing:
            report_lost(self._handler, conn.peer, reason)

    def _dial_failed(self, entry: _Peer, reason: str) -> None:
        settings = self._settings
        self._counters.connect_failures += 1
        entry.failures += 1
        delay = settings.backoff.delay(entry.failures - 1, settings.rng.random())
        entry.retry_at = trio.current_time() + delay
        entry.last_failure = reason
        self._counters.envelopes_dropped += entry.queue.clear()
        if not self._closing:
            report_lost(self._handler, entry.address, f"cannot connect: {reason}")

    def _new_connection(
        self, ws: WebSocketConnection, entry: _Peer, *, initiated: bool
    ) -> Connection:
        return Connection(
            ws,
            entry.address,
            initiated=initiated,
            queue=entry.queue,
            handler=self._handler,
            limits=self._limits,
            timing=self._settings.timing,
            counters=self._counters,
            warnings=self._warnings,
        )

    async def _serve(self, conn: Connection) -> None:
        await conn.run()
        self._detach(conn, None)  # report the loss before the bounded close
        await conn.close()

    # ------------------------------------------------------------------
    # Dialing

    async def _attempt(
        self,
        attempt: _Attempt,
        handshake: Callable[[trio.Nursery], Awaitable[Connection | None]],
    ) -> None:
        """Run ``handshake``, then serve its connection until it ends.

        Every failure of this one connection ends here, recorded as
        ``attempt.failure``: a connection error, and any other exception
        (a library's or our own bug hit by what this peer sent, such as
        wsproto's `UnicodeDecodeError` for a header that is not ASCII),
        whose traceback is logged at debug level only (a client could send
        the same bytes again and again). `trio.Cancelled` propagates.
        """
        try:
            async with trio.open_nursery() as nursery:
                attempt.conn = await handshake(nursery)
                if attempt.conn is not None:
                    await self._serve(attempt.conn)
                nursery.cancel_scope.cancel()
        except* CONNECTION_ERRORS as group:
            attempt.failure = describe(group)
        except* Exception as group:
            attempt.failure = unexpected_failure(group)
            # Reported by the caller like any failure; the traceback only at
            # debug level.
            log.debug("%s", attempt.failure, exc_info=group)

    def _finish(self, attempt: _Attempt) -> None:
        if attempt.conn is not None:
            self._detach(attempt.conn, attempt.failure)
            attempt.conn.closed.set()

    async def _dial(self, entry: _Peer) -> None:
        attempt = _Attempt()
        streams: list[trio.abc.Stream] = []
        try:
            await self._attempt(
                attempt, partial(self._client_handshake, entry=entry, streams=streams)
            )
        finally:
            for stream in streams:
                await trio.aclose_forcefully(stream)
            entry.dialing = False
            self._finish(attempt)
            after = after_dial(
                attempt,
                peer_connected=entry.connection is not None,
                pending=bool(entry.queue) and not self._closing,
            )
            if after is AfterDial.REDIAL:
                # Sent while this connection was ending (e.g. a call routed
                # again from peer_lost): dial again for them now, rather than
                # leave them queued with no dial to send them.
                entry.dialing = True
                entry.attached = trio.Event()
                self._spawn(self._dial, entry)
            elif after is AfterDial.FAILED:
                assert attempt.failure is not None
                self._dial_failed(entry, attempt.failure)
            elif after is AfterDial.DROP:
                # The peer's connection came up and is already gone.
                self._counters.envelopes_dropped += entry.queue.clear()
                report_lost(self._handler, entry.address, "connection closed")

    async def _client_handshake(
        self, nursery: trio.Nursery, *, entry: _Peer, streams: list[trio.abc.Stream]
    ) -> Connection | None:
        """Connect, exchange hellos (and proofs, if the cluster
        authenticates); return the attached connection, or None if the peer
        keeps its own connection to us instead."""
        settings = self._settings
        timing = settings.timing
        secrets = settings.secrets
        with trio.move_on_after(timing.connect_timeout):
            ws = await open_client(
                nursery,
                entry.address,
                self._limits,
                settings.client_ssl_context,
                streams,
            )
            nonce = None if secrets is None else new_nonce()
            await ws.send_message(encode_hello(self._address, nonce))
            reply = await receive_unless_duplicate(ws)
            accepted = reply is not None
            if reply is not None:
                hello = await check_server_hello(
                    ws,
                    reply,
                    dialed=entry.address,
                    authenticating=secrets is not None,
                    refusals=self._refusals,
                )
                if secrets is not None:
                    assert nonce is not None
                    accepted = await authenticate_listener(
                        ws,
                        hello,
                        nonce=nonce,
                        local=self._address,
                        secrets=secrets,
                        refusals=self._refusals,
                    )
            if not accepted:
                # The peer keeps the connection it is dialing to us.
                await entry.attached.wait()
                return None
            if entry.connection is not None:  # its own connection won meanwhile
                await close_websocket(
                    ws, CloseCode.DUPLICATE, "duplicate", timing.close_timeout
                )
                return None
            conn = self._new_connection(ws, entry, initiated=True)
            self._attach(entry, conn)
            return conn
        raise ConnectFailedError(f"no connection within {timing.connect_timeout} s")

    # ------------------------------------------------------------------
    # Accepting

    async def serve(
        self,
        listeners: list[Listener],
        *,
        task_status: trio.TaskStatus[list[Listener]] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Accept connections on ``listeners`` until the endpoint closes
        (they are closed then). Each connection runs in its own task, whose
        failures are contained and logged."""
        with self._listen_scope:
            await trio.serve_listeners(
                self._accept,
                listeners,
                handler_nursery=self._nursery,
                task_status=task_status,
            )

    async def _accept(self, stream: trio.abc.Stream) -> None:
        """Serve one accepted stream, if `Admission` has a slot for it;
        otherwise close it at once, unread (counted in
        ``connections_refused``)."""
        slot = self._admission.admit()
        if slot is None:
            self._counters.connections_refused += 1
            log.debug(
                "refusing the connection from %s: %d connections, %d handshaking",
                remote_name(stream),
                self._admission.open,
                self._admission.pending,
            )
            await trio.aclose_forcefully(stream)
            return
        remote = remote_name(stream)
        attempt = _Attempt()
        try:
            await self._attempt(
                attempt,
                partial(
                    self._server_handshake, stream=stream, remote=remote, slot=slot
                ),
            )
            if attempt.conn is None and attempt.failure is not None:
                self._warnings.log(
                    logging.INFO,
                    remote_host(remote),
                    "failed connections",
                    "connection from %s failed: %s",
                    remote,
                    attempt.failure,
                )
        finally:
            try:
                self._finish(attempt)
                await trio.aclose_forcefully(stream)
            finally:
                slot.release()

    async def _server_handshake(
        self,
        nursery: trio.Nursery,
        *,
        stream: trio.abc.Stream,
        remote: str,
        slot: Slot,
    ) -> Connection | None:
        timing = self._settings.timing
        secrets = self._settings.secrets
        with trio.move_on_after(timing.connect_timeout):
            ws, first = await open_server(nursery, stream, self._limits)
            hello = await check_client_hello(
                ws,
                first,
                local=self._address,
                remote=remote,
                secrets=secrets,
                refusals=self._refusals,
            )
            if hello is None:
                return None
            if secrets is not None and not await authenticate_dialer(
                ws,
                hello,
                local=self._address,
                remote=remote,
                secrets=secrets,
                refusals=self._refusals,
            ):
                return None
            slot.hello_done()
            allow_messages(ws, self._limits)
            return await self._keep_or_refuse(ws, hello.address)
        self._warnings.log(
            logging.INFO,
            remote_host(remote),
            "connections without a hello",
            "no WebSocket handshake and hello from %s within %s s: closing",
            remote,
            timing.connect_timeout,
        )
        return None

    async def _keep_or_refuse(
        self, ws: WebSocketConnection, peer: RunnerAddress
    ) -> Connection | None:
        """Keep an inbound connection from ``peer`` as the pair's one (and
        answer with our hello), or close it (`keep_inbound`)."""
        close_timeout = self._settings.timing.close_timeout
        if self._closing:
            await close_websocket(ws, CloseCode.GOING_AWAY, "closing", close_timeout)
            return None
        entry = self._peers.get(peer)
        if entry is None:
            entry = self._new_peer(peer)
        dialed_up = entry.connection is not None and entry.connection.initiated
        if not keep_inbound(
            self._address, peer, dialing=entry.dialing, dialed_up=dialed_up
        ):
            log.debug("refusing a duplicate connection from %s", peer)
            await close_websocket(ws, CloseCode.DUPLICATE, "duplicate", close_timeout)
            return None
        conn = self._new_connection(ws, entry, initiated=False)
        self._attach(entry, conn)  # before any await: no dial may start now
        if self._settings.secrets is None:
            await ws.send_message(encode_hello(self._address))
        else:
            await ws.send_message(ACCEPTED)  # our hello is sent already
        return conn
