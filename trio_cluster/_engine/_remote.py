"""Calls to entities on other runners: the caller's side (Trio driver).

A volatile call to an entity served elsewhere becomes a ``REQUEST`` envelope
to the owner and a waiter here, keyed by call id; the owner answers with
``REPLY`` (or ``NOT_DELIVERED`` when it does not serve the shard, which means
the handler never ran, so the call is routed again). A caller that is
cancelled sends ``INTERRUPT``. If the connection to the owner is lost while a
call waits, the call fails with `RunnerUnavailableError`: the handler may or
may not have run (at most once).

Streams flow with credits: the caller grants the owner a window of items and
raises its limit as its consumer reads, so a slow consumer slows the producer
down across the wire too. Items are numbered: one that arrives twice is
delivered once, and a gap ends the stream with `RunnerUnavailableError`
(items lost) and interrupts the owner (see `trio_cluster._engine._streams`).
Answers are matched by (peer, call id): an answer from another runner than
the one asked is ignored.
"""

from __future__ import annotations

import logging
import math
from contextlib import asynccontextmanager, suppress
from typing import TYPE_CHECKING, Any

import trio

from .._errors import (
    ClusterError,
    ClusterInternalError,
    MalformedMessageError,
    RunnerUnavailableError,
)
from .._errors._closed import RunnerClosedError
from .._log_limit import LogLimiter
from ..serialization._replies import Exit
from ._deadline import effective_deadline
from ._streams import END, ITEM, STREAM_BUFFER, ReceiveWindow, StreamReceiver
from ._wire import MAX_SECONDS_LEFT, Kind, Mode

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable, Mapping

    from .._core._addresses import EntityAddress, RunnerAddress
    from .._registry import Handler
    from .._transport_abc import Endpoint

__all__ = ["NotSent", "OutboundCalls", "RouteAgain"]

log = logging.getLogger("trio_cluster.transport")

# Read on every remote call: on Python 3.11 a member read from its enum
# class costs a Python-level lookup, a module constant does not.
_REQUEST = Kind.REQUEST
_CALL = Mode.CALL


class NotSent(RunnerUnavailableError):
    """The request could not be handed to the transport: nothing left this
    runner, so routing again is safe."""


class RouteAgain(Exception):
    """The owner answered ``NOT_DELIVERED``: the handler did not run."""


class _Pending:
    """A request waiting for its answer, and the task waiting for it.

    `wait` parks the caller's task itself and `done` reschedules it: a
    `trio.Event` per call would cost more (its own object, a set of tasks,
    a closure per wait), and a call has exactly one waiter."""

    __slots__ = (
        "answered",
        "exit",
        "handler",
        "lost",
        "peer",
        "reason",
        "stream",
        "task",
        "window",
    )

    def __init__(self, peer: RunnerAddress, handler: Handler) -> None:
        self.peer = peer
        self.handler = handler
        self.answered = False
        self.task: trio.lowlevel.Task | None = None
        """The task parked in `wait`, until `done` or its cancellation."""
        self.exit: Exit | None = None
        self.reason: str | None = None
        self.lost = ""
        """Why the connection to the peer was lost (the transport's words)."""
        self.stream: trio.MemorySendChannel[Any] | None = None
        self.window: ReceiveWindow | None = None

    def done(self) -> None:
        """The answer is in (or will never come): wake the waiting task."""
        self.answered = True
        task = self.task
        if task is not None:
            self.task = None
            trio.lowlevel.reschedule(task)

    async def wait(self) -> None:
        """Wait until `done` (a checkpoint if it was already).

        Cancellation: propagates (the caller interrupts the request); a
        later `done` wakes nobody.
        """
        if self.answered:
            await trio.lowlevel.checkpoint()
            return
        self.task = trio.lowlevel.current_task()
        await trio.lowlevel.wait_task_rescheduled(self._abort)

    def _abort(self, _: Any) -> trio.lowlevel.Abort:
        self.task = None
        return trio.lowlevel.Abort.SUCCEEDED


class OutboundCalls:
    """Requests this runner sent to others, waiting for their answers."""

    def __init__(self, endpoint: Endpoint) -> None:
        self._endpoint = endpoint
        self._pending: dict[int, _Pending] = {}
        self._next_id = 0
        self.warnings = LogLimiter(logger=log)
        """Bounds what a peer's stream answers make this log (issue 12,
        item 8)."""

    def _send(self, peer: RunnerAddress, envelope: list[Any]) -> None:
        try:
            self._endpoint.send_nowait(peer, envelope)
        except RunnerUnavailableError as exc:
            raise NotSent(runner=str(peer), detail=exc.detail) from exc

    def _envelope(
        self,
        mode: Mode,
        address: EntityAddress,
        handler: Handler,
        payload: bytes,
        metadata: Mapping[str, str] | None,
    ) -> tuple[int, list[Any]]:
        """A new call id and its ``REQUEST`` envelope."""
        self._next_id += 1
        call_id = self._next_id
        deadline = effective_deadline()
        if deadline == math.inf:
            left = None
        else:
            left = max(0.0, deadline - trio.current_time())
            # No deadline: infinite, or as good as (the owner refuses more).
            if left > MAX_SECONDS_LEFT:
                left = None
        shard = address.shard
        # `_wire.address_fields`, inlined: this runs for every remote call.
        envelope = [
            _REQUEST,
            call_id,
            mode,
            address.entity_type,
            address.entity_id.value,
            shard.group,
            shard.number,
            handler.spec.name,
            payload,
            left,
        ]
        if metadata:
            envelope.append(dict(metadata))
        return call_id, envelope

    def _request(
        self,
        peer: RunnerAddress,
        mode: Mode,
        address: EntityAddress,
        handler: Handler,
        payload: bytes,
        metadata: Mapping[str, str] | None,
    ) -> tuple[int, _Pending]:
        call_id, envelope = self._envelope(mode, address, handler, payload, metadata)
        self._send(peer, envelope)
        pending = _Pending(peer, handler)
        if mode is not Mode.DISCARD:
            self._pending[call_id] = pending
        return call_id, pending

    async def call(
        self,
        peer: RunnerAddress,
        address: EntityAddress,
        handler: Handler,
        payload: bytes,
        metadata: Mapping[str, str] | None = None,
    ) -> Any:
        """Run a volatile request on ``peer`` and return its value; it
        carries ``metadata`` (if any).

        Raises:
            NotSent: could not send (route again).
            RouteAgain: the owner does not serve the shard (route again).
            RunnerUnavailableError: the connection was lost while waiting.
            Exception: the handler's outcome, as for a local call.

        Cancellation sends ``INTERRUPT`` to the owner.
        """
        call_id, envelope = self._envelope(_CALL, address, handler, payload, metadata)
        if self._pending:
            # Other calls wait: queue it, to leave in the next frame with
            # theirs (a batch per scheduler pass).
            self._send(peer, envelope)
            pending = self._pending[call_id] = _Pending(peer, handler)
        else:
            pending = await self._send_alone(peer, call_id, envelope, handler)
        try:
            await pending.wait()
        except BaseException:
            self._pending.pop(call_id, None)
            self._interrupt(peer, call_id)
            raise
        exit_ = pending.exit  # set only with an answer (never with a reason)
        return (self._outcome(pending) if exit_ is None else exit_).unwrap()

    async def _send_alone(
        self, peer: RunnerAddress, call_id: int, envelope: list[Any], handler: Handler
    ) -> _Pending:
        """Send the request of the only call waiting from the calling task
        (`Endpoint.send`: no other task is woken to write it when the
        connection is idle); return its waiter.

        Raises:
            NotSent: could not send (route again).

        Cancellation: after the request is queued, interrupts it.
        """
        # Waiting before it is sent: the answer may come while the sending
        # task is still in `Endpoint.send`.
        pending = self._pending[call_id] = _Pending(peer, handler)
        try:
            await self._endpoint.send(peer, envelope)
        except RunnerUnavailableError as exc:
            self._pending.pop(call_id, None)
            raise NotSent(runner=str(peer), detail=exc.detail) from exc
        except Exception:
            # Refused before anything was queued (as by send_nowait).
            self._pending.pop(call_id, None)
            raise
        except BaseException:
            # Queued, then cancelled.
            self._pending.pop(call_id, None)
            self._interrupt(peer, call_id)
            raise
        return pending

    async def discard(
        self,
        peer: RunnerAddress,
        address: EntityAddress,
        handler: Handler,
        payload: bytes,
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        """Send a volatile request without waiting (at most once).

        Raises:
            NotSent: could not send (route again).
        """
        self._request(peer, Mode.DISCARD, address, handler, payload, metadata)
        await trio.lowlevel.checkpoint()

    @asynccontextmanager
    async def stream(
        self,
        peer: RunnerAddress,
        address: EntityAddress,
        handler: Handler,
        payload: bytes,
        metadata: Mapping[str, str] | None = None,
    ) -> AsyncIterator[StreamReceiver]:
        """Open a stream on ``peer``; see `Runner` streams. Leaving early
        interrupts the generator on the owner."""
        call_id, pending = self._request(
            peer, Mode.STREAM, address, handler, payload, metadata
        )
        # Room for a full window of items and the end: the window check in
        # stream_item keeps the buffer from overflowing.
        send, receive = trio.open_memory_channel[Any](STREAM_BUFFER + 1)
        pending.stream = send
        window = pending.window = ReceiveWindow(str(peer))
        receiver = _CreditingReceiver(
            receive,
            str(address),
            window,
            lambda limit: self._credit(peer, call_id, limit),
        )
        try:
            yield receiver
        finally:
            # Still pending: the owner has not ended the stream, nor has it
            # been ended here (a gap, a bad item): stop its generator.
            if self._pending.pop(call_id, None) is not None:
                self._interrupt(peer, call_id)
            await receive.aclose()

    def _credit(self, peer: RunnerAddress, call_id: int, limit: int) -> None:
        # If the connection is gone, peer_lost ends the stream. A credit that
        # is lost is made up for by the next one (the limit is cumulative).
        with suppress(RunnerUnavailableError, trio.ClosedResourceError):
            self._endpoint.send_nowait(peer, [Kind.STREAM_CREDIT, call_id, limit])

    def _interrupt(self, peer: RunnerAddress, call_id: int) -> None:
        # If unreachable, the owner sees the connection drop instead. If
        # this runner's endpoint is closed (it is shutting down), the caller
        # is being cancelled: its Cancelled must not become a
        # ClosedResourceError (found by the simulator).
        with suppress(RunnerUnavailableError, trio.ClosedResourceError):
            self._endpoint.send_nowait(peer, [Kind.INTERRUPT, call_id])

    def _outcome(self, pending: _Pending) -> Exit:
        if pending.reason is not None:
            raise RouteAgain(pending.reason)
        if pending.exit is None:
            raise RunnerUnavailableError(
                runner=str(pending.peer),
                detail="connection lost while waiting for the reply (the handler"
                f" may have run): {pending.lost}",
            )
        return pending.exit

    # ------------------------------------------------------------------
    # Answers from owners (called by the endpoint handler)

    def _answered(self, peer: RunnerAddress, call_id: int) -> _Pending | None:
        """The call ``peer`` answers (now done), or None if it is over or
        was not sent to ``peer``."""
        pending = self._pending.get(call_id)
        if pending is None or pending.peer != peer:
            return None
        del self._pending[call_id]
        return pending

    def reply(self, peer: RunnerAddress, call_id: int, payload: bytes) -> None:
        # `_answered`, inlined: one reply per remote call.
        pending = self._pending.get(call_id)
        if pending is None or (pending.peer is not peer and pending.peer != peer):
            return  # the caller gave up, or another runner answers
        del self._pending[call_id]
        # Decoded here, not in a helper: a call less per remote call.
        try:
            pending.exit = pending.handler.reply.decode_exit(
                payload, request_id=call_id
            )
        except Exception as exc:  # MalformedMessageError: report it to the caller
            pending.exit = Exit(error=exc)
        pending.done()

    def not_delivered(self, peer: RunnerAddress, call_id: int, reason: str) -> None:
        pending = self._answered(peer, call_id)
        if pending is None:
            return
        pending.reason = reason
        pending.done()
        if pending.stream is not None:
            # NOTE: a stream is not routed again (its caller may have read
            # items already): it ends with a public error, never with the
            # internal `RouteAgain`, which only call routing catches.
            gone = RunnerUnavailableError(
                runner=str(peer),
                detail=f"the stream's runner no longer serves its entity ({reason})",
            )
            _end_channel(pending.stream, Exit(error=gone))

    def stream_item(
        self, peer: RunnerAddress, call_id: int, number: int, payload: bytes
    ) -> None:
        """Item ``number`` of a stream: delivered if it is the next one,
        dropped if it arrived before.

        A gap (items lost in transit), an item beyond the credit granted or
        one that does not decode ends the stream with that error at the
        consumer, and interrupts the owner.

        Raises:
            MalformedMessageError: the item is beyond the credit or does not
                decode (after ending the stream; the dispatcher logs it).
        """
        pending = self._pending.get(call_id)
        if pending is None or pending.peer != peer or pending.window is None:
            return
        assert pending.stream is not None
        try:
            if not pending.window.arrived(number):
                return  # a duplicate
            value = pending.handler.reply.value.decode(payload)
        except ClusterError as exc:
            self._end_here(call_id, pending, exc)
            if isinstance(exc, MalformedMessageError):
                raise
            self.warnings.warning(
                peer, "ended streams", "ended a stream from %s: %s", peer, exc
            )
            return
        try:
            pending.stream.send_nowait((ITEM, value))
        except trio.WouldBlock:  # pragma: no cover - the window prevents it
            error = ClusterInternalError("a remote stream overflowed its window")
            self._end_here(call_id, pending, error)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the consumer is gone; leaving its block interrupts

    def stream_end(
        self, peer: RunnerAddress, call_id: int, count: int, payload: bytes
    ) -> None:
        """The owner ended a stream after ``count`` items; ``payload`` says
        how (`ReplyCodec.encode_stream_end`). Items missing before the end
        make the stream end with `RunnerUnavailableError` instead.

        Raises:
            MalformedMessageError: ``count`` contradicts the items received
                (after ending the stream; the dispatcher logs it).
        """
        pending = self._answered(peer, call_id)
        if pending is None or pending.stream is None:
            return
        problem: ClusterError | None = None
        if pending.window is not None:
            try:
                pending.window.ended(count)
            except ClusterError as exc:
                problem = exc
        if problem is None:
            _end_channel(
                pending.stream, _decode_stream_end(pending.handler, payload, call_id)
            )
            return
        _end_channel(pending.stream, Exit(error=problem))
        if isinstance(problem, MalformedMessageError):
            raise problem
        self.warnings.warning(
            peer, "ended streams", "ended a stream from %s: %s", peer, problem
        )

    def _end_here(self, call_id: int, pending: _Pending, error: ClusterError) -> None:
        """End a stream on this side: ``error`` after the items already
        delivered, and an interrupt to the owner (its generator may still
        run)."""
        del self._pending[call_id]
        assert pending.stream is not None
        _end_channel(pending.stream, Exit(error=error))
        self._interrupt(pending.peer, call_id)

    def close(self) -> None:
        """This runner stops: fail every call still waiting for an answer
        with `RunnerClosedError` (its answer could no longer arrive)."""
        pending_calls, self._pending = self._pending, {}
        for pending in pending_calls.values():
            error = RunnerClosedError(
                "the runner shut down while the call waited for another"
                f" runner ({pending.peer}); the handler may have run there"
            )
            pending.exit = Exit(error=error)
            pending.done()
            if pending.stream is not None:
                _end_channel(pending.stream, Exit(error=error))

    def peer_lost(self, peer: RunnerAddress, reason: str) -> None:
        """Fail every call waiting on ``peer`` (``reason``: the transport's
        words, given to the callers)."""
        self.warnings.flush(peer)
        lost = [
            call_id
            for call_id, pending in self._pending.items()
            if pending.peer == peer
        ]
        for call_id in lost:
            pending = self._pending.pop(call_id)
            pending.lost = reason
            pending.done()
            if pending.stream is not None:
                error = RunnerUnavailableError(
                    runner=str(peer),
                    detail=f"connection lost during the stream: {reason}",
                )
                _end_channel(pending.stream, Exit(error=error))


def _end_channel(stream: trio.MemorySendChannel[Any], exit_: Exit) -> None:
    """Put a stream's end after its items and close its channel. The buffer
    keeps a place for it (see `OutboundCalls.stream`); a consumer that is
    gone does not need it."""
    with suppress(trio.WouldBlock, trio.BrokenResourceError, trio.ClosedResourceError):
        stream.send_nowait((END, exit_))
    stream.close()


def _decode_stream_end(handler: Handler, payload: bytes, call_id: int) -> Exit:
    """A stream's final reply: an error, or the end of the generator
    (`ReplyCodec.encode_stream_end`)."""
    try:
        return handler.reply.decode_stream_end(payload, request_id=call_id)
    except Exception as exc:  # MalformedMessageError: report it to the caller
        return Exit(error=exc)


class _CreditingReceiver(StreamReceiver):
    """A stream receiver that raises the owner's credit limit as items are
    read."""

    def __init__(
        self,
        receive: trio.MemoryReceiveChannel[Any],
        address: str,
        window: ReceiveWindow,
        grant: Callable[[int], None],
    ) -> None:
        super().__init__(receive, address)
        self._window = window
        self._grant = grant

    async def __anext__(self) -> Any:
        item = await super().__anext__()
        limit = self._window.consumed()
        if limit is not None:
            self._grant(limit)
        return item
