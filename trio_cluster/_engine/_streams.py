"""Stream handlers: the producer task and the caller's iterator (Trio driver).

A stream request is a `Job` of kind STREAM. When it gets a permit, a producer
task starts in the shard's nursery (in a copy of the runner's base context,
never in the caller's: see `_isolation`): it activates the entity, hands its
permit to the next message (streams run alongside other handlers), then drives the
handler's async generator and sends each item through a small memory channel
to the caller, who reads it with ``async for``. The channel's buffer is the
backpressure: a slow caller slows the generator down.

The caller's ``async with`` owns the request: leaving the block early (or
being cancelled) interrupts the generator with Trio cancellation. Errors the
generator raises reach the caller at the point of iteration: declared errors
as themselves, others as `RemoteError` (and the entity restarts).

The producer reaches the entity manager only through `StreamOwner` (permits,
outcomes, the end of the job), so this module does not import the manager.

A stream whose caller is on another runner crosses the wire as numbered
``STREAM_ITEM`` envelopes within a cumulative credit (`SendCredit` on the
owner, `ReceiveWindow` on the caller): items are numbered 1, 2, 3, ...; the
request grants items up to `STREAM_BUFFER`, and each ``STREAM_CREDIT`` raises
that *limit* (the highest item number the caller accepts), never adds to it.
So a frame the transport delivers twice changes nothing: a repeated item is
dropped by its number, a repeated credit grants no more. A missing number
(items lost in transit) or an item beyond the limit ends the stream with a
typed error instead of being skipped; ``STREAM_END`` carries the number of
items sent, so the loss of the last items is seen too.
"""

from __future__ import annotations

from contextlib import asynccontextmanager, suppress
from typing import TYPE_CHECKING, Any, Final, Protocol

import trio

from .._call_metadata import current_metadata_var
from .._context import current_entity_var
from .._core._job import StopReason
from .._errors import (
    EntityNotAssignedError,
    MalformedMessageError,
    RunnerUnavailableError,
)
from ..serialization._replies import Exit
from ._entity_lifecycle import activate
from ._outcomes import stream_item

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from .._tracing import TracedCall, Tracer
    from ._outcomes import Outcome, Requeue
    from ._slots import Job, Slot

__all__ = [
    "CREDIT_BATCH",
    "END",
    "ITEM",
    "STREAM_BUFFER",
    "ReceiveWindow",
    "SendCredit",
    "StreamOwner",
    "StreamReceiver",
    "consume",
    "end_stream_nowait",
    "open_stream_channel",
    "run_stream",
]

STREAM_BUFFER: Final = 16
"""Items buffered between a stream's generator and its caller; for a remote
caller, also its credit window (items sent but not yet read)."""
CREDIT_BATCH: Final = STREAM_BUFFER // 2
"""A remote caller raises the owner's limit once its consumer has read this
many items since the last grant."""

ITEM: Final = 0
"""Tag of ``(ITEM, value)`` in a stream's channel."""
END: Final = 1
"""Tag of ``(END, exit)``, the last thing in a stream's channel."""


class StreamOwner(Protocol):
    """What a stream's producer and consumer need from the owner of its job
    (the entity manager)."""

    @property
    def serialize(self) -> bool:
        """Items make their codec's round trip even in-process."""

    def release_stream_permit(self, slot: Slot) -> None:
        """The stream started: hand its permit on to the next job."""

    def stream_ended(self, slot: Slot, job: Job, *, released: bool) -> None:
        """The producer ended; ``released``: its permit was handed on."""

    def handler_failed(
        self, slot: Slot, job: Job, exc: Exception, *, during_start: bool
    ) -> Exit | Requeue:
        """The generator (or ``on_start``) raised ``exc``: its outcome."""

    def handler_stopped(self, slot: Slot, job: Job) -> Outcome:
        """The runtime cancelled the generator: its outcome."""

    def cancel_job(self, job: Job) -> None:
        """The caller went away: withdraw or cancel the job."""

    @property
    def tracer(self) -> Tracer | None:
        """Makes the owner's span of the stream (None: no tracing)."""

    def traced_call(self, slot: Slot, job: Job) -> TracedCall:
        """What the owner's span of ``job`` is about."""


async def run_stream(owner: StreamOwner, slot: Slot, job: Job) -> None:
    """Producer task of one stream job (runs in the shard's nursery).

    The stream's end always reaches the channel, then the channel closes,
    even when the shard's nursery is cancelled (its lease lapsed, or it
    stopped past the termination timeout): the end then says the shard
    stopped."""
    channel = job.stream_channel
    assert channel is not None
    if job.metadata is not None:
        # This task's own context: a fresh copy of the base context.
        current_metadata_var.set(job.metadata)
    end: Exit | None = None
    try:
        tracer = owner.tracer
        if tracer is None:
            end = await _produce(owner, slot, job, channel)
        else:
            carrier = {} if job.metadata is None else job.metadata
            call = owner.traced_call(slot, job)
            with tracer.owner_span(call, carrier) as span:
                end = await _produce(owner, slot, job, channel)
                if end.error is not None:
                    span.record_error(end.error)
    finally:
        if end is None:  # cancelled from outside the handler's scope
            stopped = owner.handler_stopped(slot, job)
            assert isinstance(stopped, Exit), "stream jobs are never persisted"
            end = stopped
        await _end(channel, end)


async def _produce(
    owner: StreamOwner, slot: Slot, job: Job, channel: trio.MemorySendChannel[Any]
) -> Exit:
    """Run the generator, sending its items; return how it ended."""
    shard = slot.shard
    handler = job.handler
    serialize = owner.serialize
    scope = shard.start_handler(slot, job)
    released = False
    outcome: Outcome = Exit()
    starting = False
    try:
        with scope:
            instance = slot.instance
            if instance is None:
                starting = True
                instance = await activate(slot)
                starting = False
            owner.release_stream_permit(slot)
            released = True
            token = current_entity_var.set(instance)
            try:
                generator = handler.spec.fn(instance, job.message)
                try:
                    async for item in generator:
                        await channel.send(
                            (ITEM, stream_item(handler, item, serialize))
                        )
                finally:
                    with trio.CancelScope(shield=True), trio.move_on_after(1.0):
                        await generator.aclose()
            finally:
                current_entity_var.reset(token)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        outcome = Exit()  # the caller went away: nothing to report
    except Exception as exc:
        outcome = owner.handler_failed(slot, job, exc, during_start=starting)
    finally:
        shard.finish_handler(slot, job, scope)
        owner.stream_ended(slot, job, released=released)
    if scope.cancelled_caught:
        outcome = owner.handler_stopped(slot, job)
        if job.stop_reason is StopReason.INTERRUPTED:
            outcome = Exit()
    assert isinstance(outcome, Exit), "stream jobs are never persisted"
    return outcome


async def _end(channel: trio.MemorySendChannel[Any], exit_: Exit) -> None:
    """Put a stream's end in its channel and close it.

    The end waits behind the items for the consumer to make room, as long as
    the consumer is there (a consumer that leaves closes its end: nothing to
    report then). If the shard's nursery is cancelled meanwhile (or already),
    the consumer gets one more second, shielded; after that the channel
    closes without the end, which the consumer reports as the shard
    stopping (`StreamReceiver`).
    """
    try:
        try:
            channel.send_nowait((END, exit_))
        except trio.WouldBlock:
            try:
                await channel.send((END, exit_))
            except trio.Cancelled:
                with trio.CancelScope(shield=True), trio.move_on_after(1.0):
                    await channel.send((END, exit_))
                raise
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass  # the consumer is gone
    finally:
        channel.close()


class StreamReceiver:
    """The caller's side of a stream: an async iterator of items.

    Args:
        receive: the stream's channel: items, then its end.
        address: the entity, named in the error raised if the channel
            closes without an end (the producer could not deliver it before
            its shard stopped).
    """

    def __init__(self, receive: trio.MemoryReceiveChannel[Any], address: str) -> None:
        self._receive = receive
        self._address = address
        self.finished = False

    def __aiter__(self) -> StreamReceiver:
        return self

    async def __anext__(self) -> Any:
        if self.finished:
            raise StopAsyncIteration
        try:
            kind, value = await self._receive.receive()
        except trio.EndOfChannel:
            # Not a clean end: that would come as an END, so the items the
            # consumer has are not the whole stream.
            self.finished = True
            raise EntityNotAssignedError(
                address=self._address,
                detail="shard stopped while the handler ran (it may have partly run)",
            ) from None
        if kind == ITEM:
            return value
        self.finished = True
        exit_: Exit = value
        exit_.unwrap()
        raise StopAsyncIteration


def open_stream_channel() -> tuple[
    trio.MemorySendChannel[Any], trio.MemoryReceiveChannel[Any]
]:
    """The channel between a stream's producer and its caller."""
    return trio.open_memory_channel[Any](STREAM_BUFFER)


def end_stream_nowait(channel: trio.MemorySendChannel[Any], exit_: Exit) -> None:
    """End a stream that never started (its job was bounced)."""
    with suppress(trio.WouldBlock, trio.BrokenResourceError, trio.ClosedResourceError):
        channel.send_nowait((END, exit_))
    channel.close()


@asynccontextmanager
async def consume(
    owner: StreamOwner, job: Job, receive: trio.MemoryReceiveChannel[Any]
) -> AsyncIterator[StreamReceiver]:
    """Own a submitted stream job from the caller's side (see module doc)."""
    receiver = StreamReceiver(receive, str(job.slot.address))
    try:
        yield receiver
    finally:
        if not receiver.finished:
            owner.cancel_job(job)
        await receive.aclose()


class SendCredit:
    """A remote stream's numbering and credit on the owner's side.

    `take` numbers the next item once the caller's limit allows it; `grant`
    raises the limit (a lower or equal limit, from a repeated or late
    ``STREAM_CREDIT``, changes nothing).
    """

    __slots__ = ("_changed", "limit", "sent")

    def __init__(self) -> None:
        self.sent = 0
        """The number of the last item sent (0: none yet)."""
        self.limit = STREAM_BUFFER
        """The highest item number the caller accepts."""
        self._changed = trio.Event()

    def grant(self, limit: int) -> None:
        """The caller accepts items up to number ``limit`` (cumulative)."""
        if limit > self.limit:
            self.limit = limit
            self._changed.set()

    async def take(self) -> int:
        """Wait until the caller accepts one more item; return its number.

        Cancellation: nothing is taken (the next call returns the same
        number).
        """
        while self.sent >= self.limit:
            self._changed = trio.Event()
            await self._changed.wait()
        self.sent += 1
        return self.sent


class ReceiveWindow:
    """A remote stream's numbering and credit on the caller's side (pure
    bookkeeping; the caller sends what `consumed` returns).

    Args:
        peer: the owner, named in the errors.
    """

    __slots__ = ("limit", "peer", "read", "received")

    def __init__(self, peer: str) -> None:
        self.peer = peer
        self.received = 0
        """The number of the last item accepted."""
        self.read = 0
        """Items the consumer has read."""
        self.limit = STREAM_BUFFER
        """The highest item number granted to the owner."""

    def arrived(self, number: int) -> bool:
        """Item ``number`` arrived: True if it is the next one (deliver it),
        False if it arrived before (drop it).

        Raises:
            RunnerUnavailableError: items before it were lost in transit.
            MalformedMessageError: it is beyond the credit granted (the owner
                does not keep to the protocol).
        """
        if number <= self.received:
            return False
        if number > self.limit:
            raise MalformedMessageError(
                what="STREAM_ITEM envelope",
                problems=[f"item {number} is beyond the credit granted ({self.limit})"],
            )
        if number != self.received + 1:
            raise self._lost(f"item {number} arrived after item {self.received}")
        self.received = number
        return True

    def ended(self, count: int) -> None:
        """The owner ended the stream after sending ``count`` items.

        Raises:
            RunnerUnavailableError: some of them never arrived.
            MalformedMessageError: ``count`` is less than the items received,
                or beyond the credit granted.
        """
        if count < self.received or count > self.limit:
            raise MalformedMessageError(
                what="STREAM_END envelope",
                problems=[
                    f"{count} items sent, but {self.received} received"
                    f" and {self.limit} granted"
                ],
            )
        if count != self.received:
            raise self._lost(
                f"the stream ended after item {count}, the last received"
                f" is {self.received}"
            )

    def consumed(self) -> int | None:
        """The consumer read one more item: the new limit to send to the
        owner, or None if no grant is due yet."""
        self.read += 1
        if self.read + STREAM_BUFFER - self.limit < CREDIT_BATCH:
            return None
        self.limit = self.read + STREAM_BUFFER
        return self.limit

    def _lost(self, detail: str) -> RunnerUnavailableError:
        return RunnerUnavailableError(
            runner=self.peer, detail=f"stream items lost in transit ({detail})"
        )
