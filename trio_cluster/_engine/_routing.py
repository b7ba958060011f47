"""Routing calls to the runner that serves the entity (Trio driver).

For each call: if this runner serves the entity's shard, the handler runs
here (in the caller's own task for a volatile call); if the assignment names
another runner and a transport is configured, the request goes there.
While the shard has no reachable owner (it is moving, or its runner just
died and the cluster has not yet reassigned it), the call waits for the
assignment to change and routes again, within ``send_retry_timeout`` and the
caller's own deadline, then raises `EntityNotAssignedError`.

Only requests that certainly did not run are routed again: a queued message
bounced by a stopping shard, a ``NOT_DELIVERED`` answer, a send that never
left. A volatile request whose owner vanished while it waited fails with
`RunnerUnavailableError` (it may have run: at most once).

Every call carries the call metadata current in the caller's context
(`trio_cluster.with_metadata`; inside a handler, what its caller sent). With
a tracer, a call first opens the caller's span, which writes the trace
context into a copy of that metadata (the carrier), then runs as usual with
the carrier as its metadata; without one, that costs one ``is None`` check.
"""

from __future__ import annotations

from contextlib import asynccontextmanager
from time import perf_counter
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Literal

import attrs
import trio

from .._call_metadata import EMPTY_METADATA, current_metadata_var, metadata_problem
from .._context import RunnerContext, current_runner_var, enter_runner, leave_runner
from .._core._config import ShardingConfig
from .._core._histogram import Histogram
from .._errors import (
    EntityNotAssignedError,
    InvalidMetadataError,
    MailboxFullError,
    MessageTooLargeError,
    UnknownEntityTypeError,
)
from .._errors._closed import RunnerClosedError
from .._tracing import TracedCall, Tracer
from ._error_counts import ErrorCounts
from ._manager import EntityManager, NotDelivered
from ._persisted import PersistedDelivery
from ._remote import NotSent, OutboundCalls, RouteAgain
from ._shard_table import ShardTable
from ._slots import JobKind
from ._streams import consume, open_stream_channel

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Mapping

    from .._core._addresses import EntityAddress, RunnerAddress, ShardId
    from .._registry import EntityType, Handler

__all__ = ["Router"]


@attrs.define(eq=False, kw_only=True)
class Router:
    """Sends each call to the runner that serves its entity."""

    _config: ShardingConfig
    """The runner's policies."""
    _shards: ShardTable
    """Which shards are served here, and the assignment."""
    _manager: EntityManager
    """Runs local handlers."""
    _persisted: PersistedDelivery
    """Sends persisted requests."""
    outbound: OutboundCalls | None
    """Calls to other runners; None without a transport."""
    _context: RunnerContext
    """What handlers started from a call see as their current runner (the
    façade)."""
    _serialize: bool = attrs.field(init=False)
    closed: bool = attrs.field(init=False, default=False)
    remote_calls: int = attrs.field(init=False, default=0)
    latency: dict[str, Histogram] = attrs.field(
        init=False, factory=lambda: {"volatile": Histogram(), "persisted": Histogram()}
    )
    """Caller-observed latency of rpc calls (completed, failed or
    cancelled), per delivery kind, in seconds."""
    errors: ErrorCounts = attrs.field(init=False, factory=ErrorCounts)
    """Errors raised to this runner's callers (calls, sends, streams)."""
    tracer: Tracer | None = None
    """Makes the caller's span of each call (None: no tracing)."""

    _max_message_size: int = attrs.field(init=False)
    _volatile_latency: Histogram = attrs.field(init=False)
    _persisted_latency: Histogram = attrs.field(init=False)

    @_serialize.default
    def _serialize_default(self) -> bool:
        return self._config.serialize_local_calls

    def __attrs_post_init__(self) -> None:
        # Read on every call (W1's hot path): one attribute each.
        self._max_message_size = self._config.max_message_size
        self._volatile_latency = self.latency["volatile"]
        self._persisted_latency = self.latency["persisted"]

    def close(self) -> None:
        """Take no more calls (the runner is shutting down)."""
        self.closed = True

    def check_open(self) -> None:
        if self.closed:
            raise RunnerClosedError("the runner is shut down; it takes no more calls")

    def shard_id(self, shard: ShardId) -> ShardId:
        """The object for ``shard`` that addresses made for this runner's
        clients should hold (see `ShardTable.shard_id`)."""
        return self._shards.shard_id(shard)

    def _encode(self, handler: Handler, message: Any) -> bytes:
        payload = handler.message.encode(message)
        if len(payload) > self._config.max_message_size:
            raise MessageTooLargeError(
                size=len(payload), limit=self._config.max_message_size
            )
        return payload

    def _for_local(self, handler: Handler, message: Any) -> tuple[bytes | None, Any]:
        """The encoded message (None: not encoded yet) and the message a
        handler here gets: with ``serialize_local_calls``, the message as
        decoded, or the message itself when that is the same immutable value
        (see `serialization._unchanged`).

        Raises:
            MalformedMessageError, MessageTooLargeError: it cannot travel.
        """
        if not self._serialize:
            return None, message
        size = handler.message.size_if_unchanged(message)
        if size is not None and size <= self._max_message_size:
            return None, message
        payload = self._encode(handler, message)
        return payload, handler.message.decode(payload)

    def _remote_owner(self, address: EntityAddress) -> RunnerAddress | None:
        if self.outbound is None:
            return None
        return self._shards.remote_owners.get(address.shard)

    async def _wait(self, address: EntityAddress, deadline: float | None) -> float:
        """Wait for the routing to change; return the (set) routing deadline.

        Raises:
            EntityNotAssignedError: past the deadline, or no live runner hosts
                the entity's shard group.
            RunnerClosedError: the runner shut down meanwhile.
        """
        now = trio.current_time()
        if deadline is None:
            deadline = now + self._config.send_retry_timeout
        if now >= deadline or not self._shards.hosts_group(address.shard.group):
            raise EntityNotAssignedError(address=str(address))
        await self._shards.wait_changed(
            min(deadline, now + self._config.send_retry_interval)
        )
        self.check_open()
        return deadline

    async def call(
        self,
        entity_type: EntityType,
        address: EntityAddress,
        handler: Handler,
        message: Any,
        *,
        traced: bool = False,
    ) -> Any:
        """A call through a client handle (see `BoundRpc.__call__`).

        ``traced``: the caller's span is open already (`_traced_call`)."""
        if self.tracer is not None and not traced:
            return await self._traced_call(entity_type, address, handler, message)
        if self.closed:  # `check_open`, called only when it raises
            self.check_open()
        started = perf_counter()
        # NOTE: this task's log records name this runner. `enter_runner`
        # inlined: this runs for every call (W1's hot path), where two more
        # function calls are measurable.
        token = (
            None
            if current_runner_var.get(None) is self._context
            else current_runner_var.set(self._context)
        )
        persisted = handler.spec.persisted
        metadata = current_metadata_var.get()
        try:
            if persisted:
                return await self._persisted.call(
                    address,
                    entity_type,
                    handler,
                    message,
                    discard=False,
                    metadata=metadata,
                )
            # NOTE: `_for_local` inlined (the hot path of W1).
            payload: bytes | None = None
            local_message = message
            if self._serialize:
                size = handler.message.size_if_unchanged(message)
                if size is None or size > self._max_message_size:
                    payload = self._encode(handler, message)
                    local_message = handler.message.decode(payload)
            deadline: float | None = None
            while True:
                host = self._shards.hosts.get(address.shard)
                if host is not None:
                    if not entity_type.hosted:
                        raise _not_hosted(entity_type)
                    try:
                        return await self._manager.call(
                            host, address, entity_type, handler, local_message, metadata
                        )
                    except NotDelivered:
                        pass
                elif (outbound := self.outbound) is not None and (
                    peer := self._shards.remote_owners.get(address.shard)
                ) is not None:
                    # `_remote_owner`, inlined: one call less per remote call.
                    if payload is None:
                        payload = self._encode(handler, message)
                    try:
                        self.remote_calls += 1
                        return await outbound.call(
                            peer, address, handler, payload, metadata
                        )
                    except (NotSent, RouteAgain):
                        pass
                deadline = await self._wait(address, deadline)
        except Exception as exc:
            self.errors.count(handler, exc)
            raise
        finally:
            (self._persisted_latency if persisted else self._volatile_latency).observe(
                perf_counter() - started
            )
            if token is not None:
                current_runner_var.reset(token)

    def call_nowait(
        self,
        entity_type: EntityType,
        address: EntityAddress,
        handler: Handler,
        message: Any,
    ) -> Any:
        """`call`, run to completion now in the calling code, without a task
        or a schedule point, when nothing can make it wait: a volatile
        handler that cannot suspend, of an entity this runner serves, idle
        and not paused or starting (`EntityManager.run_nowait`), and no
        tracer. The gateway's fast path for a client's call.

        Raises:
            trio.WouldBlock: it cannot run at once (nothing happened: await
                `call` instead).
            Exception: what `call` raises for a request that ran (a declared
                error as itself, `RemoteError` for an undeclared one;
                `MalformedMessageError`, `MessageTooLargeError` with
                ``serialize_local_calls``).
        """
        if (
            self.tracer is not None
            or self.closed
            or handler.spec.persisted
            or not entity_type.hosted
        ):
            raise trio.WouldBlock
        host = self._shards.hosts.get(address.shard)
        if host is None:
            raise trio.WouldBlock
        started = perf_counter()
        # NOTE: unlike `call`, no `current_runner_var` set in the caller's
        # context: nothing here awaits, and nothing that runs in that context
        # logs (the handler, and what logs about it, runs in a copy of the
        # runner's base context, which names the runner; tasks it starts get
        # that context too).
        try:
            # NOTE: `_for_local` inlined (the gateway's hot path).
            local_message = message
            if self._serialize:
                size = handler.message.size_if_unchanged(message)
                if size is None or size > self._max_message_size:
                    local_message = handler.message.decode(
                        self._encode(handler, message)
                    )
            exit_ = self._manager.run_nowait(
                host,
                address,
                entity_type,
                handler,
                local_message,
                current_metadata_var.get(),
            )
        except (NotDelivered, MailboxFullError):
            # `call` routes again, or raises this, as it always did.
            exit_ = None
        except Exception as exc:
            self.errors.count(handler, exc)
            self._volatile_latency.observe(perf_counter() - started)
            raise
        if exit_ is None:
            raise trio.WouldBlock
        self._volatile_latency.observe(perf_counter() - started)
        error = exit_.error
        if error is None:  # `Exit.unwrap`, inlined
            return exit_.value
        if isinstance(error, Exception):
            self.errors.count(handler, error)
        raise error

    async def discard(
        self,
        entity_type: EntityType,
        address: EntityAddress,
        handler: Handler,
        message: Any,
        *,
        traced: bool = False,
    ) -> None:
        """A fire-and-forget send (see `BoundRpc.discard`).

        ``traced``: the caller's span is open already (`_traced_call`)."""
        if self.tracer is not None and not traced:
            await self._traced_call(
                entity_type, address, handler, message, kind="discard"
            )
            return
        self.check_open()
        # NOTE: as in `call`, this task's log records name this runner.
        # (Handlers never run in the caller's context: they find their
        # runner in the runner's base context, see `_isolation`.)
        token = enter_runner(self._context)
        metadata = current_metadata_var.get()
        try:
            if handler.spec.persisted:
                await self._persisted.call(
                    address,
                    entity_type,
                    handler,
                    message,
                    discard=True,
                    metadata=metadata,
                )
                return
            payload, local_message = self._for_local(handler, message)
            deadline: float | None = None
            while True:
                host = self._shards.hosts.get(address.shard)
                if host is not None:
                    if not entity_type.hosted:
                        raise _not_hosted(entity_type)
                    try:
                        self._manager.submit(
                            host,
                            address,
                            entity_type,
                            handler,
                            local_message,
                            metadata=metadata,
                        )
                    except NotDelivered:
                        pass
                    else:
                        await trio.lowlevel.checkpoint()
                        return
                elif (peer := self._remote_owner(address)) is not None:
                    assert self.outbound is not None
                    try:
                        await self.outbound.discard(
                            peer,
                            address,
                            handler,
                            payload or self._encode(handler, message),
                            metadata,
                        )
                    except NotSent:
                        pass
                    else:
                        return
                deadline = await self._wait(address, deadline)
        except Exception as exc:
            self.errors.count(handler, exc)
            raise
        finally:
            leave_runner(token)

    @asynccontextmanager
    async def stream(
        self,
        entity_type: EntityType,
        address: EntityAddress,
        handler: Handler,
        message: Any,
    ) -> AsyncIterator[AsyncIterator[Any]]:
        """Open a stream (see `BoundStream.__call__`), inside the caller's
        span if there is a tracer. Errors raised while opening it and while
        reading its items are counted (`ErrorCounts`); what the caller's own
        block raises is not."""
        if self.tracer is None:
            opened = self._open_stream(entity_type, address, handler, message)
        else:
            opened = self._traced_stream(entity_type, address, handler, message)
        try:
            items = await opened.__aenter__()
        except Exception as exc:
            self.errors.count(handler, exc)
            raise
        async with _Exit(opened):
            yield _CountedItems(items, self.errors, handler)

    @asynccontextmanager
    async def _open_stream(
        self,
        entity_type: EntityType,
        address: EntityAddress,
        handler: Handler,
        message: Any,
    ) -> AsyncIterator[AsyncIterator[Any]]:
        self.check_open()
        metadata = current_metadata_var.get()
        payload, local_message = self._for_local(handler, message)
        deadline: float | None = None
        while True:
            host = self._shards.hosts.get(address.shard)
            if host is not None:
                if not entity_type.hosted:
                    raise _not_hosted(entity_type)
                send, receive = open_stream_channel()
                try:
                    job = self._manager.submit(
                        host,
                        address,
                        entity_type,
                        handler,
                        local_message,
                        kind=JobKind.STREAM,
                        stream_channel=send,
                        metadata=metadata,
                    )
                except NotDelivered:
                    send.close()
                    receive.close()
                    job = None
                if job is not None:
                    async with consume(self._manager, job, receive) as items:
                        yield items
                    return
            elif (peer := self._remote_owner(address)) is not None:
                assert self.outbound is not None
                opened = self.outbound.stream(
                    peer,
                    address,
                    handler,
                    payload or self._encode(handler, message),
                    metadata,
                )
                try:
                    items = await opened.__aenter__()
                except NotSent:
                    pass
                else:
                    async with _Exit(opened):
                        yield items
                    return
            deadline = await self._wait(address, deadline)

    # ------------------------------------------------------------------
    # Tracing (the caller's side)

    def _traced(
        self,
        kind: Literal["call", "discard", "stream"],
        entity_type: EntityType,
        address: EntityAddress,
        handler: Handler,
    ) -> TracedCall:
        return TracedCall(
            kind=kind,
            entity_type=entity_type.name,
            entity_id=address.entity_id.value,
            handler=handler.spec.name,
            persisted=handler.spec.persisted,
            runner=str(self._shards.address),
        )

    async def _traced_call(
        self,
        entity_type: EntityType,
        address: EntityAddress,
        handler: Handler,
        message: Any,
        *,
        kind: Literal["call", "discard"] = "call",
    ) -> Any:
        """`call` (or `discard`) inside the caller's span, carrying the
        trace context the tracer writes into a copy of the metadata."""
        tracer = self.tracer
        assert tracer is not None
        carrier = dict(current_metadata_var.get() or EMPTY_METADATA)
        traced = self._traced(kind, entity_type, address, handler)
        with tracer.caller_span(traced, carrier):
            token = current_metadata_var.set(_checked(carrier))
            try:
                if kind == "discard":
                    return await self.discard(
                        entity_type, address, handler, message, traced=True
                    )
                return await self.call(
                    entity_type, address, handler, message, traced=True
                )
            finally:
                current_metadata_var.reset(token)

    @asynccontextmanager
    async def _traced_stream(
        self,
        entity_type: EntityType,
        address: EntityAddress,
        handler: Handler,
        message: Any,
    ) -> AsyncIterator[AsyncIterator[Any]]:
        """`stream` inside the caller's span (open while the block runs);
        the carrier is the stream's metadata only while it is opened."""
        tracer = self.tracer
        assert tracer is not None
        carrier = dict(current_metadata_var.get() or EMPTY_METADATA)
        traced = self._traced("stream", entity_type, address, handler)
        with tracer.caller_span(traced, carrier):
            token = current_metadata_var.set(_checked(carrier))
            try:
                opened = self._open_stream(entity_type, address, handler, message)
                items = await opened.__aenter__()
            finally:
                current_metadata_var.reset(token)
            async with _Exit(opened):
                yield items


def _checked(carrier: dict[str, str]) -> Mapping[str, str]:
    """The carrier a tracer wrote into, as the call's metadata.

    Raises:
        InvalidMetadataError: the tracer wrote what cannot travel (a peer
            would drop the request; better fail the call here, at once).
    """
    problem = metadata_problem(carrier)
    if problem is not None:
        raise InvalidMetadataError(
            f"the tracer wrote call metadata that cannot travel: {problem}"
        )
    return MappingProxyType(carrier)


def _not_hosted(entity_type: EntityType) -> UnknownEntityTypeError:
    """This runner serves the shard but does not host the type (it only calls
    it): what any owner that does not host it answers."""
    return UnknownEntityTypeError(entity_type=entity_type.name, handler=None)


class _CountedItems:
    """A stream's items, counting the errors reading them raises."""

    __slots__ = ("_errors", "_handler", "_items")

    def __init__(
        self, items: AsyncIterator[Any], errors: ErrorCounts, handler: Handler
    ) -> None:
        self._items = items
        self._errors = errors
        self._handler = handler

    def __aiter__(self) -> _CountedItems:
        return self

    async def __anext__(self) -> Any:
        try:
            return await self._items.__anext__()
        except StopAsyncIteration:
            raise
        except Exception as exc:
            self._errors.count(self._handler, exc)
            raise


class _Exit:
    """Exit an already-entered async context manager (for the stream above)."""

    def __init__(self, manager: Any) -> None:
        self._manager = manager

    async def __aenter__(self) -> None:
        await trio.lowlevel.checkpoint()

    async def __aexit__(self, *exc_info: object) -> bool:
        return bool(await self._manager.__aexit__(*exc_info))
