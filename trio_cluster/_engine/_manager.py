"""The entity manager: entities, their mailboxes and handler execution (Trio driver).

Theory of operation:

* An entity is a `Slot` in its shard's table. It is created when the first
  message arrives; its incarnation (the user's object) is created and
  ``on_start`` runs when the first handler is about to run.
* A message becomes a `Job` offered to the slot's mailbox (FIFO, bounded,
  ``concurrency`` permits). A job that gets a permit runs:

  - *inline*, when a caller in this process is waiting for it: the handler
    runs in the caller's own task. No task switch, no task spawn: this is the
    fast path of local calls;
  - *detached*, in a task of the shard's nursery, when nobody waits here
    (``discard``, persisted deliveries, requests from other runners).

* Every running handler is inside a cancel scope registered with its shard;
  detached ones also run in the shard's nursery, whose deadline is the lease
  deadline. When that deadline passes, the shard's cleanup cancels every
  registered scope at once (handlers in callers' tasks included), within the
  margin the lease keeps before the database could free the lock. Losing the
  lease, releasing the
  shard or shutting down cancels exactly those scopes and the shard's nursery.
* An undeclared exception crashes the incarnation: the caller gets
  `RemoteError`, the mailbox pauses, sibling handlers are cancelled (persisted
  ones are replayed), and the entity restarts after an exponential backoff.
* Idle entities are tracked by `IdleTracker` for passivation and the
  residency cap.
"""

from __future__ import annotations

import logging
from functools import partial
from typing import TYPE_CHECKING, Any, TypeVar, cast

import trio

from .._context import current_entity_var
from .._core._mailbox import Admission
from .._core._retry import Backoff
from .._errors import EntityNotAssignedError, MailboxFullError, RemoteError
from ..serialization._replies import Exit
from ._passivation import IdleTracker
from ._slots import (
    Around,
    Job,
    JobKind,
    JobState,
    ShardHost,
    ShardState,
    Sink,
    Slot,
    StopReason,
)
from ._streams import end_stream_nowait, run_stream

if TYPE_CHECKING:
    from collections.abc import Coroutine

    from .._core._addresses import EntityAddress
    from .._core._config import ShardingConfig
    from .._entity import Entity
    from .._registry import EntityType, Handler

__all__ = ["EntityManager", "NotDelivered", "RetryLater", "is_marker"]

log = logging.getLogger("trio_cluster.entity")

T = TypeVar("T")


class RetryLater(Exception):
    """Raised by a job's `Around` wrapper: its work could not be completed
    (e.g. a transaction failed to commit); run it again after a backoff. The
    cause is the ``__cause__``."""


def is_marker(exit_: Exit | None) -> bool:
    """Whether ``exit_`` is an internal marker (replay, not run), not an outcome."""
    return exit_ is _REQUEUE or exit_ is _NOT_RUN


class NotDelivered(Exception):
    """The message was not run here (shard not served, or stopped while it was
    queued). Safe to route again: the handler never started."""


_REQUEUE = Exit(value="__requeue__")
"""Marker outcome: a persisted job was interrupted by a restart; replay it."""

_NOT_RUN = Exit(value="__not_run__")
"""Marker outcome: a persisted job was cut short by its shard stopping. Record
nothing: it stays stored, and the shard's next owner delivers it again."""


def _type_name(exc: BaseException) -> str:
    cls = type(exc)
    return (
        cls.__qualname__
        if cls.__module__ == "builtins"
        else f"{cls.__module__}.{cls.__qualname__}"
    )


class EntityManager:
    """Runs the entities of the shards this runner serves."""

    def __init__(self, *, config: ShardingConfig, runner_label: str) -> None:
        self._serialize = config.serialize_local_calls
        self._termination_timeout = config.entity_termination_timeout
        self._cap = config.max_resident_entities
        self._backoff = Backoff(
            config.entity_restart_backoff, config.entity_restart_backoff_max
        )
        self.runner_label = runner_label
        self.idle = IdleTracker(self._passivate)
        self.persisted_jobs: dict[int, Job] = {}
        """Persisted requests in memory (queued or running), by request id."""
        self.resident = 0
        self.messages_handled = 0
        self.crashes = 0
        self.nursery: trio.Nursery | None = None
        """Runner-level nursery, for work that outlives a shard (sinks)."""

    # ------------------------------------------------------------------
    # Admission

    def _slot_for(
        self,
        shard: ShardHost,
        address: EntityAddress,
        entity_type: EntityType,
        *,
        force: bool,
    ) -> Slot:
        slot = shard.slots.get(address)
        if slot is not None:
            self.idle.remove(slot)
            return slot
        if (
            self._cap is not None
            and self.resident >= self._cap
            and not self.idle.evict_one(trio.current_time())
            and not force
        ):
            raise MailboxFullError(
                address=str(address),
                reason="runner at max_resident_entities, none idle",
            )
        slot = Slot(address, entity_type, shard)
        shard.slots[address] = slot
        self.resident += 1
        return slot

    async def call(
        self,
        shard: ShardHost,
        address: EntityAddress,
        entity_type: EntityType,
        handler: Handler,
        message: Any,
    ) -> Any:
        """Run a volatile request in the caller's task and return its value.

        Raises:
            NotDelivered: the shard is not served here (route again).
            MailboxFullError: the mailbox (or the runner) is full.
            RemoteError: the handler raised an undeclared exception.
            Exception: a declared error of the handler, as itself.

        Cancellation interrupts the handler (or withdraws the queued message).
        """
        await trio.lowlevel.checkpoint_if_cancelled()
        if not shard.active:
            raise NotDelivered(str(address))
        slot = self._slot_for(shard, address, entity_type, force=False)
        job = Job(handler, message, JobKind.INLINE)
        job.slot = slot
        admission = slot.offer(job)
        if admission is Admission.FULL:
            raise MailboxFullError(address=str(address))
        if admission is Admission.QUEUED:
            await self._wait_granted(slot, job)
        else:
            job.state = JobState.GRANTED
        try:
            exit_ = await self._execute(slot, job)
        finally:
            self._finish(slot, job)
        if exit_ is _NOT_RUN:
            raise NotDelivered(str(address))
        await trio.lowlevel.cancel_shielded_checkpoint()
        return exit_.unwrap()

    async def _wait_granted(self, slot: Slot, job: Job) -> None:
        job.granted = trio.Event()
        try:
            await job.granted.wait()
        except BaseException:
            if job.state is JobState.GRANTED:
                self._finish(slot, job)  # hand the permit on
            elif job.state is JobState.QUEUED:
                slot.remove(job)
                self._after_change(slot)
            raise
        if job.state is JobState.BOUNCED:
            raise NotDelivered(str(slot.address))

    def submit(
        self,
        shard: ShardHost,
        address: EntityAddress,
        entity_type: EntityType,
        handler: Handler,
        message: Any,
        *,
        kind: JobKind = JobKind.DETACHED,
        request_id: int | None = None,
        sink: Sink | None = None,
        force: bool = False,
        stream_channel: trio.MemorySendChannel[Any] | None = None,
        around: Around | None = None,
    ) -> Job:
        """Queue a job that runs without a waiting caller in this task.

        Persisted jobs (``request_id`` set on a persisted handler) are never
        refused for capacity and are remembered by request id.

        Raises:
            NotDelivered: the shard is not served here.
            MailboxFullError: the mailbox is full (volatile only).
        """
        if not shard.active:
            raise NotDelivered(str(address))
        slot = self._slot_for(shard, address, entity_type, force=force)
        job = Job(handler, message, kind, request_id=request_id, sink=sink)
        job.slot = slot
        job.stream_channel = stream_channel
        job.around = around
        admission = slot.offer(job, force=force)
        if admission is Admission.FULL:
            self._after_change(slot)
            raise MailboxFullError(address=str(address))
        if job.persisted:
            self.persisted_jobs[request_id] = job  # type: ignore[index]
        if admission is Admission.RUN:
            self._start(slot, job)
        return job

    def run_nowait(
        self,
        shard: ShardHost,
        address: EntityAddress,
        entity_type: EntityType,
        handler: Handler,
        message: Any,
    ) -> Exit | None:
        """Run a volatile request to completion now, in the calling code and
        without a task, when nothing can make it wait: the handler cannot
        suspend (nor ``on_start``, if the entity must start), and the entity
        is idle, not paused and not starting. The owner's fast path for
        requests from other runners: no task spawn, no task switch, and the
        reply can leave in the same scheduler tick.

        Returns:
            The outcome, or None if the request cannot run at once (then
            `submit` it; nothing happened).

        Raises:
            NotDelivered: the shard is not served here.
            MailboxFullError: the runner is at ``max_resident_entities``.
        """
        if not shard.active:
            raise NotDelivered(str(address))
        if handler.suspends:
            return None
        slot = shard.slots.get(address)
        if (slot is None or slot.instance is None) and entity_type.start_suspends:
            return None  # on_start would run, and it can suspend
        if slot is not None and (
            not slot.idle or slot.paused or slot.starting is not None
        ):
            return None
        slot = self._slot_for(shard, address, entity_type, force=False)
        job = Job(handler, message, JobKind.INLINE)
        job.slot = slot
        slot.offer(job)  # a permit: the slot is idle and not paused
        job.state = JobState.GRANTED
        try:
            return _run_to_completion(self._execute_in_one_step(slot, job))
        finally:
            self._finish(slot, job)

    def interrupt(self, request_id: int) -> bool:
        """Interrupt a persisted job in memory: withdraw it if queued (its sink
        gets an interrupted exit), cancel it if running. False if unknown."""
        job = self.persisted_jobs.get(request_id)
        if job is None:
            return False
        if job.state is JobState.QUEUED:
            slot = job.slot
            if slot is not None and slot.remove(job):
                job.state = JobState.DONE
                self.persisted_jobs.pop(request_id, None)
                self._after_change(slot)
                self._notify_sink(job, Exit(error=_interrupted(request_id)))
            return True
        if job.scope is not None:
            job.stop_reason = StopReason.INTERRUPTED
            job.scope.cancel()
        return True

    def cancel_job(self, job: Job) -> None:
        """Withdraw or cancel a job whose consumer went away (streams)."""
        if job.state is JobState.QUEUED:
            slot = job.slot
            if slot is not None and slot.remove(job):
                job.state = JobState.DONE
                self._after_change(slot)
        elif job.scope is not None:
            job.stop_reason = StopReason.INTERRUPTED
            job.scope.cancel()

    # ------------------------------------------------------------------
    # Execution

    def _start(self, slot: Slot, job: Job) -> None:
        job.state = JobState.GRANTED
        if job.kind is JobKind.INLINE:
            assert job.granted is not None
            job.granted.set()
            return
        nursery = slot.shard.nursery
        assert nursery is not None
        if job.kind is JobKind.STREAM:
            nursery.start_soon(run_stream, self, slot, job)
        else:
            nursery.start_soon(self._run_detached, slot, job)

    async def _run_detached(self, slot: Slot, job: Job) -> None:
        exit_: Exit | None = None
        retry = False
        try:
            if job.around is None:
                exit_ = await self._execute(slot, job)
            else:
                crashes = slot.crashes
                try:
                    exit_ = await job.around(job, partial(self._execute, slot, job))
                except RetryLater as failure:
                    # The handler may have succeeded (resetting the count)
                    # but its work was not kept: back off further each time.
                    slot.crashes = crashes
                    # If the shard stopped meanwhile (a storage outage often
                    # does both), the job is not requeued in its dead slot:
                    # the shard's next owner claims the request again.
                    retry = slot.shard.active
                    log.warning(
                        "%s for %s failed (%s); %s",
                        job.handler.what,
                        slot.address,
                        failure.__cause__ or failure,
                        "retrying after a backoff"
                        if retry
                        else "its shard stopped, so it is left for the next owner",
                    )
                    if retry:
                        if slot.paused:
                            # Already crashed in this run (the handler's own
                            # error, e.g. its statement met the failure), or
                            # by a sibling: its restart is on the way.
                            slot.crashes = crashes + 1
                        else:
                            self._crash(slot, job)
        finally:
            self._finish(slot, job, requeue=retry or exit_ is _REQUEUE)
        if not retry and exit_ is not _REQUEUE:
            self._notify_sink(job, None if exit_ is _NOT_RUN else exit_)

    def _notify_sink(self, job: Job, exit_: Exit | None) -> None:
        if job.sink is None:
            if exit_ is not None and exit_.error is not None:
                log.info(
                    "discarded message to %s failed: %s", job.handler.what, exit_.error
                )
            return
        pending = job.sink(job, exit_)
        if pending is not None:  # an async sink: run it in its own task
            assert self.nursery is not None, "the runner sets the manager's nursery"
            try:
                self.nursery.start_soon(_await, pending)
            except BaseException:
                pending.close()  # never started: not "never awaited"
                raise

    async def activate(self, slot: Slot) -> Entity:
        """Return the slot's incarnation, creating it (and running
        ``on_start``) if needed. Must run inside the caller's job scope."""
        while slot.starting is not None:
            await slot.starting.wait()
        if slot.instance is not None:
            return slot.instance
        event = slot.starting = trio.Event()
        try:
            instance = _new_instance(slot)
            if slot.entity_type.has_on_start:
                token = current_entity_var.set(instance)
                try:
                    await instance.on_start()
                finally:
                    current_entity_var.reset(token)
            slot.instance = instance
            return instance
        finally:
            slot.starting = None
            event.set()

    async def _execute(self, slot: Slot, job: Job) -> Exit:
        """Run one granted job. Returns its outcome; lets the caller's own
        cancellation propagate."""
        if not slot.shard.active:
            # Its shard stopped after the job got its permit (the simulator
            # found handlers starting on a runner that no longer served the
            # shard): it did not run; it is redelivered or routed again.
            return _NOT_RUN
        handler = job.handler
        if (
            not handler.suspends
            and not slot.paused
            and slot.starting is None
            and (slot.instance is not None or not slot.entity_type.start_suspends)
        ):
            return await self._execute_in_one_step(slot, job)
        shard = slot.shard
        scope = shard.start_handler(slot, job)
        starting = False
        try:
            with scope:
                if slot.paused and not slot.stopping:
                    job.stop_reason = StopReason.SIBLING_CRASHED
                    scope.cancel()
                    await trio.lowlevel.checkpoint()
                instance = slot.instance
                if instance is None:
                    starting = True
                    instance = await self.activate(slot)
                    starting = False
                token = current_entity_var.set(instance)
                try:
                    value = await handler.spec.fn(instance, job.message)
                finally:
                    current_entity_var.reset(token)
        except Exception as exc:
            return self._on_error(slot, job, exc, during_start=starting)
        finally:
            shard.finish_handler(slot, job, scope)

        if scope.cancelled_caught:
            return self._stopped(slot, job)
        return self._succeeded(slot, handler, value)

    async def _execute_in_one_step(self, slot: Slot, job: Job) -> Exit:
        """Run a job whose handler (and ``on_start``, if it must run) cannot
        suspend: it runs to completion without yielding, so nothing can
        interrupt it and it needs no cancel scope. This is the fast path of
        handlers that only update state."""
        handler = job.handler
        instance = slot.instance
        starting = instance is None
        try:
            if instance is None:
                instance = _new_instance(slot)
            token = current_entity_var.set(instance)
            try:
                if starting:
                    if slot.entity_type.has_on_start:
                        await instance.on_start()
                    slot.instance = instance
                    starting = False
                value = await handler.spec.fn(instance, job.message)
            finally:
                current_entity_var.reset(token)

        except Exception as exc:
            return self._on_error(slot, job, exc, during_start=starting)
        return self._succeeded(slot, handler, value)

    def _succeeded(self, slot: Slot, handler: Handler, value: object) -> Exit:
        slot.crashes = 0
        self.messages_handled += 1
        if self._serialize:
            try:
                return handler.reply.decode_exit(handler.reply.encode_value(value))
            except Exception as exc:  # MalformedMessageError: the reply cannot travel
                return Exit(error=exc)
        return Exit(value=value)

    def _on_error(
        self, slot: Slot, job: Job, exc: Exception, *, during_start: bool
    ) -> Exit:
        handler = job.handler
        if not during_start and handler.reply.is_declared(exc):
            slot.crashes = 0
            self.messages_handled += 1
            if self._serialize:
                try:
                    return handler.reply.decode_exit(handler.reply.encode_error(exc))
                except Exception as encode_error:
                    return Exit(error=encode_error)
            return Exit(error=exc)
        phase = "on_start" if during_start else handler.spec.name
        log.error(
            "entity %s crashed in %s; restarting it",
            slot.address,
            phase,
            exc_info=exc,
            extra={"entity": str(slot.address), "runner": self.runner_label},
        )
        self._crash(slot, job)
        if during_start and job.persisted:
            return _REQUEUE
        remote = RemoteError(
            type_name=_type_name(exc),
            message=str(exc),
            address=str(slot.address),
            runner=self.runner_label,
        )
        remote.__cause__ = exc
        self.messages_handled += 1
        return Exit(error=remote)

    def _stopped(self, slot: Slot, job: Job) -> Exit:
        reason = job.stop_reason or StopReason.SHARD_STOPPED
        if reason is StopReason.INTERRUPTED:
            return Exit(error=_interrupted(job.request_id or 0))
        if reason is StopReason.SIBLING_CRASHED:
            if job.persisted:
                return _REQUEUE
            return Exit(
                error=RemoteError(
                    type_name="trio_cluster.EntityRestarted",
                    message="another handler of this entity crashed; the entity restarted",
                    address=str(slot.address),
                    runner=self.runner_label,
                )
            )
        if job.persisted:
            # Detached jobs die with their shard's nursery before getting here
            # (Trio lets Cancelled reach the outermost cancelled scope); this
            # guards the rule should that ever change: record nothing.
            return _NOT_RUN
        return Exit(
            error=EntityNotAssignedError(
                address=str(slot.address),
                detail="shard stopped while the handler ran (it may have partly run)",
            )
        )

    def _crash(self, slot: Slot, job: Job) -> None:
        self.crashes += 1
        old = slot.instance
        slot.instance = None
        slot.crashes += 1
        slot.pause()
        if slot.running_jobs:
            for other in slot.running_jobs:
                if other is not job and other.scope is not None:
                    other.stop_reason = StopReason.SIBLING_CRASHED
                    other.scope.cancel()
        delay = self._backoff.delay(slot.crashes - 1)
        nursery = slot.shard.nursery
        assert nursery is not None
        nursery.start_soon(self._restart_later, slot, old, delay)

    async def _restart_later(
        self, slot: Slot, old: Entity | None, delay: float
    ) -> None:
        if old is not None and slot.entity_type.has_on_stop:
            await self._run_on_stop(old)
        await trio.sleep(delay)
        for job in slot.resume():
            self._start(slot, job)
        self._after_change(slot)

    async def _run_on_stop(self, instance: Entity) -> None:
        with trio.move_on_after(self._termination_timeout) as scope:
            token = current_entity_var.set(instance)
            try:
                await instance.on_stop()
            except Exception as exc:
                log.warning(
                    "on_stop of %s failed: %r", instance.address, exc, exc_info=exc
                )
            finally:
                current_entity_var.reset(token)
        if scope.cancelled_caught:
            log.warning(
                "on_stop of %s was cancelled after the termination timeout",
                instance.address,
            )

    def _finish(self, slot: Slot, job: Job, *, requeue: bool = False) -> None:
        job.scope = None
        next_job = slot.release()
        if requeue:
            job.state = JobState.QUEUED
            slot.requeue_front([job])
        else:
            job.state = JobState.DONE
            if job.request_id is not None:
                self.persisted_jobs.pop(job.request_id, None)
        if next_job is not None:
            self._start(slot, next_job)
        self._after_change(slot)

    def release_stream_permit(self, slot: Slot, job: Job) -> None:
        """A stream started: give its permit to the next job (it keeps running)."""
        next_job = slot.release()
        if next_job is not None:
            self._start(slot, next_job)

    def _after_change(self, slot: Slot) -> None:
        if not slot.idle or slot.stopping or slot.paused:
            return
        if slot.shard.state is not ShardState.ACTIVE:
            return
        if slot.instance is None and slot.crashes == 0:
            self._drop(slot)  # nothing worth keeping: recreate on demand
            return
        self.idle.add(slot, trio.current_time())

    # ------------------------------------------------------------------
    # Passivation and shard stop

    def _passivate(self, slot: Slot) -> None:
        instance = slot.instance
        if instance is None or not slot.entity_type.has_on_stop:
            self._drop(slot)
            return
        slot.stopping = True
        slot.pause()
        nursery = slot.shard.nursery
        assert nursery is not None
        nursery.start_soon(self._stop_incarnation, slot, instance)

    async def _stop_incarnation(self, slot: Slot, instance: Entity) -> None:
        await self._run_on_stop(instance)
        slot.instance = None
        slot.stopping = False
        for job in slot.resume():
            self._start(slot, job)
        self._after_change(slot)

    def _drop(self, slot: Slot) -> None:
        self.idle.remove(slot)
        if slot.shard.slots.pop(slot.address, None) is not None:
            self.resident -= 1

    async def stop_shard(self, shard: ShardHost, *, graceful: bool) -> None:
        """Stop serving a shard: bounce queued messages, then (graceful) wait
        for running handlers and run ``on_stop`` hooks within the termination
        timeout; finally cancel whatever is left and forget the entities.

        Call it shielded: it is cleanup and must finish.
        """
        shard.state = ShardState.STOPPING
        slots = list(shard.slots.values())
        for slot in slots:
            self.idle.remove(slot)
            slot.pause()
            for job in slot.drain():
                self._bounce(job)
        if graceful:
            with trio.move_on_after(self._termination_timeout):
                while shard.running:
                    shard.idle_event = trio.Event()
                    await shard.idle_event.wait()
                for slot in slots:
                    if slot.instance is not None and slot.entity_type.has_on_stop:
                        await self._run_on_stop(slot.instance)
        shard.cancel_all()
        for slot in slots:
            slot.instance = None
        self.resident -= len(shard.slots)
        shard.slots.clear()
        shard.state = ShardState.STOPPED

    def _bounce(self, job: Job) -> None:
        if job.kind is JobKind.INLINE:
            job.state = JobState.BOUNCED
            assert job.granted is not None
            job.granted.set()
            return
        job.state = JobState.BOUNCED
        if job.kind is JobKind.STREAM:
            assert job.stream_channel is not None
            end_stream_nowait(job.stream_channel, Exit(error=_not_served(job)))
            return
        if job.persisted:
            # Still stored, claimed at an epoch that is ending: the next
            # owner claims it again.
            self.persisted_jobs.pop(job.request_id, None)  # type: ignore[arg-type]
            return
        self._notify_sink(job, None)


async def _await(coroutine: Coroutine[Any, Any, None]) -> None:
    await coroutine


def _run_to_completion(coroutine: Coroutine[Any, Any, T]) -> T:
    """Drive a coroutine that cannot suspend (its bytecode has no suspension
    point on the path taken) from synchronous code."""
    try:
        coroutine.send(None)
    except StopIteration as done:
        return cast("T", done.value)
    coroutine.close()  # pragma: no cover - the caller checked it cannot suspend
    raise RuntimeError("a handler that cannot suspend suspended")  # pragma: no cover


def _interrupted(request_id: int) -> Exception:
    from .._errors import RequestInterruptedError

    return RequestInterruptedError(request_id=request_id)


def _not_served(job: Job) -> Exception:
    address = job.slot.address if job.slot is not None else "?"
    return EntityNotAssignedError(
        address=str(address), detail="shard stopped before the request ran"
    )


def _new_instance(slot: Slot) -> Entity:
    """Create an incarnation: the user's class, with its address set before
    its ``__init__`` runs."""
    cls = slot.entity_type.cls
    instance = cls.__new__(cls)
    instance._tc_address = slot.address
    instance._tc_slot = slot
    cls.__init__(instance)
    return instance
