"""`MemoryTransport`: runners of one process reaching each other (edge adapter).

One `MemoryNetwork` is one "network". Each runner opens its endpoint on it at
its address, exactly as it would listen on a port, so a cluster in one
process (tests, the simulator, the demo) behaves like a real one:

* envelopes go through the real wire format: encoded (and checked) at
  ``send_nowait``, batched into frames by a writer task per connection,
  decoded by a reader task on the other side, so ordering, batching and
  limits match the WebSocket transport;
* a connection opens on the first ``send_nowait`` to a peer (synchronously:
  an unreachable peer raises at once) and is shared by both directions;
* when it closes, the other side reports ``peer_lost``; for faults injected
  through the network (`MemoryNetwork.partition`, `MemoryNetwork.kill`), the
  report is made before the fault method returns.

Everything runs on Trio's clock, so it works on a ``MockClock``: delays
injected with `MemoryNetwork.fault` are virtual time.

Theory of operation: a connection is a `_Link` with two `_Side` objects, one
per endpoint. Each side runs, in its endpoint's nursery, a writer (the peer's
`SendQueue` to frames into the other side's inbox channel) and a reader (its
inbox to the handler). A graceful close (the endpoint's block ends) closes the
channels, so the other side delivers what was already in flight and then
reports the loss; an abrupt one (kill, partition, bad input) cancels both
sides at once.
"""

from __future__ import annotations

import contextvars
import math
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import TYPE_CHECKING

import attrs
import trio

from .._core._addresses import RunnerAddress
from .._errors import MalformedMessageError, RunnerUnavailableError
from .._log_limit import LogLimiter
from .._transport_abc import Endpoint, EndpointHandler, Transport
from ._framing import (
    Packer,
    decode_frame,
    decode_hello,
    encode_envelope,
    encode_hello,
    new_packer,
)
from ._memory_network import MemoryNetwork
from ._peers import (
    DEFAULT_MAX_MESSAGE_SIZE,
    Counters,
    EndpointStatistics,
    Limits,
    SendQueue,
    deliver,
    log,
    report_lost,
    unwrap_single,
)

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from .._transport_abc import Envelope

__all__ = ["MemoryEndpoint", "MemoryTransport"]

_Frame = tuple[float, bytes]  # (due time, frame)


class _Side:
    """One endpoint's half of a memory connection."""

    def __init__(
        self,
        endpoint: MemoryEndpoint,
        peer: RunnerAddress,
        inbox: trio.MemoryReceiveChannel[_Frame],
        outbox: trio.MemorySendChannel[_Frame],
    ) -> None:
        self.endpoint = endpoint
        self.peer = peer
        self.inbox = inbox
        self.outbox = outbox
        self.queue = SendQueue(peer, endpoint.limits)
        self.scope = trio.CancelScope()
        self.last_due = -math.inf
        self.link: _Link | None = None


class _Link:
    """A connection between two memory endpoints."""

    def __init__(
        self,
        a: MemoryEndpoint,
        b_address: RunnerAddress,
        b: MemoryEndpoint,
        a_address: RunnerAddress,
    ) -> None:
        a_to_b, b_inbox = trio.open_memory_channel[_Frame](b.limits.message_queue_size)
        b_to_a, a_inbox = trio.open_memory_channel[_Frame](a.limits.message_queue_size)
        self.sides = (
            _Side(a, b_address, a_inbox, a_to_b),
            _Side(b, a_address, b_inbox, b_to_a),
        )
        self.closed = False
        for side in self.sides:
            side.link = self
            side.endpoint.attach(side)

    def other(self, side: _Side) -> _Side:
        return self.sides[1] if side is self.sides[0] else self.sides[0]

    def _close(self) -> None:
        self.closed = True
        for side in self.sides:
            side.scope.cancel()
            side.outbox.close()
            side.inbox.close()
            side.endpoint.detach(side)

    def abort(self, reason_a: str | None, reason_b: str | None) -> None:
        """Drop the connection now; report to each side given a reason."""
        if self.closed:
            return
        self._close()
        for side, reason in zip(self.sides, (reason_a, reason_b), strict=True):
            if reason is not None and not side.endpoint.killed:
                report_lost(side.endpoint.handler, side.peer, reason)

    def abort_from(self, endpoint: MemoryEndpoint, reason: str) -> None:
        """Drop the connection now; report ``reason`` to the other side only."""
        first = self.sides[0].endpoint is endpoint
        self.abort(None if first else reason, reason if first else None)

    def shutdown_from(self, side: _Side) -> None:
        """Graceful close by ``side``'s endpoint: the other side still gets
        the frames already in flight, then reports the loss."""
        if self.closed:
            return
        side.scope.cancel()
        side.outbox.close()
        side.inbox.close()
        side.endpoint.detach(side)


@attrs.define(eq=False)
class MemoryEndpoint(Endpoint):
    """An endpoint on a `MemoryNetwork` (made by `MemoryTransport.open_endpoint`)."""

    network: MemoryNetwork
    limits: Limits
    _address: RunnerAddress
    handler: EndpointHandler
    links: dict[RunnerAddress, _Link] = attrs.field(init=False, factory=dict)
    killed: bool = attrs.field(init=False, default=False)
    closed: bool = attrs.field(init=False, default=False)
    nursery: trio.Nursery | None = attrs.field(init=False, default=None)
    """Where connection tasks run (set when the endpoint's block starts)."""
    _sides: dict[RunnerAddress, _Side] = attrs.field(init=False, factory=dict)
    _counters: Counters = attrs.field(init=False, factory=Counters)
    _warnings: LogLimiter = attrs.field(
        init=False, factory=lambda: LogLimiter(logger=log)
    )
    """Bounds what peers make this endpoint log (issue 12, item 8)."""
    _context: contextvars.Context = attrs.field(
        init=False, factory=contextvars.copy_context
    )
    _packer: Packer = attrs.field(init=False, factory=new_packer)

    def __attrs_post_init__(self) -> None:
        self._address = self.network.register(self._address, self)

    @property
    def address(self) -> RunnerAddress:
        return self._address

    def send_nowait(self, peer: RunnerAddress, envelope: Envelope) -> None:
        """See `trio_cluster.abc.Endpoint.send_nowait`.

        Raises:
            trio.ClosedResourceError: the endpoint's block has ended.
            ValueError: ``peer`` is this endpoint's own address.
        """
        if self.closed:
            raise trio.ClosedResourceError("this memory endpoint is closed")
        if self.killed:
            raise RunnerUnavailableError(
                runner=str(peer), detail="this endpoint was killed"
            )
        if peer == self.address:
            raise ValueError(f"an endpoint cannot send to itself ({peer})")
        data = encode_envelope(envelope, self.limits.max_message_size, self._packer)
        side = self._sides.get(peer)
        if side is None:
            remote = self.network.reach(self.address, peer)
            # The hellos go through the real codec, as on the wire.
            _Link(
                self,
                decode_hello(encode_hello(remote.address)).address,
                remote,
                decode_hello(encode_hello(self.address)).address,
            )
            side = self._sides[peer]
        side.queue.push(data)

    def is_connected(self, peer: RunnerAddress) -> bool:
        return peer in self._sides

    def statistics(self) -> EndpointStatistics:
        """A snapshot of this endpoint's traffic counters."""
        return self._counters.snapshot(len(self._sides))

    def attach(self, side: _Side) -> None:
        """Start serving a new connection (called by `_Link`)."""
        assert side.link is not None
        self._sides[side.peer] = side
        self.links[side.peer] = side.link
        self._counters.connects += 1
        assert self.nursery is not None
        # Nursery.start_soon copies the current context, which is the
        # *sender's* (its send_nowait opened the link): run it in ours.
        self._context.run(self.nursery.start_soon, self._run_side, side)

    def drop_link(self, peer: RunnerAddress, reason: str) -> None:
        """Drop the connection to ``peer`` (if any) at once; both sides
        report ``reason`` (a partition)."""
        link = self.links.get(peer)
        if link is not None:
            link.abort(reason, reason)

    def die(self, reason: str) -> None:
        """Vanish (the network already forgot this endpoint): every
        connection drops at once; peers report ``reason``, this endpoint's
        handler hears nothing more."""
        self.killed = True
        for link in list(self.links.values()):
            link.abort_from(self, reason)

    def detach(self, side: _Side) -> None:
        """Forget a connection that closed; drop what was queued for it."""
        if self._sides.get(side.peer) is side:
            del self._sides[side.peer]
            del self.links[side.peer]
        self._counters.envelopes_dropped += side.queue.clear()

    async def _run_side(self, side: _Side) -> None:
        with side.scope:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._write, side)
                nursery.start_soon(self._read, side)

    async def _write(self, side: _Side) -> None:
        peer = side.peer
        while True:
            await side.queue.wait()
            frame, count = side.queue.take_frame()
            self._counters.sent(frame, count)
            fault = self.network.frame_fault(self.address, peer)
            if fault.drop:
                continue
            due = max(side.last_due, trio.current_time() + fault.delay)
            side.last_due = due
            try:
                for _ in range(2 if fault.duplicate else 1):
                    await side.outbox.send((due, frame))
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                # The peer closed its end: its reader, or ours, reports it.
                return

    async def _read(self, side: _Side) -> None:
        async for due, frame in side.inbox:
            if due > trio.current_time():
                await trio.sleep_until(due)
            problem = self._dispatch(side, frame)
            if problem is not None:
                return
        # The peer closed its endpoint: everything it sent has arrived.
        assert side.link is not None
        side.link.abort(*self._reasons(side, "peer closed the connection", None))

    def _dispatch(self, side: _Side, frame: bytes) -> str | None:
        link = side.link
        assert link is not None
        try:
            envelopes = decode_frame(frame, self.limits.max_message_size)
        except MalformedMessageError as exc:
            self._counters.bad_peers += 1
            self._warnings.warning(
                side.peer,
                "refused connections",
                "closing the connection from %s: %s",
                side.peer,
                exc,
            )
            link.abort(*self._reasons(side, str(exc), f"refused by peer: {exc}"))
            return str(exc)
        self._counters.frames_received += 1
        for envelope in envelopes:
            if link.closed:
                return "closed"
            self._counters.envelopes_received += 1
            problem = deliver(self.handler, side.peer, envelope)
            if problem is not None:
                link.abort(*self._reasons(side, problem, "peer closed the connection"))
                return problem
        return None

    def _reasons(
        self, side: _Side, mine: str | None, theirs: str | None
    ) -> tuple[str | None, str | None]:
        """Order (this side's reason, the other's) as the link's sides."""
        assert side.link is not None
        if side.link.sides[0] is side:
            return mine, theirs
        return theirs, mine

    def close(self) -> None:
        """End every connection gracefully and leave the network."""
        self.closed = True
        self.network.unregister(self)
        for side in list(self._sides.values()):
            assert side.link is not None
            side.link.shutdown_from(side)


class MemoryTransport(Transport):
    """The transport for runners in one process, over a `MemoryNetwork`.

    Args:
        network: the network shared by every runner that should reach the
            others.
        max_message_size: largest frame in bytes; an envelope may use all of
            it but 5 bytes (default 4 MiB).
        message_queue_size: frames in flight per connection direction before
            the writer waits (like the socket buffers of a real connection).
        max_queued_envelopes: most envelopes queued for one peer.
        max_queued_bytes: most encoded bytes queued for one peer (at least
            ``max_message_size``).

    Raises:
        ConfigError: an invalid limit.
    """

    def __init__(
        self,
        network: MemoryNetwork,
        *,
        max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
        message_queue_size: int = 64,
        max_queued_envelopes: int = 65536,
        max_queued_bytes: int = 4 * DEFAULT_MAX_MESSAGE_SIZE,
    ) -> None:
        self.network = network
        self.limits = Limits(
            max_message_size=max_message_size,
            message_queue_size=message_queue_size,
            max_queued_envelopes=max_queued_envelopes,
            max_queued_bytes=max_queued_bytes,
        )

    def open_endpoint(
        self, address: RunnerAddress, handler: EndpointHandler
    ) -> AbstractAsyncContextManager[MemoryEndpoint]:
        """Open an endpoint at ``address`` on the network (port 0: the lowest
        free port from the network's ``first_port``) and serve until the block
        ends.

        On exit, normal or by cancellation, every connection closes at once
        (queued envelopes are dropped; frames already in flight still reach
        the peers, which then report ``peer_lost``) and the address is free.

        Raises:
            RunnerUnavailableError: another endpoint is open at ``address``.
        """
        return self._open(address, handler)

    @asynccontextmanager
    async def _open(
        self, address: RunnerAddress, handler: EndpointHandler
    ) -> AsyncIterator[MemoryEndpoint]:
        endpoint = MemoryEndpoint(self.network, self.limits, address, handler)
        async with unwrap_single(), trio.open_nursery() as nursery:
            endpoint.nursery = nursery
            try:
                yield endpoint
            finally:
                endpoint.close()
                nursery.cancel_scope.cancel()
