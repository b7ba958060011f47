"""Recording the final replies of persisted requests (Trio driver).

A persisted job's outcome is encoded and saved fenced by its shard's epoch
(group commit, `Batcher`): a runner that lost the shard cannot record a reply
any more (`ReplyOutcome.STALE_EPOCH`), and a second reply to the same request
is refused (`ReplyOutcome.DUPLICATE`: the first one stands and is fetched).
Storage failures are retried with a backoff while the shard is served; then
the request is left stored for its next owner to deliver again. A reply
storage refuses for its data (`refused`: it would be refused again) is not
retried: the `MalformedMessageError` that says so is recorded instead. The
recorded reply wakes the callers waiting in this process (`ReplyWaiters`).

Transactional handlers run inside a storage transaction (`in_transaction`,
the jobs' `Around`), and their reply is saved in that same transaction: the
handler's writes and its reply commit together, or neither does. So does
the durable state of its entity (`_durable_state`), saved after the reply.
"""

from __future__ import annotations

import logging
from functools import partial
from typing import TYPE_CHECKING

import attrs
import trio

from .._context import current_transaction_var
from .._core._retry import Backoff
from .._errors import MalformedMessageError, PersistenceError
from .._storage_abc import ReplyOutcome, ReplyQuery, ReplyRecord
from ..serialization._replies import Exit
from ._batching import Batcher, Pending, refused
from ._durable_state import StateRefused
from ._outcomes import RetryLater

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Sequence

    from .._durable import PendingSave, StateWriter
    from .._registry import Handler
    from .._storage_abc import StorageTransaction
    from ._attempts import Attempts
    from ._delivery import DeliveryParts
    from ._outcomes import Outcome
    from ._slots import EntityStates, Job, ShardHost

__all__ = ["ReplyRecorder"]

log = logging.getLogger("trio_cluster.persisted")

_MAX_BATCH = 1024


class ReplyRecorder:
    """Records final replies and fetches those recorded elsewhere.

    Args:
        parts: the storage replies are saved in, the retry cap
            (``config.lease_refresh_interval``), the wall clock of the records,
            the waiters woken by each final reply, and the read loop's signal
            (a recorded reply may free budget for it).
    """

    def __init__(self, parts: DeliveryParts, attempts: Attempts) -> None:
        self._parts = parts
        self._attempts = attempts
        self._backoff = Backoff(0.05, parts.config.lease_refresh_interval)
        self._batcher: Batcher[ReplyRecord, ReplyOutcome] = Batcher(
            self._flush, max_batch=_MAX_BATCH, name="recording replies"
        )
        self.recording: dict[int, bool] = {}
        """Requests whose reply this runner is recording -> whether a
        `RepliesAvailable` for them arrived meanwhile."""
        self.closing = False
        """The runner shuts down: give up instead of retrying."""
        self._nursery: trio.Nursery | None = None

    @property
    def batches(self) -> int:
        return self._batcher.batches

    @property
    def recorded(self) -> int:
        return self._batcher.items

    @property
    def written_here(self) -> int:
        """Replies written by their callers' tasks (see `Batcher`)."""
        return self._batcher.written_here

    async def run(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Run the group commit, and the tasks of `record_soon`, until
        cancelled."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            nursery.start_soon(self._batcher.run)
            task_status.started()

    async def _flush(self, items: Sequence[ReplyRecord]) -> list[ReplyOutcome]:
        return await self._parts.storage.save_replies(
            items, now=self._parts.clock.now()
        )

    async def record(self, job: Job, exit_: Exit | None) -> None:
        """Sink of persisted jobs: record the final reply, then wake waiters;
        or, for a handler that failed with attempts left, give the request
        back for its next attempt (`Attempts`)."""
        if exit_ is None or job.request_id is None:
            return  # not run here: the next owner redelivers it
        dead_letter = None
        if exit_.failure is not None:
            decision = self._attempts.after_failure(job, exit_)
            if not isinstance(decision, tuple):
                await self._attempts.retry_later(job.slot.shard, job, exit_, decision)
                return
            exit_, dead_letter = decision
        payload, exit_ = _encoded(job.handler, exit_)
        await self._record_payload(
            job.slot.shard, job.request_id, payload, exit_, dead_letter=dead_letter
        )

    async def record_here(self, job: Job, exit_: Exit) -> None:
        """`record`, in the current task rather than a sink's task of its own
        (a job run by its caller: `EntityManager.run_here`).

        If the current task is cancelled while the reply is being written,
        the recording goes on in a task of its own (as `record_soon`), for
        the same write: the reply is not lost, nor written twice. The
        cancellation then propagates.
        """
        assert job.request_id is not None
        request_id, host = job.request_id, job.slot.shard
        dead_letter = None
        if exit_.failure is not None:
            decision = self._attempts.after_failure(job, exit_)
            if not isinstance(decision, tuple):
                # In a task of its own: the caller waits for the final reply
                # of the next attempt as usual, and its cancellation cannot
                # cut the write.
                assert self._nursery is not None, "ReplyRecorder.run has started"
                self._nursery.start_soon(
                    self._attempts.retry_later, host, job, exit_, decision
                )
                await trio.lowlevel.checkpoint()
                return
            exit_, dead_letter = decision
        payload, exit_ = _encoded(job.handler, exit_)
        # Without a primary key only its caller here waits: nobody else can
        # know the request (`ReplyRecord.notify`); a retry notifies anyway.
        record = _reply_record(
            host,
            request_id,
            payload,
            dead_letter,
            notify=job.handler.spec.primary_key is not None,
        )
        self.recording.setdefault(request_id, False)  # see `_record_payload`
        pending: Pending[ReplyRecord, ReplyOutcome] | None = None
        try:
            # Its caller's the only call waiting: written here, at once (no
            # burst of replies to wait for: see `Batcher`).
            here = len(self._parts.waiters) <= 1
            pending = self._batcher.enqueue(record, here=here)
            await self._batcher.wait_written(pending, others_first=False)
        except PersistenceError:
            pass  # shutting down: `_record_payload` says what becomes of it
        except BaseException:
            # Cancelled: another task waits for this very write.
            try:
                self.record_soon(
                    host, request_id, payload, exit_, pending, dead_letter=dead_letter
                )
            except RuntimeError:  # shutting down: the next owner redelivers
                self.recording.pop(request_id, None)
            raise
        await self._record_payload(
            host, request_id, payload, exit_, pending, dead_letter=dead_letter
        )

    def record_soon(
        self,
        host: ShardHost,
        request_id: int,
        payload: bytes,
        exit_: Exit | None = None,
        pending: Pending[ReplyRecord, ReplyOutcome] | None = None,
        *,
        dead_letter: str | None = None,
    ) -> None:
        """Record an encoded final reply in a task of its own (``pending``:
        its write, queued already; ``dead_letter``: see `ReplyRecord`)."""
        assert self._nursery is not None, "ReplyRecorder.run has started"
        self._nursery.start_soon(
            partial(
                self._record_payload,
                host,
                request_id,
                payload,
                exit_,
                pending,
                dead_letter=dead_letter,
            )
        )

    async def _record_payload(
        self,
        host: ShardHost,
        request_id: int,
        payload: bytes,
        exit_: Exit | None,
        pending: Pending[ReplyRecord, ReplyOutcome] | None = None,
        *,
        dead_letter: str | None = None,
    ) -> None:
        record = _reply_record(host, request_id, payload, dead_letter)
        # Our own reply's notification may arrive before the write returns:
        # the notification loop leaves it to us (see `_notices`).
        self.recording.setdefault(request_id, False)
        try:
            outcome, written = await self._submit(host, record, pending)
        finally:
            notified = self.recording.pop(request_id, False)
        if written is not record:  # storage refused it: the error went instead
            payload, exit_ = written.payload, None
        if outcome is ReplyOutcome.DUPLICATE:
            await self.fetch_final([request_id])
        elif outcome is None or outcome is ReplyOutcome.STALE_EPOCH:
            if notified and request_id in self._parts.waiters:
                await self.fetch_final([request_id])  # recorded by another runner
        else:
            self._parts.waiters.resolve(request_id, payload, exit_)
        self._parts.signal.wake_if_starved()

    async def _submit(
        self,
        host: ShardHost,
        record: ReplyRecord,
        pending: Pending[ReplyRecord, ReplyOutcome] | None = None,
    ) -> tuple[ReplyOutcome | None, ReplyRecord]:
        """Record ``record`` (group commit), retrying storage failures while
        the shard is served. Returns the outcome (None if it gave up: the
        request is redelivered) and the record written: a reply storage
        refuses for its data (`refused`) is replaced, once, by the
        `MalformedMessageError` that says so, rather than retried forever.
        ``pending``: the first attempt, queued already (maybe done).
        """
        attempt = 0
        written = record
        while True:
            try:
                if pending is None:
                    outcome = await self._batcher.submit(written)
                else:
                    first, pending = pending, None
                    if not first.done.is_set():
                        await first.done.wait()
                    outcome = self._batcher.result(first)
            except Exception as exc:
                if refused(exc):
                    if written is not record:
                        log.error(
                            "storage refused the error reply to %d too: %s",
                            record.request_id,
                            exc,
                        )
                        return None, written
                    log.error(
                        "storage refused the reply to %d: %s", record.request_id, exc
                    )
                    written = attrs.evolve(record, payload=self._refused_reply(exc))
                    continue
                if not isinstance(exc, PersistenceError):
                    raise
                if not host.active or self.closing:
                    log.warning(
                        "reply to %d not recorded (%s); it will be redelivered",
                        record.request_id,
                        exc,
                    )
                    return None, written
                log.warning(
                    "recording reply to %d failed, retrying: %s",
                    record.request_id,
                    exc,
                )
                await trio.sleep(self._backoff.delay(attempt))
                attempt += 1
                continue
            if outcome is ReplyOutcome.STALE_EPOCH:
                log.warning(
                    "reply to %d refused: shard %s moved on (fencing)",
                    record.request_id,
                    host.shard_id,
                )
            return outcome, written

    def _refused_reply(self, exc: Exception) -> bytes:
        """The final reply that says storage refused a request's own."""
        return self._parts.registry.generic_reply.encode_error(_refusal(exc))

    async def fetch_final(self, request_ids: Sequence[int]) -> None:
        """Fetch the stored final replies of ``request_ids`` and wake their
        waiters (failures are logged: polling tries again)."""
        try:
            with trio.fail_after(self._parts.config.lease_refresh_interval):
                stored = await self._parts.storage.replies_for(
                    [ReplyQuery(rid) for rid in request_ids]
                )
        except (PersistenceError, trio.TooSlowError) as exc:
            log.warning("fetching replies failed: %r", exc)
            return
        for replies in stored:
            if replies.final is not None:
                self._parts.waiters.resolve(replies.request_id, replies.final, None)

    # ------------------------------------------------------------------
    # Transactional handlers

    async def in_transaction(
        self, job: Job, execute: Callable[[], Awaitable[Outcome]]
    ) -> Outcome | None:
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
        slot = job.slot
        # Durable entity state (`_durable_state`): the handler may change it,
        # and it is saved in the transaction, after the reply.
        states = slot.shard.states if slot.entity_type.durable is not None else None
        writer = saved = None
        committed = False
        try:
            async with self._parts.storage.open_transaction() as transaction:
                token = current_transaction_var.set(transaction)
                try:
                    if states is None:
                        outcome = await execute()
                    else:
                        with states.writing(slot) as writer:
                            outcome = await execute()
                finally:
                    current_transaction_var.reset(token)
                if not isinstance(outcome, Exit):
                    raise _Rollback(outcome)  # replayed, or not run here
                failure = transaction.failure
                if failure is not None:
                    # Storage failed under the handler's own statements
                    # (whatever the handler made of the error): as after a
                    # failed commit, record nothing and run it again, rather
                    # than keep that error as its reply for good.
                    raise RetryLater(str(failure)) from failure
                payload = _committed_reply(job.handler, outcome)
                await self._save_in(transaction, job, payload)
                if states is not None and writer is not None:
                    saved = await self._save_state_in(states, transaction, job, writer)
            committed = True
        except _Rollback as rollback:
            if rollback.duplicate:
                await self.fetch_final([job.request_id])
                self._parts.signal.wake_if_starved()
            return rollback.outcome
        except PersistenceError as exc:
            raise RetryLater(str(exc)) from exc
        finally:
            if states is not None and writer is not None:
                states.settle(slot, writer, saved, committed)
        self._parts.waiters.resolve(job.request_id, payload, outcome)
        self._parts.signal.wake_if_starved()
        return None

    async def _save_state_in(
        self,
        states: EntityStates,
        transaction: StorageTransaction,
        job: Job,
        writer: StateWriter,
    ) -> PendingSave | None:
        """Save ``job``'s entity's durable state in ``transaction`` (see
        `StateKeeper.save_in`).

        Raises:
            _Rollback: the write was refused by fencing (record nothing), or
                the state does not encode or storage refused it for its data
                (record that error instead).
            RetryLater: the stored state is newer than the entity's.
        """
        try:
            return await states.save_in(transaction, job.slot, writer)
        except StateRefused:
            raise _Rollback(None) from None
        except MalformedMessageError as exc:
            log.error("state of %s cannot be saved: %s", job.slot.address, exc)
            raise _Rollback(Exit(error=exc)) from exc
        except Exception as exc:
            if not refused(exc):
                raise
            # Storage refused the state for its data: running the handler
            # again would be refused again. Roll back, and record the error
            # that says so instead (outside the transaction), as for a reply.
            log.error("storage refused the state of %s: %s", job.slot.address, exc)
            raise _Rollback(Exit(error=_refusal(exc, "state"))) from exc

    async def _save_in(
        self, transaction: StorageTransaction, job: Job, payload: bytes
    ) -> None:
        """Save ``job``'s reply in ``transaction``.

        Raises:
            _Rollback: the reply was refused (fencing, a duplicate, or storage
                refused its data); roll back.
        """
        assert job.request_id is not None
        host = job.slot.shard
        record = _reply_record(host, job.request_id, payload)
        try:
            [outcome] = await self._parts.storage.save_replies(
                [record], now=self._parts.clock.now(), transaction=transaction
            )
        except Exception as exc:
            if not refused(exc):
                raise
            # Running it again would be refused again: roll back, and record
            # the error that says so instead (outside the transaction).
            log.error("storage refused the reply to %d: %s", job.request_id, exc)
            raise _Rollback(Exit(error=_refusal(exc))) from exc
        if outcome is ReplyOutcome.STALE_EPOCH:
            log.warning(
                "reply to %d refused: shard %s moved on; rolled back",
                job.request_id,
                host.shard_id,
            )
            raise _Rollback(None)
        if outcome is ReplyOutcome.DUPLICATE:
            # Answered already, by an earlier run whose commit seemed to fail
            # (its outcome was unknown): keep that reply, and not this run's
            # writes (they would apply twice).
            raise _Rollback(None, duplicate=True)


def _encoded(handler: Handler, exit_: Exit) -> tuple[bytes, Exit]:
    """``exit_`` encoded as a final reply, and the exit that stands for it
    (the `MalformedMessageError` that says it could not be encoded, if so)."""
    try:
        return handler.reply.encode_exit(exit_), exit_
    except MalformedMessageError as exc:
        return handler.reply.encode_error(exc), Exit(error=exc)


class _Rollback(Exception):
    """Leave a transaction without committing; carries the outcome to hand
    back to the manager (None: nothing more to do)."""

    def __init__(self, outcome: Outcome | None, *, duplicate: bool = False) -> None:
        super().__init__("rollback")
        self.outcome = outcome
        self.duplicate = duplicate
        """The request was answered already: fetch that reply."""


def _committed_reply(handler: Handler, exit_: Exit) -> bytes:
    """The encoded reply of a transactional handler whose writes commit: with
    a value or a declared error.

    Raises:
        _Rollback: anything else; roll back and hand the outcome on.
    """
    if exit_.error is not None and not handler.reply.is_declared(exit_.error):
        raise _Rollback(exit_)
    try:
        return handler.reply.encode_exit(exit_)
    except MalformedMessageError as exc:  # the reply cannot travel
        raise _Rollback(Exit(error=exc)) from exc


def _refusal(exc: Exception, what: str = "reply") -> MalformedMessageError:
    """The error that replaces a reply (or ``what``) storage refused
    (``exc``)."""
    return MalformedMessageError(
        what=what, problems=[f"storage refused to store it: {exc}"]
    )


def _reply_record(
    host: ShardHost,
    request_id: int,
    payload: bytes,
    dead_letter: str | None = None,
    *,
    notify: bool = True,
) -> ReplyRecord:
    """The final reply ``payload`` to ``request_id``, fenced by ``host``'s
    epoch (``dead_letter``, ``notify``: see `ReplyRecord`)."""
    return ReplyRecord(
        request_id=request_id,
        shard=host.shard_id,
        epoch=host.epoch,
        payload=payload,
        dead_letter=dead_letter,
        notify=notify,
    )
