"""Per-peer send queues, limits, statistics and handler calls shared by the
transports (Trio driver helpers of the transport edge).

Theory of operation: ``send_nowait`` encodes an envelope and appends the bytes
to the peer's `SendQueue`, which wakes the connection's writer task (unless
the sending task writes the queue out itself: see
`trio_cluster.transport._ws_connection`). Whoever sends takes as many queued
envelopes as fit in one frame (`SendQueue.take_frame`): everything queued
since the last frame leaves together, in queue order, and no frame is over
``max_message_size``. The queue is bounded
in envelopes and in bytes; over either bound, ``send_nowait`` raises
`RunnerUnavailableError` and queues nothing. When the connection is lost the
queue is cleared (those envelopes are dropped: the runtime fails over).
"""

from __future__ import annotations

import logging
from collections import deque
from typing import TYPE_CHECKING, Any, Final

import attrs
import trio

from .._errors import ConfigError, RunnerUnavailableError
from .._groups import unwrap_single as unwrap_single
from .._transport_abc import EndpointStatistics
from ._framing import FRAME_OVERHEAD, check_max_message_size, frame_header

if TYPE_CHECKING:
    from .._core._addresses import RunnerAddress
    from .._transport_abc import EndpointHandler, Envelope

__all__ = [
    "DEFAULT_MAX_MESSAGE_SIZE",
    "QUEUE_FULL",
    "Counters",
    "EndpointStatistics",
    "Limits",
    "SendQueue",
    "deliver",
    "handler_raised",
    "log",
    "positive_int",
    "report_lost",
    "unwrap_single",
]

log = logging.getLogger("trio_cluster.transport")

DEFAULT_MAX_MESSAGE_SIZE: Final = 4 * 1024 * 1024
"""Default largest frame, in bytes (4 MiB)."""

QUEUE_FULL: Final = "send queue full"
"""The ``detail`` of the `RunnerUnavailableError` raised when a peer's queue
is over its limit."""


def positive_int(_: object, attribute: attrs.Attribute[int], value: Any) -> None:
    """An attrs validator of the transports' counts: an int >= 1.

    Raises:
        ConfigError: anything else (a bool too).
    """
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{attribute.name} must be an int >= 1, got {value!r}")


def _message_size(_: object, __: attrs.Attribute[int], value: Any) -> None:
    check_max_message_size(value)


@attrs.frozen
class Limits:
    """Size limits of a transport (validated eagerly).

    Raises:
        ConfigError: on construction, for a value that is not a positive int,
            a ``max_message_size`` under 1 KiB, or a ``max_queued_bytes``
            smaller than ``max_message_size`` (a queue must hold at least one
            envelope of the largest size).
    """

    max_message_size: int = attrs.field(validator=_message_size)
    """Largest frame, in bytes; an envelope may use all of it but
    `FRAME_OVERHEAD`."""
    message_queue_size: int = attrs.field(validator=positive_int)
    """Frames a connection buffers on the receiving side (memory: in flight
    per direction; WebSocket: until the connection is up, then each is
    handled as it is parsed)."""
    max_queued_envelopes: int = attrs.field(validator=positive_int)
    """Most envelopes queued for one peer."""
    max_queued_bytes: int = attrs.field(validator=positive_int)
    """Most encoded bytes queued for one peer."""

    def __attrs_post_init__(self) -> None:
        if self.max_queued_bytes < self.max_message_size:
            raise ConfigError(
                f"max_queued_bytes ({self.max_queued_bytes}) must be at least"
                f" max_message_size ({self.max_message_size})"
            )


@attrs.define
class Counters:
    """The mutable counters behind `EndpointStatistics`."""

    frames_sent: int = 0
    envelopes_sent: int = 0
    bytes_sent: int = 0
    frames_received: int = 0
    envelopes_received: int = 0
    envelopes_dropped: int = 0
    connects: int = 0
    connect_failures: int = 0
    bad_peers: int = 0
    connections_refused: int = 0
    unauthenticated_peers: int = 0

    def snapshot(self, connections: int) -> EndpointStatistics:
        """Freeze the counters, with ``connections`` up now."""
        return EndpointStatistics(connections=connections, **attrs.asdict(self))

    def sent(self, frame: bytes, count: int) -> None:
        """Count a frame of ``count`` envelopes written."""
        self.frames_sent += 1
        self.envelopes_sent += count
        self.bytes_sent += len(frame)


class SendQueue:
    """Encoded envelopes waiting for one peer's writer task."""

    def __init__(self, peer: RunnerAddress, limits: Limits) -> None:
        self._peer = peer
        self._limits = limits
        self._items: deque[bytes] = deque()
        self._bytes = 0
        self._ready = trio.Event()
        self.held = False
        """While true, `push` does not wake the writer: a connection's
        reader holds the queue while it dispatches a frame, then sends
        what the handler queued itself (or wakes the writer)."""

    def __len__(self) -> int:
        return len(self._items)

    def push(self, data: bytes, *, wake: bool = True) -> None:
        """Queue one encoded envelope and wake the writer (unless ``wake``
        is false or the queue is `held`: then the caller sends the queue
        itself or calls `wake`).

        Raises:
            RunnerUnavailableError: the queue is at its envelope or byte
                limit (``detail`` is `QUEUE_FULL`); nothing was queued.
        """
        limits = self._limits
        if (
            len(self._items) >= limits.max_queued_envelopes
            or self._bytes + len(data) > limits.max_queued_bytes
        ):
            raise RunnerUnavailableError(runner=str(self._peer), detail=QUEUE_FULL)
        self._items.append(data)
        self._bytes += len(data)
        if wake and not self.held:
            self._ready.set()

    def wake(self) -> None:
        """Wake the writer (if anything is queued)."""
        if self._items:
            self._ready.set()

    async def wait(self) -> None:
        """Block until something is queued (returns at once if it is).

        Cancellation: safe; nothing is taken from the queue.
        """
        while not self._items:
            self._ready = trio.Event()
            await self._ready.wait()

    def take_frame(self) -> tuple[bytes, int]:
        """Remove the longest prefix of the queue that fits in one frame.

        Returns:
            The frame, and how many envelopes it carries (0 if the queue was
            empty: the frame is then an empty array).
        """
        items = self._items
        budget = self._limits.max_message_size - FRAME_OVERHEAD
        parts: list[bytes] = []
        size = 0
        while items and size + len(items[0]) <= budget:
            data = items.popleft()
            size += len(data)
            parts.append(data)
        self._bytes -= size
        return frame_header(len(parts)) + b"".join(parts), len(parts)

    def clear(self) -> int:
        """Drop everything queued; return how many envelopes were dropped."""
        dropped = len(self._items)
        self._items.clear()
        self._bytes = 0
        return dropped


def deliver(
    handler: EndpointHandler, peer: RunnerAddress, envelope: Envelope
) -> str | None:
    """Hand one envelope to the handler.

    Returns:
        None, or why the connection must close: the handler raised (the
        exception is logged with its traceback).
    """
    try:
        handler.envelope_received(peer, envelope)
    except Exception as exc:
        return handler_raised(peer, exc)
    return None


def handler_raised(peer: RunnerAddress, exc: Exception) -> str:
    """Log that the handler raised ``exc`` on an envelope from ``peer`` (with
    its traceback); return why the connection must close."""
    log.error("the endpoint handler raised on an envelope from %s", peer, exc_info=exc)
    return f"the handler raised {type(exc).__name__}"


def report_lost(handler: EndpointHandler, peer: RunnerAddress, reason: str) -> None:
    """Tell the handler the connection to ``peer`` is gone (logging, never
    raising, if it raises)."""
    log.info("connection to %s lost: %s", peer, reason)
    try:
        handler.peer_lost(peer, reason)
    except Exception:
        log.exception("the endpoint handler raised in peer_lost(%s)", peer)
