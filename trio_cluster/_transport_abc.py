"""The transport contract: moving envelopes between runners (interface).

A transport gives each runner an `Endpoint`: it listens at the runner's
address and keeps one connection per peer runner, opened on demand. The
runtime hands it *envelopes* (lists of msgpack-encodable primitives: ints,
floats, str, bytes, bool, None, lists, dicts) with `Endpoint.send_nowait`;
the transport batches every envelope queued for a peer in the same scheduler
tick into one frame, and delivers each received envelope, in order, to the
runtime's `EndpointHandler` (synchronously, from the connection's reader
task).

What travels inside an envelope is the runtime's business; the transport's is
framing, limits, liveness and reconnection:

* an envelope that would not fit in ``max_message_size`` is refused at
  `send_nowait` with `MessageTooLargeError`;
* a peer whose send queue is over its limit, or that cannot be reached, makes
  `send_nowait` raise `RunnerUnavailableError` (nothing queued);
* bad input from a peer (an undecodable frame, a frame that is not a list of
  envelopes, an oversized frame, another protocol version) closes only that
  connection, with a log line; the endpoint keeps serving everyone else;
* a connection that drops, or whose peer stops answering pings, is reported
  with `EndpointHandler.peer_lost` (a liveness signal for sharding); envelopes
  still queued for it are dropped (the runtime's requests fail over), and the
  next `send_nowait` to that peer reconnects (with backoff after failures).

Ordering: envelopes to one peer arrive in the order they were queued, as long
as the connection stays up. Delivery is at most once.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any

import attrs
import trio

if TYPE_CHECKING:
    from collections.abc import Sequence
    from contextlib import AbstractAsyncContextManager

    from ._core._addresses import RunnerAddress

__all__ = ["Endpoint", "EndpointHandler", "EndpointStatistics", "Envelope", "Transport"]

Envelope = list[Any]
"""One message between runners: a list of msgpack-encodable primitives."""


class EndpointHandler(ABC):
    """What an endpoint calls when something arrives (implemented by the runtime).

    Both methods are called synchronously from the transport's tasks and must
    not block; they must not raise (an exception is logged and the connection
    closed).
    """

    @abstractmethod
    def envelope_received(self, peer: RunnerAddress, envelope: Envelope) -> None:
        """``envelope`` arrived from ``peer`` (the address the peer announced)."""

    def envelopes_received(
        self, peer: RunnerAddress, envelopes: Sequence[Envelope]
    ) -> None:
        """``envelopes`` arrived from ``peer``, in this order (several of one
        frame): the same as `envelope_received` for each, which is what
        this default does; a handler may do it at less cost per envelope. If
        it raises, the envelopes after the one that raised are not
        delivered (the transport closes the connection)."""
        for envelope in envelopes:
            self.envelope_received(peer, envelope)

    @abstractmethod
    def peer_lost(self, peer: RunnerAddress, reason: str) -> None:
        """The connection to ``peer`` dropped or stopped answering."""


@attrs.frozen
class EndpointStatistics:
    """A snapshot of one endpoint's traffic since it opened."""

    connections: int
    """Connections up now (one per connected peer)."""
    frames_sent: int
    """Frames written (each carries one or more envelopes)."""
    envelopes_sent: int
    """Envelopes written in those frames."""
    bytes_sent: int
    """Bytes of those frames."""
    frames_received: int
    """Frames read and decoded."""
    envelopes_received: int
    """Envelopes delivered to the handler."""
    envelopes_dropped: int
    """Queued envelopes dropped because their connection was lost."""
    connects: int
    """Connections established (dialed or accepted)."""
    connect_failures: int
    """Connection attempts that failed."""
    bad_peers: int
    """Connections closed because the peer sent bad input."""
    connections_refused: int = 0
    """Accepted connections closed at once because the endpoint held as
    many as its limits allow (WebSocket transport)."""
    unauthenticated_peers: int = 0
    """Connections refused because the peer did not prove the cluster
    secret, or (dialing) the runner dialed did not (WebSocket transport)."""


class Endpoint(ABC):
    """One runner's end of the transport."""

    @property
    @abstractmethod
    def address(self) -> RunnerAddress:
        """Where peers reach this endpoint (with the real port if 0 was asked)."""

    @abstractmethod
    def send_nowait(self, peer: RunnerAddress, envelope: Envelope) -> None:
        """Queue ``envelope`` for ``peer``; it leaves in a batch within the
        current scheduler tick (or as soon as the connection is up).

        Raises:
            MessageTooLargeError: the encoded envelope is over the limit.
            RunnerUnavailableError: the peer cannot be reached now, or its
                send queue is full.
            MalformedMessageError: the envelope is not encodable.
        """

    async def send(self, peer: RunnerAddress, envelope: Envelope) -> None:
        """`send_nowait`, from a task that may wait: a transport may then
        write the envelope from the calling task (when the connection is
        idle) rather than wake another task for it. The default queues it
        with `send_nowait`.

        Raises:
            MessageTooLargeError, RunnerUnavailableError,
            MalformedMessageError: as `send_nowait` (nothing was queued).

        Cancellation: a checkpoint after the envelope is queued; if
        cancelled, the envelope leaves anyway.
        """
        self.send_nowait(peer, envelope)
        await trio.lowlevel.checkpoint()

    @abstractmethod
    def is_connected(self, peer: RunnerAddress) -> bool:
        """Whether a connection to ``peer`` is up now."""

    def statistics(self) -> EndpointStatistics | None:
        """A snapshot of this endpoint's traffic since it opened (it shows in
        `RunnerStatistics.transport`); None if the transport keeps none."""
        return None


class Transport(ABC):
    """A way for runners to reach each other."""

    @abstractmethod
    def open_endpoint(
        self, address: RunnerAddress, handler: EndpointHandler
    ) -> AbstractAsyncContextManager[Endpoint]:
        """Listen at ``address`` (port 0: pick a free port) and serve until the
        block ends; then every connection is closed (queued envelopes are
        dropped). Raises `RunnerUnavailableError` if it cannot listen.
        """
