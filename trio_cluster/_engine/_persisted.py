"""Persisted messages: store, claim, deliver, record replies (Trio driver).

Sending a persisted request:

1. the sender encodes it and saves it (group commit). If the sender serves
   the entity's shard, the request is saved *already claimed* under the
   shard's epoch and handed straight to the entity manager: one write, no
   polling on the hot path;
2. a duplicate (same entity, handler and primary key) is not stored again:
   the caller gets the stored reply, or waits for the original;
3. otherwise the owner finds it by claiming: the read loop claims deliverable
   requests of the served shards when woken (a local send, a storage
   notification, a shard acquired, the next ``deliver_at`` timer) and, as a
   safety net, every ``storage_poll_interval``.

Replies are recorded fenced by the shard's epoch (group commit too); the
recorded final reply wakes the callers waiting in this process. Callers whose
request is handled elsewhere are woken by storage notifications, with a poll
as the fallback. A caller that is cancelled interrupts its request: the
interruption is stored, and the handler is cancelled where it runs.

This module is the façade, `PersistedDelivery`, and the sending side. The
rest is one module per concern, each unaware of this one:

* `_claims`: the read loop, and delivering claimed requests to entities;
* `_replies`: recording replies (and transactional handlers);
* `_waiters`: the callers and peers waiting for a final reply;
* `_notices`: direct notices to other runners, storage notifications and
  the reply poll.
"""

from __future__ import annotations

import logging
import math
from contextlib import asynccontextmanager
from datetime import datetime
from functools import partial
from typing import TYPE_CHECKING, Any

import trio

from .._call_metadata import EMPTY_METADATA
from .._context import current_transaction_var
from .._core._addresses import check_storable
from .._errors import (
    CallInTransactionError,
    EntityDefinitionError,
    MalformedMessageError,
    MessageTooLargeError,
    PersistenceError,
)
from .._storage_abc import PersistedRequest, SaveResult
from ._attempts import DEAD_LETTER_KINDS, Attempts
from ._batching import Batcher, refused
from ._claims import Claims
from ._delivery import ClaimSignal, DeliveryParts
from ._inline_persisted import InlinePersisted
from ._notices import Notices
from ._replies import ReplyRecorder
from ._waiters import ReplyWaiters

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Mapping, Sequence

    from .._clock import Clock
    from .._core._addresses import EntityAddress, RunnerAddress
    from .._core._config import ShardingConfig
    from .._core._snowflake import SnowflakeGenerator
    from .._registry import EntityType, Handler, Registry
    from .._storage_abc import MessageStorage, StorageTransaction
    from .._transport_abc import Endpoint
    from ._manager import EntityManager
    from ._shard_table import ShardTable
    from ._slots import ShardHost
    from ._waiters import Waiter

__all__ = ["PersistedDelivery"]

log = logging.getLogger("trio_cluster.persisted")

_MAX_BATCH = 1024


class PersistedDelivery:
    """The persisted-message service of one runner."""

    def __init__(
        self,
        *,
        storage: MessageStorage,
        shards: ShardTable,
        manager: EntityManager,
        registry: Registry,
        config: ShardingConfig,
        clock: Clock,
        ids: SnowflakeGenerator,
        endpoint: Endpoint | None = None,
    ) -> None:
        self._parts = DeliveryParts(
            storage=storage,
            shards=shards,
            manager=manager,
            registry=registry,
            config=config,
            clock=clock,
            endpoint=endpoint,
            signal=ClaimSignal(),
            waiters=ReplyWaiters(endpoint=endpoint),
        )
        self._ids = ids
        self._serialize = config.serialize_local_calls
        self._saves: Batcher[PersistedRequest, SaveResult] = Batcher(
            self._flush_saves, max_batch=_MAX_BATCH, name="saving requests"
        )
        self._attempts = Attempts(self._parts)
        self._recorder = ReplyRecorder(self._parts, self._attempts)
        self._claims = Claims(self._parts, self._recorder, self._attempts)
        self._inline = InlinePersisted(manager, self._recorder, self._claims)
        self._notices = Notices(self._parts, self._recorder, self._claims)
        self.closing = False
        """The runner is shutting down (see `begin_shutdown`)."""

    # ------------------------------------------------------------------
    # Service

    async def run(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Run the batchers, the read loop and the notification loops until
        cancelled. Callers still waiting for a write then get `PersistenceError`,
        callers waiting for a reply `RunnerClosedError`."""
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(self._recorder.run)
                nursery.start_soon(self._saves.run)
                nursery.start_soon(self._claims.run)
                nursery.start_soon(self._notices.notification_loop)
                nursery.start_soon(self._notices.reply_poll_loop)
                task_status.started()
        finally:
            self._parts.waiters.release_all()

    def begin_shutdown(self) -> None:
        """The runner shuts down: interrupted callers no longer store
        interruptions, and no reply is recorded for a stopping shard."""
        self.closing = True
        self._recorder.closing = True

    @property
    def statistics(self) -> dict[str, int]:
        return {
            "save_batches": self._saves.batches,
            "saved": self._saves.items,
            "reply_batches": self._recorder.batches,
            "replies": self._recorder.recorded,
            "claims": self._claims.claims,
            "run_by_callers": self._inline.ran,
            "saves_written_by_callers": self._saves.written_here,
            "replies_written_by_callers": self._recorder.written_here,
            "held_unknown_type": self._claims.held,
            "waiting_callers": self._parts.waiters.waiting,
            "retries": self._attempts.retried,
        }

    @property
    def dead_lettered(self) -> dict[str, int]:
        """Requests dead-lettered by this runner so far, by kind
        (`trio_cluster._engine._attempts.DEAD_LETTER_KINDS`)."""
        return {kind: self._attempts.dead_lettered[kind] for kind in DEAD_LETTER_KINDS}

    @property
    def delivered(self) -> int:
        """Persisted requests handed to entities so far."""
        return self._claims.delivered

    @property
    def redelivered(self) -> int:
        """Claimed requests handed to entities so far that an earlier claim
        had not finished (after a failover, a restart, a moved shard)."""
        return self._claims.redelivered

    def shard_started(self, host: ShardHost) -> None:
        """A shard is served here now: claim its requests."""
        self._parts.signal.nudge()

    async def shard_stopped(self, host: ShardHost) -> None:
        """A shard stopped gracefully, its lease still held: give back the
        requests claimed here that did not run (queued behind others, or
        held for a type not hosted here), so that their claims do not count
        as attempts (see `Attempts.give_back`)."""
        request_ids = host.bounced + self._claims.take_held(host)
        host.bounced = []
        if request_ids:
            await self._attempts.give_back(host, request_ids)
        else:
            await trio.lowlevel.checkpoint()

    def remote_notice(
        self, request_id: int, address: EntityAddress, reply_to: RunnerAddress | None
    ) -> None:
        """Another runner stored ``request_id`` for a shard served here."""
        self._notices.remote_notice(request_id, address, reply_to)

    def remote_reply(
        self, peer: RunnerAddress, request_id: int, payload: bytes
    ) -> None:
        """``peer`` sent the final reply of a request sent from here: taken
        only from the owner asked for it, while a caller waits (a reply from
        anyone else is ignored, and the caller gets the reply from storage)."""
        if not self._parts.waiters.pushed(peer, request_id, payload):
            log.debug(
                "ignored a final reply to request %d from %s (not asked of it)",
                request_id,
                peer,
            )

    async def _flush_saves(self, items: Sequence[PersistedRequest]) -> list[SaveResult]:
        return await self._parts.storage.save_requests(
            items, now=self._parts.clock.now()
        )

    # ------------------------------------------------------------------
    # Sending

    async def call(
        self,
        address: EntityAddress,
        entity_type: EntityType,
        handler: Handler,
        message: Any,
        *,
        discard: bool,
        metadata: Mapping[str, str] | None = None,
    ) -> Any:
        """Send a persisted request (see the module docstring) and, unless
        ``discard``, wait for its reply. It is stored with ``metadata``, the
        call metadata its handler runs with.

        Raises:
            MalformedMessageError, MessageTooLargeError: the message cannot be
                stored (or storage refused it: the cause is the backend's
                `StorageRefusedError`; other requests are not affected).
            PersistenceError: storage failed before the request was stored.
            RequestInterruptedError: the request (attached by primary key) was
                interrupted by its original sender.
        """
        transaction = current_transaction_var.get()
        if transaction is not None:
            await self._send_in(
                transaction, address, handler, message, discard, metadata
            )
            return None
        # A type only called from here is never run here: its owner (maybe
        # this runner) answers it from storage.
        host = self._parts.shards.host(address.shard) if entity_type.hosted else None
        request = self._request(address, handler, message, host, metadata)
        request_id = request.request_id
        waiter = None if discard else self._parts.waiters.register(request_id)
        # A request saved claimed counts against the in-flight budget from
        # now on: concurrent sends must not all find room (`Claims.admits`).
        reserved = int(request.claim_epoch is not None)
        self._claims.reserved += reserved
        try:
            result = await self._saves.submit(
                request,
                abandoned=partial(
                    self._saved_abandoned,
                    request,
                    entity_type,
                    handler,
                    message,
                    discard,
                ),
                # The only call waiting: written in this task (`Batcher`).
                here=len(self._parts.waiters) == (waiter is not None),
            )
        except BaseException as exc:
            if waiter is not None:
                self._parts.waiters.unregister(request_id, waiter)
            if refused(exc):  # this request alone (see `Batcher`)
                raise _refused_request(handler, exc) from exc
            raise
        finally:
            self._claims.reserved -= reserved
        if result.duplicate:
            if waiter is not None:
                self._parts.waiters.unregister(request_id, waiter)
            if discard:
                return None
            return await self._attach(handler, result)
        if result.claimed and host is not None:
            local_message = self._local_message(handler, request, message)
            if waiter is None:
                self._claims.deliver(
                    host,
                    address,
                    entity_type,
                    handler,
                    local_message,
                    request_id,
                    metadata,
                )
                return None
            try:
                await self._inline.run(
                    host,
                    address,
                    entity_type,
                    handler,
                    local_message,
                    request_id,
                    metadata,
                )
            except BaseException:
                await self._give_up(request_id, waiter, interrupt=True)
                raise
        else:
            # Whether the shard is served here *now*: one acquired while the
            # save ran may have had a claim that read storage before this
            # request was in it, and marked the shard caught up.
            if self._parts.shards.host(address.shard) is not None and (
                self._deliverable(request)
            ):
                self._claims.saved_behind(address.shard)
            self._notices.notice_owner(
                address, request_id, not discard, request.deliver_at
            )
        if waiter is None:
            return None
        return await self._wait(handler, request_id, waiter, interrupt=True)

    async def _send_in(
        self,
        transaction: StorageTransaction,
        address: EntityAddress,
        handler: Handler,
        message: Any,
        discard: bool,
        metadata: Mapping[str, str] | None,
    ) -> None:
        """The outbox: save a persisted message inside the current storage
        transaction. It exists, and its owner is notified (by storage), when
        the transaction commits; it never exists if it rolls back.

        Raises:
            CallInTransactionError: not ``discard``: its reply could never
                come before the commit it would wait for.
            as `call` otherwise.
        """
        if not discard:
            await trio.lowlevel.checkpoint()
            raise CallInTransactionError(
                f"{handler.what}: a persisted call inside a transaction would wait"
                " for a reply to a request that exists only once the transaction"
                " commits; send it with .discard(...), or call after the transaction"
            )
        request = self._request(address, handler, message, None, metadata)
        try:
            await self._parts.storage.save_requests(
                [request], now=self._parts.clock.now(), transaction=transaction
            )
        except Exception as exc:
            if refused(exc):
                raise _refused_request(handler, exc) from exc
            raise

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[StorageTransaction]:
        """A storage transaction for application code (``runner.transaction()``):
        ``current_transaction()`` inside the block, persisted messages sent
        there saved in it. It commits when the block exits normally, and
        rolls back on an exception or cancellation (which propagates).

        Raises:
            PersistenceError: the transaction could not be opened, or its
                commit failed (nothing of it took effect).
        """
        async with self._parts.storage.open_transaction() as transaction:
            token = current_transaction_var.set(transaction)
            try:
                yield transaction
            finally:
                current_transaction_var.reset(token)

    def _local_message(
        self, handler: Handler, request: PersistedRequest, message: Any
    ) -> Any:
        """The message a handler here gets: with ``serialize_local_calls``,
        as decoded from the stored payload, or the message itself when that
        is the same immutable value (see `serialization._unchanged`)."""
        if (
            not self._serialize
            or handler.message.size_if_unchanged(message) is not None
        ):
            return message
        return handler.message.decode(request.payload)

    def _saved_abandoned(
        self,
        request: PersistedRequest,
        entity_type: EntityType,
        handler: Handler,
        message: Any,
        discard: bool,
        result: SaveResult,
    ) -> None:
        """``request`` was saved after its sender was cancelled while waiting
        for the save. Saved already claimed by this runner, it is delivered
        to its entity as a sent one would be (otherwise it would wait,
        claimed, for the shard's next epoch) and, unless ``discard``,
        interrupted there at once: the handler does not run and the
        interrupted reply is recorded, as for a caller cancelled later. A
        request saved unclaimed is left to its owner.

        A duplicate still claimed is this very request saved twice: its
        sender was cancelled while writing it in its own task (see
        `Batcher`), so the first write's outcome was unknown and the flusher
        wrote it again; it is delivered as above (``claimed`` is only ever
        true of the request's own id, never of a duplicate by primary key).
        """
        host = self._parts.shards.host(request.address.shard)
        if host is None:
            return
        if not result.claimed:
            if not result.duplicate and self._deliverable(request):
                self._claims.saved_behind(request.address.shard)
            return
        if host.epoch != request.claim_epoch:
            return  # the shard moved on: its next owner claims it again
        self._claims.deliver(
            host,
            request.address,
            entity_type,
            handler,
            self._local_message(handler, request, message),
            request.request_id,
            request.metadata or None,
        )
        if not discard:
            self._parts.manager.interrupt(request.request_id)

    def _request(
        self,
        address: EntityAddress,
        handler: Handler,
        message: Any,
        host: ShardHost | None,
        metadata: Mapping[str, str] | None,
    ) -> PersistedRequest:
        """The request to store; claimed already when this runner serves the
        shard, has caught up with it, and the request is deliverable now.

        Raises:
            MalformedMessageError, MessageTooLargeError: the message cannot be stored.
            EntityDefinitionError: ``primary_key`` or ``deliver_at`` returned
                something unusable.
        """
        payload = handler.message.encode(message)
        if len(payload) > self._parts.config.max_message_size:
            raise MessageTooLargeError(
                size=len(payload), limit=self._parts.config.max_message_size
            )
        primary_key = _primary_key(handler, message)
        deliver_at = _deliver_at(handler, message)
        now = self._parts.clock.now()
        request_id = self._ids.next_id(int(now * 1000))
        deliverable = deliver_at is None or deliver_at <= now
        # Saved unclaimed when the runner is at its in-flight budget: the
        # read loop admits it as replies free the budget (see `_claims`).
        return PersistedRequest(
            request_id=request_id,
            address=address,
            tag=handler.spec.name,
            payload=payload,
            primary_key=primary_key,
            deliver_at=deliver_at,
            claim_epoch=(
                host.epoch
                if host is not None
                and deliverable
                and self._claims.caught_up(address.shard, host.epoch)
                and self._claims.admits()
                else None
            ),
            metadata=EMPTY_METADATA if metadata is None else metadata,
        )

    def _deliverable(self, request: PersistedRequest) -> bool:
        """Whether ``request`` is deliverable now (a timer's request is not
        ordered with others: it waits for its time)."""
        when = request.deliver_at
        return when is None or when <= self._parts.clock.now()

    async def _attach(self, handler: Handler, result: SaveResult) -> Any:
        """A duplicate was not stored: the original's reply, when it has one."""
        if result.final_reply is not None:
            return handler.reply.decode_exit(
                result.final_reply, request_id=result.request_id
            ).unwrap()
        original = self._parts.waiters.register(result.request_id)
        return await self._wait(handler, result.request_id, original, interrupt=False)

    async def _wait(
        self, handler: Handler, request_id: int, waiter: Waiter, *, interrupt: bool
    ) -> Any:
        if not waiter.event.is_set():  # set already: recorded by this task
            try:
                await waiter.event.wait()
            except BaseException:
                await self._give_up(request_id, waiter, interrupt=interrupt)
                raise
        if waiter.exit is not None and (not self._serialize or waiter.payload is None):
            return waiter.exit.unwrap()
        assert waiter.payload is not None
        return handler.reply.decode_exit(waiter.payload, request_id=request_id).unwrap()

    async def _give_up(
        self, request_id: int, waiter: Waiter, *, interrupt: bool
    ) -> None:
        """The caller stops waiting (it was cancelled); with ``interrupt``,
        its request is interrupted (`_interrupt`, shielded)."""
        self._parts.waiters.unregister(request_id, waiter)
        if interrupt and not self.closing:
            with trio.CancelScope(shield=True):
                await self._interrupt(request_id)

    async def _interrupt(self, request_id: int) -> None:
        self._parts.manager.interrupt(request_id)
        self._claims.interrupt(request_id)
        with trio.move_on_after(self._parts.config.lease_refresh_interval) as scope:
            try:
                await self._parts.storage.interrupt([request_id])
            except PersistenceError as exc:
                log.warning(
                    "could not store the interruption of request %d: %s",
                    request_id,
                    exc,
                )
        if scope.cancelled_caught:
            log.warning("storing the interruption of request %d timed out", request_id)


def _refused_request(handler: Handler, exc: BaseException) -> MalformedMessageError:
    """The error of a request storage refused for its data (`refused`)."""
    return MalformedMessageError(
        what=f"{handler.what} request",
        problems=[f"storage refused to store it: {exc}"],
    )


def _primary_key(handler: Handler, message: Any) -> str | None:
    function = handler.spec.primary_key
    if function is None:
        return None
    key: object = function(message)
    if not isinstance(key, str) or not key:
        raise EntityDefinitionError(
            f"{handler.what}: primary_key must return a non-empty str, got {key!r}"
        )
    check_storable(f"{handler.what}: the primary key", key)
    return key


def _deliver_at(handler: Handler, message: Any) -> float | None:
    function = handler.spec.deliver_at
    if function is None:
        return None
    when: object = function(message)
    if when is None:
        return None
    if isinstance(when, datetime):
        if when.tzinfo is None:
            raise EntityDefinitionError(
                f"{handler.what}: deliver_at returned a naive datetime; use an aware one"
                " (e.g. datetime.now(UTC) + timedelta(minutes=5))"
            )
        return when.timestamp()
    if (
        isinstance(when, int | float)
        and not isinstance(when, bool)
        and math.isfinite(when)
    ):
        return float(when)
    raise EntityDefinitionError(
        f"{handler.what}: deliver_at must return an aware datetime, Unix seconds or None,"
        f" got {when!r}"
    )
