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
"""

from __future__ import annotations

from contextlib import asynccontextmanager, suppress
from typing import TYPE_CHECKING, Any, Final, Protocol

import trio

from .._context import current_entity_var
from .._core._job import StopReason
from ..serialization._replies import Exit
from ._entity_lifecycle import activate
from ._outcomes import stream_item

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from ._outcomes import Outcome, Requeue
    from ._slots import Job, Slot

__all__ = [
    "STREAM_BUFFER",
    "StreamOwner",
    "StreamReceiver",
    "consume",
    "end_stream_nowait",
    "open_stream_channel",
    "run_stream",
]

STREAM_BUFFER: Final = 16
"""Items buffered between a stream's generator and its caller."""

_ITEM: Final = 0
_END: Final = 1


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


async def run_stream(owner: StreamOwner, slot: Slot, job: Job) -> None:
    """Producer task of one stream job (runs in the shard's nursery)."""
    channel = job.stream_channel
    assert channel is not None
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
                            (_ITEM, stream_item(handler, item, serialize))
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
    with trio.move_on_after(1.0):
        with suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            await channel.send((_END, outcome))
    await channel.aclose()


class StreamReceiver:
    """The caller's side of a stream: an async iterator of items."""

    def __init__(self, receive: trio.MemoryReceiveChannel[Any]) -> None:
        self._receive = receive
        self.finished = False

    def __aiter__(self) -> StreamReceiver:
        return self

    async def __anext__(self) -> Any:
        if self.finished:
            raise StopAsyncIteration
        try:
            kind, value = await self._receive.receive()
        except trio.EndOfChannel:
            self.finished = True
            raise StopAsyncIteration from None
        if kind == _ITEM:
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
        channel.send_nowait((_END, exit_))
    channel.close()


@asynccontextmanager
async def consume(
    owner: StreamOwner, job: Job, receive: trio.MemoryReceiveChannel[Any]
) -> AsyncIterator[StreamReceiver]:
    """Own a submitted stream job from the caller's side (see module doc)."""
    receiver = StreamReceiver(receive)
    try:
        yield receiver
    finally:
        if not receiver.finished:
            owner.cancel_job(job)
        await receive.aclose()
