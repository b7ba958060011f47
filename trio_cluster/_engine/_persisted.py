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
"""

from __future__ import annotations

import logging
import math
from datetime import datetime
from typing import TYPE_CHECKING, Any

import trio

from .._context import current_transaction_var
from .._errors import (
    EntityDefinitionError,
    MalformedMessageError,
    MessageTooLargeError,
    PersistenceError,
    RunnerUnavailableError,
    UnknownEntityTypeError,
)
from .._storage_abc import (
    ClaimedRequest,
    MessagesAvailable,
    PersistedRequest,
    RepliesAvailable,
    ReplyOutcome,
    ReplyQuery,
    ReplyRecord,
    RequestsInterrupted,
    SaveResult,
)
from ..serialization._replies import Exit
from ._batching import Batcher
from ._manager import NotDelivered, RetryLater, is_marker
from ._wire import Kind, address_fields

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Sequence

    from .._clock import Clock
    from .._core._addresses import EntityAddress, RunnerAddress, ShardId
    from .._core._config import ShardingConfig
    from .._core._snowflake import SnowflakeGenerator
    from .._registry import EntityType, Handler, Registry
    from .._storage_abc import MessageStorage
    from .._transport_abc import Endpoint
    from ._manager import EntityManager
    from ._sharding import Sharding
    from ._slots import Job, ShardHost

__all__ = ["PersistedDelivery"]

log = logging.getLogger("trio_cluster.persisted")

_MAX_BATCH = 1024
_MAX_REPLY_TO = 100_000
"""Most remote waiters remembered (the oldest are forgotten; they then get
their reply from storage)."""
_FLOAT_TOLERANCE = 1e-6
"""Seconds of slack when a ``deliver_at`` timer fires, for float rounding
between the timer and the wall clock."""


class _Waiter:
    __slots__ = ("event", "exit", "payload")

    def __init__(self) -> None:
        self.event = trio.Event()
        self.payload: bytes | None = None
        self.exit: Exit | None = None


class PersistedDelivery:
    """The persisted-message service of one runner."""

    def __init__(
        self,
        *,
        storage: MessageStorage,
        sharding: Sharding,
        manager: EntityManager,
        registry: Registry,
        config: ShardingConfig,
        clock: Clock,
        ids: SnowflakeGenerator,
    ) -> None:
        self._storage = storage
        self._sharding = sharding
        self._manager = manager
        self._registry = registry
        self._config = config
        self._clock = clock
        self._ids = ids
        self._serialize = config.serialize_local_calls
        self._saves: Batcher[PersistedRequest, SaveResult] = Batcher(
            self._flush_saves, max_batch=_MAX_BATCH, name="saving requests"
        )
        self._replies: Batcher[ReplyRecord, ReplyOutcome] = Batcher(
            self._flush_replies, max_batch=_MAX_BATCH, name="recording replies"
        )
        self._waiters: dict[int, list[_Waiter]] = {}
        self._reply_to: dict[int, RunnerAddress] = {}
        """Requests another runner waits for: send it the final reply."""
        self.endpoint: Endpoint | None = None
        """This runner's transport endpoint, if it has one."""
        self._wake = trio.Event()
        self._starved = False
        """The read loop waits for in-flight persisted jobs to finish
        (``max_persisted_in_flight``): wake it when a reply is recorded."""
        self._recording: dict[int, bool] = {}
        """Requests whose reply this runner is recording -> whether a
        `RepliesAvailable` for them arrived meanwhile."""
        self._next_deliver_at = math.inf
        self._caught_up: dict[ShardId, int] = {}
        """Shard -> the epoch at which a claim found nothing more to take.
        Until then, older requests of the shard may still wait in storage,
        so local sends do not take the fast path (they would overtake them:
        the simulator found a sender's second message running before its
        first after a failover)."""
        self._nursery: trio.Nursery | None = None
        self.closing = False
        self.delivered = 0
        self.claims = 0

    # ------------------------------------------------------------------
    # Service

    async def run(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Run the batchers, the read loop and the notification loop until
        cancelled. Callers still waiting for a write then get `PersistenceError`,
        callers waiting for a reply `RunnerClosedError`."""
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._saves.run)
                nursery.start_soon(self._replies.run)
                nursery.start_soon(self._read_loop)
                nursery.start_soon(self._notification_loop)
                nursery.start_soon(self._reply_poll_loop)
                task_status.started()
        finally:
            self._release_waiters()

    def _release_waiters(self) -> None:
        """The runner stops: wake the callers still waiting for a reply (they
        waited forever: found by the simulator's failover example). Their
        requests stay stored and are still answered."""
        from ._routing import RunnerClosedError

        for waiters in self._waiters.values():
            for waiter in waiters:
                waiter.exit = Exit(
                    error=RunnerClosedError(
                        "the runner shut down while the call waited for its"
                        " reply; the request is stored and will be answered"
                        " (send it again, with its primary key, for the reply)"
                    )
                )
                waiter.event.set()
        self._waiters.clear()

    @property
    def statistics(self) -> dict[str, int]:
        return {
            "save_batches": self._saves.batches,
            "saved": self._saves.items,
            "reply_batches": self._replies.batches,
            "replies": self._replies.items,
            "claims": self.claims,
            "waiting_callers": sum(len(w) for w in self._waiters.values()),
        }

    def nudge(self, deliver_at: float | None = None) -> None:
        """Wake the read loop (now, or at ``deliver_at`` wall time)."""
        if deliver_at is not None:
            self._next_deliver_at = min(self._next_deliver_at, deliver_at)
        self._wake.set()

    def shard_started(self, host: ShardHost) -> None:
        self.nudge()

    async def _flush_saves(self, items: Sequence[PersistedRequest]) -> list[SaveResult]:
        return await self._storage.save_requests(items, now=self._clock.now())

    async def _flush_replies(self, items: Sequence[ReplyRecord]) -> list[ReplyOutcome]:
        return await self._storage.save_replies(items, now=self._clock.now())

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
    ) -> Any:
        """Send a persisted request (see the module docstring) and, unless
        ``discard``, wait for its reply.

        Raises:
            MalformedMessageError, MessageTooLargeError: the message cannot be stored.
            PersistenceError: storage failed before the request was stored.
            RequestInterruptedError: the request (attached by primary key) was
                interrupted by its original sender.
        """
        spec = handler.spec
        payload = handler.message.encode(message)
        if len(payload) > self._config.max_message_size:
            raise MessageTooLargeError(
                size=len(payload), limit=self._config.max_message_size
            )
        primary_key = _primary_key(handler, message)
        deliver_at = _deliver_at(handler, message)
        now = self._clock.now()
        request_id = self._ids.next_id(int(now * 1000))
        host = self._sharding.host(address.shard)
        deliverable = deliver_at is None or deliver_at <= now
        request = PersistedRequest(
            request_id=request_id,
            address=address,
            tag=spec.name,
            payload=payload,
            primary_key=primary_key,
            deliver_at=deliver_at,
            claim_epoch=(
                host.epoch
                if host is not None
                and deliverable
                and self._caught_up.get(address.shard) == host.epoch
                else None
            ),
        )
        waiter = None if discard else self._register(request_id)
        try:
            result = await self._saves.submit(request)
        except BaseException:
            if waiter is not None:
                self._unregister(request_id, waiter)
            raise
        if result.duplicate:
            if waiter is not None:
                self._unregister(request_id, waiter)
            if discard:
                return None
            if result.final_reply is not None:
                return handler.reply.decode_exit(
                    result.final_reply, request_id=result.request_id
                ).unwrap()
            original = self._register(result.request_id)
            return await self._wait(
                handler, result.request_id, original, interrupt=False
            )
        if result.claimed and host is not None:
            local_message = (
                handler.message.decode(payload) if self._serialize else message
            )
            self._deliver(
                host, address, entity_type, handler, local_message, request_id
            )
        else:
            self._notice_owner(address, request_id, not discard, deliver_at)
        if waiter is None:
            return None
        return await self._wait(handler, request_id, waiter, interrupt=True)

    def _register(self, request_id: int) -> _Waiter:
        waiter = _Waiter()
        self._waiters.setdefault(request_id, []).append(waiter)
        return waiter

    def _unregister(self, request_id: int, waiter: _Waiter) -> None:
        waiters = self._waiters.get(request_id)
        if waiters is not None:
            if waiter in waiters:
                waiters.remove(waiter)
            if not waiters:
                del self._waiters[request_id]

    async def _wait(
        self, handler: Handler, request_id: int, waiter: _Waiter, *, interrupt: bool
    ) -> Any:
        try:
            await waiter.event.wait()
        except BaseException:
            self._unregister(request_id, waiter)
            if interrupt and not self.closing:
                with trio.CancelScope(shield=True):
                    await self._interrupt(request_id)
            raise
        if waiter.exit is not None and (not self._serialize or waiter.payload is None):
            return waiter.exit.unwrap()
        assert waiter.payload is not None
        return handler.reply.decode_exit(waiter.payload, request_id=request_id).unwrap()

    async def _interrupt(self, request_id: int) -> None:
        self._manager.interrupt(request_id)
        with trio.move_on_after(self._config.lease_refresh_interval) as scope:
            try:
                await self._storage.interrupt([request_id])
            except PersistenceError as exc:
                log.warning(
                    "could not store the interruption of request %d: %s",
                    request_id,
                    exc,
                )
        if scope.cancelled_caught:
            log.warning("storing the interruption of request %d timed out", request_id)

    def _resolve(self, request_id: int, payload: bytes, exit_: Exit | None) -> None:
        for waiter in self._waiters.pop(request_id, ()):
            waiter.payload = payload
            waiter.exit = exit_
            waiter.event.set()
        peer = self._reply_to.pop(request_id, None)
        if peer is not None:
            self._send(peer, [Kind.PERSISTED_REPLY, request_id, payload])

    # ------------------------------------------------------------------
    # Other runners (direct notices and replies; storage is the fallback)

    def _send(self, peer: RunnerAddress, envelope: list[Any]) -> bool:
        if self.endpoint is None:
            return False
        try:
            self.endpoint.send_nowait(peer, envelope)
        except RunnerUnavailableError as exc:
            log.debug("could not notify %s directly (storage will): %s", peer, exc)
            return False
        return True

    def _notice_owner(
        self,
        address: EntityAddress,
        request_id: int,
        wants_reply: bool,
        deliver_at: float | None,
    ) -> None:
        """A request was stored unclaimed: tell its owner (directly if it is
        another runner, so it claims now), else wake the local read loop."""
        owner = self._sharding.assignment.get(address.shard)
        if owner is None or owner == self._sharding.address or deliver_at is not None:
            self.nudge(deliver_at)
            return
        self._send(
            owner, [Kind.PERSISTED, request_id, *address_fields(address), wants_reply]
        )

    def remote_notice(
        self, request_id: int, address: EntityAddress, reply_to: RunnerAddress | None
    ) -> None:
        """Another runner stored ``request_id`` for a shard served here."""
        if reply_to is not None:
            if len(self._reply_to) >= _MAX_REPLY_TO:
                del self._reply_to[next(iter(self._reply_to))]  # forget the oldest
            self._reply_to[request_id] = reply_to
        if address.shard in self._sharding.hosts:
            self.nudge()

    def remote_reply(self, request_id: int, payload: bytes) -> None:
        """The owner sent the final reply of a request sent from here."""
        self._resolve(request_id, payload, None)

    # ------------------------------------------------------------------
    # Delivering

    def _deliver(
        self,
        host: ShardHost,
        address: EntityAddress,
        entity_type: EntityType,
        handler: Handler,
        message: Any,
        request_id: int,
    ) -> None:
        if request_id in self._manager.persisted_jobs:
            return
        try:
            self._manager.submit(
                host,
                address,
                entity_type,
                handler,
                message,
                request_id=request_id,
                sink=self._record,
                force=True,
                around=self._in_transaction if handler.spec.transactional else None,
            )
        except NotDelivered:
            self.nudge()  # the shard is stopping: its next owner claims it again
        else:
            self.delivered += 1

    def _deliver_claimed(self, request: ClaimedRequest) -> None:
        host = self._sharding.host(request.address.shard)
        if host is None or host.epoch != request.epoch:
            return
        if request.request_id in self._manager.persisted_jobs:
            return
        entity_type = self._registry.get(request.address.entity_type)
        handler = None if entity_type is None else entity_type.handlers.get(request.tag)
        if entity_type is None or handler is None:
            error = UnknownEntityTypeError(
                entity_type=request.address.entity_type,
                handler=None if entity_type is None else request.tag,
            )
            log.error("cannot deliver request %d: %s", request.request_id, error)
            self._record_soon(
                host,
                request.request_id,
                self._registry.generic_reply.encode_error(error),
            )
            return
        if request.interrupted:
            self._record_soon(
                host, request.request_id, handler.reply.encode_interrupted()
            )
            return
        if request.stream:
            error = UnknownEntityTypeError(
                entity_type=entity_type.name, handler=request.tag
            )
            self._record_soon(
                host, request.request_id, handler.reply.encode_error(error)
            )
            return
        try:
            message = handler.message.decode(request.payload)
        except MalformedMessageError as exc:
            log.error(
                "request %d to %s is malformed: %s",
                request.request_id,
                request.address,
                exc,
            )
            self._record_soon(host, request.request_id, handler.reply.encode_error(exc))
            return
        self._deliver(
            host, request.address, entity_type, handler, message, request.request_id
        )

    async def _in_transaction(
        self, job: Job, execute: Callable[[], Awaitable[Exit]]
    ) -> Exit | None:
        """`Around` of transactional handlers: run the handler in a storage
        transaction and record its reply in the same transaction. A value or
        a declared error commits; anything else rolls back and is returned
        for the sink to record (or replay) as usual.

        Raises:
            RetryLater: storage failed (to open or commit the transaction, or
                under the handler's own statements: `StorageTransaction.failure`);
                nothing was recorded, and the request runs again.
        """
        assert job.request_id is not None
        assert job.slot is not None
        host = job.slot.shard
        handler = job.handler
        duplicate = False
        try:
            async with self._storage.open_transaction() as transaction:
                token = current_transaction_var.set(transaction)
                try:
                    exit_ = await execute()
                finally:
                    current_transaction_var.reset(token)
                if is_marker(exit_):
                    raise _Rollback(exit_)
                failure = transaction.failure
                if failure is not None:
                    # Storage failed under the handler's own statements
                    # (whatever the handler made of the error): as after a
                    # failed commit, record nothing and run it again, rather
                    # than keep that error as its reply for good.
                    raise RetryLater(str(failure)) from failure
                if not _commits(handler, exit_):
                    raise _Rollback(exit_)
                try:
                    payload = handler.reply.encode_exit(exit_)
                except MalformedMessageError as exc:  # the reply cannot travel
                    raise _Rollback(Exit(error=exc)) from exc
                record = ReplyRecord(
                    request_id=job.request_id,
                    shard=host.shard_id,
                    epoch=host.epoch,
                    payload=payload,
                )
                [outcome] = await self._storage.save_replies(
                    [record], now=self._clock.now(), transaction=transaction
                )
                if outcome is ReplyOutcome.STALE_EPOCH:
                    log.warning(
                        "reply to %d refused: shard %s moved on; rolled back",
                        job.request_id,
                        host.shard_id,
                    )
                    raise _Rollback(None)
                if outcome is ReplyOutcome.DUPLICATE:
                    # Answered already, by an earlier run whose commit seemed
                    # to fail (its outcome was unknown): keep that reply, and
                    # not this run's writes (they would apply twice).
                    duplicate = True
                    raise _Rollback(None)
        except _Rollback as rollback:
            if duplicate:
                await self._fetch_final([job.request_id])
                self._wake_if_starved()
            return rollback.exit
        except PersistenceError as exc:
            raise RetryLater(str(exc)) from exc
        self._resolve(job.request_id, payload, exit_)
        self._wake_if_starved()
        return None

    async def _record(self, job: Job, exit_: Exit | None) -> None:
        """Sink of persisted jobs: record the final reply, then wake waiters."""
        if exit_ is None or job.request_id is None or job.slot is None:
            return  # not run here: the next owner redelivers it
        handler = job.handler
        try:
            payload = handler.reply.encode_exit(exit_)
        except MalformedMessageError as exc:
            exit_ = Exit(error=exc)
            payload = handler.reply.encode_error(exc)
        await self._record_payload(job.slot.shard, job.request_id, payload, exit_)

    def _record_soon(self, host: ShardHost, request_id: int, payload: bytes) -> None:
        assert self._nursery is not None
        self._nursery.start_soon(self._record_payload, host, request_id, payload, None)

    async def _record_payload(
        self, host: ShardHost, request_id: int, payload: bytes, exit_: Exit | None
    ) -> None:
        record = ReplyRecord(
            request_id=request_id,
            shard=host.shard_id,
            epoch=host.epoch,
            payload=payload,
        )
        # Our own reply's notification may arrive before the write returns:
        # the notification loop leaves it to us (see `_notification_loop`).
        self._recording[request_id] = False
        try:
            outcome = await self._submit_reply(host, record)
        finally:
            notified = self._recording.pop(request_id, False)
        if outcome is ReplyOutcome.DUPLICATE:
            await self._fetch_final([request_id])
        elif outcome is None or outcome is ReplyOutcome.STALE_EPOCH:
            if notified and request_id in self._waiters:
                await self._fetch_final([request_id])  # recorded by another runner
        else:
            self._resolve(request_id, payload, exit_)
        self._wake_if_starved()

    async def _submit_reply(
        self, host: ShardHost, record: ReplyRecord
    ) -> ReplyOutcome | None:
        """Record ``record`` (group commit), retrying storage failures while
        the shard is served; None if it gave up (the request is redelivered)."""
        delay = 0.05
        while True:
            try:
                outcome = await self._replies.submit(record)
            except PersistenceError as exc:
                if not host.active or self.closing:
                    log.warning(
                        "reply to %d not recorded (%s); it will be redelivered",
                        record.request_id,
                        exc,
                    )
                    return None
                log.warning(
                    "recording reply to %d failed, retrying: %s",
                    record.request_id,
                    exc,
                )
                await trio.sleep(delay)
                delay = min(delay * 2, self._config.lease_refresh_interval)
                continue
            if outcome is ReplyOutcome.STALE_EPOCH:
                log.warning(
                    "reply to %d refused: shard %s moved on (fencing)",
                    record.request_id,
                    host.shard_id,
                )
            return outcome

    def _wake_if_starved(self) -> None:
        if self._starved:
            self._wake.set()

    # ------------------------------------------------------------------
    # Loops

    async def _read_loop(self) -> None:
        poll = self._config.storage_poll_interval
        while True:
            self._wake = trio.Event()
            shards = self._sharding.serving_epochs()
            budget = self._config.max_persisted_in_flight - len(
                self._manager.persisted_jobs
            )
            self._starved = bool(shards) and budget <= 0
            if shards and budget > 0:
                self._next_deliver_at = math.inf
                try:
                    with trio.fail_after(self._config.lease_refresh_interval):
                        batch = await self._storage.claim(
                            shards,
                            now=self._clock.now() + _FLOAT_TOLERANCE,
                            limit=min(self._config.persisted_batch_size, budget),
                        )
                except (PersistenceError, trio.TooSlowError) as exc:
                    log.warning("claiming persisted messages failed: %r", exc)
                    await trio.sleep(min(1.0, poll))
                    continue
                self.claims += 1
                if not batch.more:
                    for shard, epoch in shards.items():
                        if shard not in batch.stale_shards:
                            self._caught_up[shard] = epoch
                for request in batch.requests:
                    self._deliver_claimed(request)
                if batch.next_deliver_at is not None:
                    self._next_deliver_at = min(
                        self._next_deliver_at, batch.next_deliver_at
                    )
                if batch.more:
                    await trio.lowlevel.checkpoint()
                    continue
            timeout = poll
            if self._next_deliver_at != math.inf:
                timeout = min(
                    timeout, max(0.0, self._next_deliver_at - self._clock.now())
                )
            with trio.move_on_after(timeout):
                await self._wake.wait()

    async def _notification_loop(self) -> None:
        served = self._sharding.hosts
        while True:
            try:
                notifications = await self._storage.wait_notifications()
            except PersistenceError as exc:
                log.warning("storage notifications failed: %r", exc)
                await trio.sleep(min(1.0, self._config.storage_poll_interval))
                continue
            replies: set[int] = set()
            for note in notifications:
                if isinstance(note, MessagesAvailable):
                    if any(shard in served for shard in note.shards):
                        self.nudge(note.deliver_at)
                elif isinstance(note, RepliesAvailable):
                    for rid in note.request_ids:
                        if rid in self._recording:
                            self._recording[rid] = True
                        elif rid in self._waiters:
                            replies.add(rid)
                elif isinstance(note, RequestsInterrupted):
                    for request_id in note.request_ids:
                        self._manager.interrupt(request_id)
            if replies:
                await self._fetch_final(sorted(replies))

    async def _reply_poll_loop(self) -> None:
        while True:
            await trio.sleep(self._config.storage_poll_interval)
            remote = [
                rid for rid in self._waiters if rid not in self._manager.persisted_jobs
            ]
            if remote:
                await self._fetch_final(remote)

    async def _fetch_final(self, request_ids: Sequence[int]) -> None:
        try:
            with trio.fail_after(self._config.lease_refresh_interval):
                stored = await self._storage.replies_for(
                    [ReplyQuery(rid) for rid in request_ids]
                )
        except (PersistenceError, trio.TooSlowError) as exc:
            log.warning("fetching replies failed: %r", exc)
            return
        for replies in stored:
            if replies.final is not None:
                self._resolve(replies.request_id, replies.final, None)


def _primary_key(handler: Handler, message: Any) -> str | None:
    function = handler.spec.primary_key
    if function is None:
        return None
    key: object = function(message)
    if not isinstance(key, str) or not key:
        raise EntityDefinitionError(
            f"{handler.what}: primary_key must return a non-empty str, got {key!r}"
        )
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


class _Rollback(Exception):
    """Leave a transaction without committing; carries the outcome to record."""

    def __init__(self, exit_: Exit | None) -> None:
        super().__init__("rollback")
        self.exit = exit_


def _commits(handler: Handler, exit_: Exit) -> bool:
    """A transactional handler's writes commit with a value or a declared error."""
    return exit_.error is None or handler.reply.is_declared(exit_.error)
