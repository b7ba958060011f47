"""Requests from other runners: the owner's side (Trio driver; the endpoint
handler that dispatches envelopes here is `_dispatch`).

A ``REQUEST`` for a shard this runner serves becomes a detached job whose
outcome is sent back as ``REPLY``; for a shard it does not serve the answer is
``NOT_DELIVERED`` (the caller routes again). The caller's remaining deadline
travels with the request and bounds the handler here. ``INTERRUPT`` and a lost
connection cancel the caller's jobs. Streams are pumped back item by item,
numbered, within the credit limit the caller grants (`SendCredit`).

A request runs only in its handler's delivery mode: a volatile ``@rpc``
handler called or discarded, a ``@stream`` handler streamed. A persisted
handler never runs from a ``REQUEST``: its requests reach the owner only
through storage (a ``PERSISTED`` notice names a stored request id, which the
owner claims), where they are stored, deduplicated and answered once.

Bad envelopes are logged and dropped; they never disturb other requests.
"""

from __future__ import annotations

import functools
import logging
from contextlib import suppress
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Final

import attrs
import trio

from .._core._addresses import RunnerAddress
from .._core._hashing import misplaced
from .._core._job import StopReason
from .._errors import (
    MailboxFullError,
    MalformedMessageError,
    RunnerUnavailableError,
    UnknownEntityTypeError,
)
from .._log_limit import LogLimiter
from .._registry import Registry
from .._transport_abc import Endpoint
from ..serialization._replies import Exit
from ._manager import EntityManager, NotDelivered
from ._outcomes import stopped
from ._shard_table import ShardTable
from ._slots import Job, JobKind
from ._streams import ITEM, SendCredit, open_stream_channel
from ._wire import Kind, Mode, address_of

if TYPE_CHECKING:
    from collections.abc import Mapping

    from .._core._addresses import EntityAddress
    from .._registry import EntityType, Handler
    from ._slots import ShardHost, Sink

__all__ = ["InboundCalls"]

log = logging.getLogger("trio_cluster.transport")

_RECENT_CALLS = 256
"""Call ids remembered per peer to ignore a request delivered twice."""


class _Outgoing:
    """A stream pumped back to its caller: its numbering and credit, and
    the pump's scope, cancelled when the caller goes away."""

    __slots__ = ("credit", "scope")

    def __init__(self) -> None:
        self.credit = SendCredit()
        self.scope = trio.CancelScope()


_Target = tuple["ShardHost", "EntityAddress", "EntityType", "Handler", Any]
"""A request resolved to what runs it: the shard's host, the entity's
address, its type, the handler and the decoded message (a plain tuple: a
named one costs a call per request)."""


@attrs.define(eq=False, kw_only=True)
class InboundCalls:
    """Requests other runners sent to entities this runner serves."""

    _endpoint: Endpoint
    _shards: ShardTable
    _manager: EntityManager
    _registry: Registry
    _shards_per_group: int
    """To check that a request's entity belongs to the shard it names."""
    _jobs: dict[tuple[RunnerAddress, int], Job] = attrs.field(init=False, factory=dict)
    _streams: dict[tuple[RunnerAddress, int], _Outgoing] = attrs.field(
        init=False, factory=dict
    )
    _recent: dict[RunnerAddress, dict[int, None]] = attrs.field(
        init=False, factory=dict
    )
    """Per peer, the call ids of its last requests (cleared when the
    connection drops): a request seen twice runs once."""
    handled: int = attrs.field(init=False, default=0)
    warnings: LogLimiter = attrs.field(
        init=False, factory=lambda: LogLimiter(logger=log)
    )
    """Bounds what a peer's requests make this log (issue 12, item 8)."""

    def _send(self, peer: RunnerAddress, envelope: list[Any]) -> None:
        try:
            self._endpoint.send_nowait(peer, envelope)
        except RunnerUnavailableError as exc:
            log.info("could not answer %s: %s", peer, exc)

    def request(self, peer: RunnerAddress, fields: list[Any]) -> None:
        """A ``REQUEST`` envelope's fields: run it here, or answer why not.

        ``fields`` were checked by `_wire.parse`.

        Raises:
            MalformedMessageError: the mode is unknown, or is not the
                handler's delivery mode (a persisted handler, a stream
                handler called or discarded, an ``@rpc`` handler streamed:
                answered with this error first, except a discard). The
                caller counts and logs it.
        """
        (call_id, mode_value, entity_type, entity_id, group, number, tag, payload,
         left) = fields[:9]  # fmt: skip
        # The optional metadata field (checked by `_wire.parse`); an empty
        # map is as good as none.
        metadata = (
            MappingProxyType(fields[9]) if len(fields) > 9 and fields[9] else None
        )
        if self._seen(peer, call_id):
            # NOTE: a transport that delivers a frame twice must not make a
            # volatile request run twice (found by the simulator's frame
            # duplication; at most once).
            self.warnings.log(
                logging.INFO,
                peer,
                "repeated requests",
                "ignored a repeated request %s from %s",
                call_id,
                peer,
            )
            return
        mode = _MODES[mode_value]  # in range: checked by `_wire.parse`
        address = address_of(entity_type, entity_id, group, number)
        target = self._resolve(peer, call_id, mode, address, tag, payload)
        if target is not None:
            self._start(peer, call_id, mode, target, left, metadata)

    def _resolve(
        self,
        peer: RunnerAddress,
        call_id: int,
        mode: Mode,
        address: EntityAddress,
        tag: str,
        payload: bytes,
    ) -> _Target | None:
        """The host, entity type, handler and decoded message of a request,
        or None after answering why it cannot run here.

        Raises:
            MalformedMessageError: ``mode`` is not the handler's delivery
                mode (answered with this error first, except a discard).
        """
        host = self._shards.hosts.get(address.shard)
        if host is None:
            if mode is not Mode.DISCARD:
                self._send(
                    peer,
                    [
                        Kind.NOT_DELIVERED,
                        call_id,
                        f"{self._endpoint.address} does not serve {address.shard}",
                    ],
                )
            return None
        entity_type = self._registry.get(address.entity_type)
        handler = None if entity_type is None else entity_type.handlers.get(tag)
        if entity_type is None or handler is None:
            error = UnknownEntityTypeError(
                entity_type=address.entity_type,
                handler=None if entity_type is None else tag,
            )
            self._answer_error(peer, call_id, mode, handler, error)
            return None
        # A request for an entity of another shard, run here, would be a
        # second instance of it (its own shard another runner may serve):
        # no caller sends one.
        problem = _mode_problem(handler, mode) or _misplaced(
            address, entity_type.shard_group, self._shards_per_group
        )
        if problem is not None:
            refused = MalformedMessageError(what="REQUEST envelope", problems=[problem])
            # The generic codec: the caller's handler may be another kind.
            self._send_error(peer, call_id, mode, None, refused)
            raise refused
        try:
            message = handler.message.decode(payload)
        except MalformedMessageError as exc:
            self._answer_error(peer, call_id, mode, handler, exc)
            return None
        return host, address, entity_type, handler, message

    def _start(
        self,
        peer: RunnerAddress,
        call_id: int,
        mode: Mode,
        target: _Target,
        left: float | None,
        metadata: Mapping[str, str] | None,
    ) -> None:
        """Run a resolved request: at once if it cannot suspend (the fast
        path), else as a detached or stream job whose outcome goes back."""
        host, address, entity_type, handler, message = target
        send = receive = None
        if mode is Mode.STREAM:
            send, receive = open_stream_channel()
        try:
            if mode is not Mode.STREAM:
                # The fast path: a handler that cannot suspend runs right here.
                exit_ = self._manager.run_nowait(
                    host, address, entity_type, handler, message, metadata
                )
                if exit_ is not None:
                    self.handled += 1
                    self._answer_now(peer, call_id, mode, handler, exit_)
                    return
            job = self._manager.submit(
                host,
                address,
                entity_type,
                handler,
                message,
                kind=JobKind.STREAM if mode is Mode.STREAM else JobKind.DETACHED,
                sink=self._reply_sink(peer, call_id) if mode is Mode.CALL else None,
                stream_channel=send,
                metadata=metadata,
            )
        except NotDelivered:
            self._send(
                peer,
                [Kind.NOT_DELIVERED, call_id, f"shard {address.shard} is stopping"],
            )
            return
        except MailboxFullError as exc:
            self._answer_error(peer, call_id, mode, handler, exc)
            return
        self.handled += 1
        if left is not None:
            job.deadline = trio.current_time() + left
        if mode is Mode.DISCARD:
            return
        key = (peer, call_id)
        self._jobs[key] = job
        if receive is not None:
            stream = self._streams[key] = _Outgoing()
            assert host.nursery is not None
            host.nursery.start_soon(
                self._pump, peer, call_id, address, handler, receive, stream
            )

    def _seen(self, peer: RunnerAddress, call_id: int) -> bool:
        """Whether ``call_id`` came from ``peer`` lately; remember it if not."""
        recent = self._recent.get(peer)
        if recent is None:
            recent = self._recent[peer] = {}
        elif call_id in recent:
            return True
        recent[call_id] = None
        if len(recent) > _RECENT_CALLS:
            del recent[next(iter(recent))]
        return False

    def _answer_error(
        self,
        peer: RunnerAddress,
        call_id: int,
        mode: Mode,
        handler: Handler | None,
        error: Exception,
    ) -> None:
        self.warnings.warning(
            peer, "refused requests", "refused a request from %s: %s", peer, error
        )
        self._send_error(peer, call_id, mode, handler, error)

    def _send_error(
        self,
        peer: RunnerAddress,
        call_id: int,
        mode: Mode,
        handler: Handler | None,
        error: Exception,
    ) -> None:
        """Answer a request with ``error`` (nothing for a discard)."""
        if mode is Mode.DISCARD:
            return
        codec = handler.reply if handler is not None else self._registry.generic_reply
        if mode is Mode.STREAM:
            self._send(peer, [Kind.STREAM_END, call_id, 0, codec.encode_error(error)])
        else:
            self._send(peer, [Kind.REPLY, call_id, codec.encode_error(error)])

    def _answer_now(
        self,
        peer: RunnerAddress,
        call_id: int,
        mode: Mode,
        handler: Handler,
        exit_: Exit,
    ) -> None:
        """Answer a request that ran on the fast path."""
        if mode is Mode.CALL:
            self._send(peer, [Kind.REPLY, call_id, _encode(handler, exit_)])
        elif exit_.error is not None:
            log.info("discarded message to %s failed: %s", handler.what, exit_.error)

    def _reply_sink(self, peer: RunnerAddress, call_id: int) -> Sink:
        def sink(job: Job, exit_: Exit | None) -> None:
            # Synchronous: the reply is queued in the tick the job ends.
            self._jobs.pop((peer, call_id), None)
            if exit_ is None:  # never ran (the shard stopped while queued)
                self._send(
                    peer,
                    [
                        Kind.NOT_DELIVERED,
                        call_id,
                        "shard stopped before the request ran",
                    ],
                )
            else:
                self._send(peer, [Kind.REPLY, call_id, _encode(job.handler, exit_)])

        return sink

    async def _pump(
        self,
        peer: RunnerAddress,
        call_id: int,
        address: EntityAddress,
        handler: Handler,
        receive: trio.MemoryReceiveChannel[Any],
        stream: _Outgoing,
    ) -> None:
        """Send a stream job's items to its caller, numbered, as its credit
        allows, then its end with the count of items sent.

        The pump runs in the shard's nursery: if that is cancelled (the
        shard stops) before the producer's end comes through, the caller is
        still sent an end, saying the shard stopped. If the caller goes away
        (``INTERRUPT``, lost connection), its scope is cancelled: it stops
        at once, with nothing to send.
        """
        key = (peer, call_id)
        credit = stream.credit
        end: Exit | None = None
        try:
            with stream.scope:
                async with receive:
                    end = await self._forward(key, handler, receive, credit)
        finally:
            self._jobs.pop(key, None)
            self._streams.pop(key, None)
            if not stream.scope.cancelled_caught:
                self._send_end(peer, call_id, address, handler, credit.sent, end)

    def _send_end(
        self,
        peer: RunnerAddress,
        call_id: int,
        address: EntityAddress,
        handler: Handler,
        count: int,
        end: Exit | None,
    ) -> None:
        """Send ``STREAM_END`` after ``count`` items: ``end``, or if the
        producer's end never came, that the shard stopped."""
        if end is None:
            outcome = stopped(
                StopReason.SHARD_STOPPED,
                persisted=False,
                request_id=None,
                address=address,
                runner=str(self._endpoint.address),
            )
            assert isinstance(outcome, Exit), "stream jobs are never persisted"
            end = outcome
        payload = _encode_end(handler, end)
        # Not if this runner is closing (its endpoint is closed): then the
        # caller sees the connection go.
        with suppress(trio.ClosedResourceError):
            self._send(peer, [Kind.STREAM_END, call_id, count, payload])

    async def _forward(
        self,
        key: tuple[RunnerAddress, int],
        handler: Handler,
        receive: trio.MemoryReceiveChannel[Any],
        credit: SendCredit,
    ) -> Exit | None:
        """Send the items of a stream as its credit allows; return its end
        (None: the channel closed without one)."""
        peer, call_id = key
        async for kind, value in receive:
            if kind != ITEM:
                end: Exit = value
                return end
            try:
                payload = handler.reply.value.encode(value)
            except MalformedMessageError as exc:
                # Only without serialize_local_calls does an item that
                # cannot travel get this far: end the stream with the error
                # rather than lose the item, and stop the generator.
                job = self._jobs.pop(key, None)
                if job is not None:
                    self._manager.cancel_job(job)
                return Exit(error=exc)
            number = await credit.take()
            self._send(peer, [Kind.STREAM_ITEM, call_id, number, payload])
        return None

    def credit(self, peer: RunnerAddress, call_id: int, limit: int) -> None:
        """The caller of stream ``call_id`` accepts items up to number
        ``limit`` (cumulative: a repeated or late credit grants nothing)."""
        stream = self._streams.get((peer, call_id))
        if stream is not None:
            stream.credit.grant(limit)

    def interrupt(self, peer: RunnerAddress, call_id: int) -> None:
        """The caller gave up on ``call_id``: cancel its job, and stop its
        stream's pump (the generator may have ended already)."""
        self._stop((peer, call_id))

    def peer_lost(self, peer: RunnerAddress) -> None:
        """The caller is gone: cancel what it was waiting for."""
        self._recent.pop(peer, None)
        self.warnings.flush(peer)
        keys = {key for key in self._jobs if key[0] == peer}
        keys.update(key for key in self._streams if key[0] == peer)
        for key in keys:
            self._stop(key)

    def _stop(self, key: tuple[RunnerAddress, int]) -> None:
        job = self._jobs.pop(key, None)
        if job is not None:
            self._manager.cancel_job(job)
        stream = self._streams.pop(key, None)
        if stream is not None:
            stream.scope.cancel()


_MODES: Final = tuple(Mode)
"""The modes by value (`Mode(value)` costs more than the index)."""
assert all(mode == value for value, mode in enumerate(_MODES))

_misplaced = functools.lru_cache(maxsize=4096)(misplaced)
"""`misplaced`, remembered: the same hot entities are asked for over and
over (`_wire.address_of` caches their addresses the same way), and the
hash of an entity id costs more than the lookup."""


def _mode_problem(handler: Handler, mode: Mode) -> str | None:
    """Why ``handler`` may not run from a ``REQUEST`` in ``mode``, if not."""
    if handler.spec.persisted:
        return (
            f"{handler.what} is persisted: its requests are delivered from"
            " storage, never run from a REQUEST"
        )
    if handler.spec.kind == "stream" and mode is not Mode.STREAM:
        return f"{handler.what} is a stream handler, not run in {mode.name} mode"
    if handler.spec.kind != "stream" and mode is Mode.STREAM:
        return f"{handler.what} is an rpc handler, not run in STREAM mode"
    return None


def _encode(handler: Handler, exit_: Exit) -> bytes:
    try:
        return handler.reply.encode_exit(exit_)
    except MalformedMessageError as exc:  # the value cannot travel
        return handler.reply.encode_error(exc)


def _encode_end(handler: Handler, exit_: Exit) -> bytes:
    """How a stream ended, for ``STREAM_END`` (never with the item codec)."""
    try:
        return handler.reply.encode_stream_end(exit_)
    except MalformedMessageError as exc:  # the error cannot travel
        return handler.reply.encode_error(exc)
