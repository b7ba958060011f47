"""Calls to entities on other runners: the caller's side (Trio driver).

A volatile call to an entity served elsewhere becomes a ``REQUEST`` envelope
to the owner and a waiter here, keyed by call id; the owner answers with
``REPLY`` (or ``NOT_DELIVERED`` when it does not serve the shard, which means
the handler never ran, so the call is routed again). A caller that is
cancelled sends ``INTERRUPT``. If the connection to the owner is lost while a
call waits, the call fails with `RunnerUnavailableError`: the handler may or
may not have run (at most once).

Streams flow with credits: the caller grants the owner a window of items and
tops it up as its consumer reads, so a slow consumer slows the producer down
across the wire too.
"""

from __future__ import annotations

from contextlib import asynccontextmanager, suppress
from typing import TYPE_CHECKING, Any, Final

import trio

from .._errors import RunnerUnavailableError
from .._errors._closed import RunnerClosedError
from ..serialization._replies import Exit
from ._streams import STREAM_BUFFER, StreamReceiver
from ._wire import Kind, Mode, address_fields

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from .._core._addresses import EntityAddress, RunnerAddress
    from .._registry import Handler
    from .._transport_abc import Endpoint

__all__ = ["NotSent", "OutboundCalls", "RouteAgain"]

_CREDIT_BATCH: Final = STREAM_BUFFER // 2


class NotSent(RunnerUnavailableError):
    """The request could not be handed to the transport: nothing left this
    runner, so routing again is safe."""


class RouteAgain(Exception):
    """The owner answered ``NOT_DELIVERED``: the handler did not run."""


class _Pending:
    __slots__ = ("done", "exit", "handler", "peer", "reason", "stream")

    def __init__(self, peer: RunnerAddress, handler: Handler) -> None:
        self.peer = peer
        self.handler = handler
        self.done = trio.Event()
        self.exit: Exit | None = None
        self.reason: str | None = None
        self.stream: trio.MemorySendChannel[Any] | None = None


class OutboundCalls:
    """Requests this runner sent to others, waiting for their answers."""

    def __init__(self, endpoint: Endpoint) -> None:
        self._endpoint = endpoint
        self._pending: dict[int, _Pending] = {}
        self._next_id = 0

    def _send(self, peer: RunnerAddress, envelope: list[Any]) -> None:
        try:
            self._endpoint.send_nowait(peer, envelope)
        except RunnerUnavailableError as exc:
            raise NotSent(runner=str(peer), detail=exc.detail) from exc

    def _request(
        self,
        peer: RunnerAddress,
        mode: Mode,
        address: EntityAddress,
        handler: Handler,
        payload: bytes,
    ) -> tuple[int, _Pending]:
        self._next_id += 1
        call_id = self._next_id
        deadline = trio.current_effective_deadline()
        left = (
            None
            if deadline == float("inf")
            else max(0.0, deadline - trio.current_time())
        )
        envelope = [
            Kind.REQUEST,
            call_id,
            mode,
            *address_fields(address),
            handler.spec.name,
            payload,
            left,
        ]
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
    ) -> Any:
        """Run a volatile request on ``peer`` and return its value.

        Raises:
            NotSent: could not send (route again).
            RouteAgain: the owner does not serve the shard (route again).
            RunnerUnavailableError: the connection was lost while waiting.
            Exception: the handler's outcome, as for a local call.

        Cancellation sends ``INTERRUPT`` to the owner.
        """
        call_id, pending = self._request(peer, Mode.CALL, address, handler, payload)
        try:
            await pending.done.wait()
        except BaseException:
            self._pending.pop(call_id, None)
            self._interrupt(peer, call_id)
            raise
        return self._outcome(pending).unwrap()

    async def discard(
        self,
        peer: RunnerAddress,
        address: EntityAddress,
        handler: Handler,
        payload: bytes,
    ) -> None:
        """Send a volatile request without waiting (at most once).

        Raises:
            NotSent: could not send (route again).
        """
        self._request(peer, Mode.DISCARD, address, handler, payload)
        await trio.lowlevel.checkpoint()

    @asynccontextmanager
    async def stream(
        self,
        peer: RunnerAddress,
        address: EntityAddress,
        handler: Handler,
        payload: bytes,
    ) -> AsyncIterator[StreamReceiver]:
        """Open a stream on ``peer``; see `Runner` streams. Leaving early
        interrupts the generator on the owner."""
        call_id, pending = self._request(peer, Mode.STREAM, address, handler, payload)
        send, receive = trio.open_memory_channel[Any](STREAM_BUFFER + 1)
        pending.stream = send
        receiver = _CreditingReceiver(receive, lambda n: self._credit(peer, call_id, n))
        try:
            yield receiver
        finally:
            self._pending.pop(call_id, None)
            if not receiver.finished:
                self._interrupt(peer, call_id)
            await receive.aclose()

    def _credit(self, peer: RunnerAddress, call_id: int, count: int) -> None:
        # If the connection is gone, peer_lost ends the stream.
        with suppress(RunnerUnavailableError, trio.ClosedResourceError):
            self._endpoint.send_nowait(peer, [Kind.STREAM_CREDIT, call_id, count])

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
                detail="connection lost while waiting for the reply (the handler may have run)",
            )
        return pending.exit

    # ------------------------------------------------------------------
    # Answers from owners (called by the endpoint handler)

    def reply(self, call_id: int, payload: bytes) -> None:
        pending = self._pending.pop(call_id, None)
        if pending is None:
            return  # the caller gave up
        pending.exit = _decode_exit(pending.handler, payload, call_id)
        pending.done.set()

    def not_delivered(self, call_id: int, reason: str) -> None:
        pending = self._pending.pop(call_id, None)
        if pending is None:
            return
        pending.reason = reason
        pending.done.set()
        if pending.stream is not None:
            pending.stream.send_nowait((1, Exit(error=RouteAgain(reason))))
            pending.stream.close()

    def stream_item(self, call_id: int, payload: bytes) -> None:
        pending = self._pending.get(call_id)
        if pending is None or pending.stream is None:
            return
        try:
            item: Any = (0, pending.handler.reply.value.decode(payload))
        except Exception as exc:  # MalformedMessageError
            item = (1, Exit(error=exc))
        # Dropped if over the granted credit (a misbehaving peer) or if the
        # consumer is gone.
        with suppress(
            trio.WouldBlock, trio.BrokenResourceError, trio.ClosedResourceError
        ):
            pending.stream.send_nowait(item)

    def stream_end(self, call_id: int, payload: bytes) -> None:
        pending = self._pending.pop(call_id, None)
        if pending is None or pending.stream is None:
            return
        exit_ = _decode_stream_end(pending.handler, payload, call_id)
        with suppress(
            trio.WouldBlock, trio.BrokenResourceError, trio.ClosedResourceError
        ):
            pending.stream.send_nowait((1, exit_))
        pending.stream.close()

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
            pending.done.set()
            if pending.stream is not None:
                with suppress(
                    trio.WouldBlock, trio.BrokenResourceError, trio.ClosedResourceError
                ):
                    pending.stream.send_nowait((1, Exit(error=error)))
                pending.stream.close()

    def peer_lost(self, peer: RunnerAddress) -> None:
        """Fail every call waiting on ``peer``."""
        lost = [
            call_id
            for call_id, pending in self._pending.items()
            if pending.peer == peer
        ]
        for call_id in lost:
            pending = self._pending.pop(call_id)
            pending.done.set()
            if pending.stream is not None:
                error = RunnerUnavailableError(
                    runner=str(peer), detail="connection lost during the stream"
                )
                with suppress(
                    trio.WouldBlock, trio.BrokenResourceError, trio.ClosedResourceError
                ):
                    pending.stream.send_nowait((1, Exit(error=error)))
                pending.stream.close()


def _decode_exit(handler: Handler, payload: bytes, call_id: int) -> Exit:
    try:
        return handler.reply.decode_exit(payload, request_id=call_id)
    except Exception as exc:  # MalformedMessageError: report it to the caller
        return Exit(error=exc)


def _decode_stream_end(handler: Handler, payload: bytes, call_id: int) -> Exit:
    """A stream's final reply: an error, or the end of the generator
    (`ReplyCodec.encode_stream_end`)."""
    try:
        return handler.reply.decode_stream_end(payload, request_id=call_id)
    except Exception as exc:  # MalformedMessageError: report it to the caller
        return Exit(error=exc)


class _CreditingReceiver(StreamReceiver):
    """A stream receiver that tops up the owner's credit as items are read."""

    def __init__(self, receive: trio.MemoryReceiveChannel[Any], grant: Any) -> None:
        super().__init__(receive)
        self._grant = grant
        self._read = 0

    async def __anext__(self) -> Any:
        item = await super().__anext__()
        self._read += 1
        if self._read >= _CREDIT_BATCH:
            self._grant(self._read)
            self._read = 0
        return item
