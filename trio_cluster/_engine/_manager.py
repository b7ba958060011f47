"""The entity manager: admission and execution of jobs (Trio driver).

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

  Either way it runs in a fresh copy of the runner's base context, never in
  the caller's context or in that of the task that started it (`_isolation`).

* Every running handler is inside a cancel scope registered with its shard;
  detached ones also run in the shard's nursery, whose deadline is the lease
  deadline. When that deadline passes, the shard's cleanup cancels every
  registered scope at once (handlers in callers' tasks included), within the
  margin the lease keeps before the database could free the lock. Losing the
  lease, releasing the shard or shutting down cancels exactly those scopes
  and the shard's nursery.
* A job's state changes only through `trio_cluster._core._job.advance` (the
  lifecycle table); how it ended is an `Outcome` (`_outcomes`): an `Exit`
  for its caller or sink, or a marker (replay it, or it did not run here).
* An undeclared exception crashes the incarnation: the caller gets
  `RemoteError`, and `EntityLifecycle` (`_entity_lifecycle`) pauses the
  mailbox, cancels sibling handlers (persisted ones are replayed) and restarts
  the entity after an exponential backoff. It also passivates idle entities,
  enforces the residency cap and stops shards.
"""

from __future__ import annotations

import logging
from functools import partial
from typing import TYPE_CHECKING, Any, Final, TypeVar

import trio

from .._call_metadata import EMPTY_METADATA, current_metadata_var
from .._context import current_entity_var
from .._core._job import FINISH, GRANT, JobEvent, JobState, StopReason, advance
from .._core._mailbox import Admission
from .._errors import MailboxFullError
from .._tracing import TracedCall
from ..serialization._replies import Exit, value_exit
from ._entity_lifecycle import EntityLifecycle, activate, new_instance
from ._isolation import drive, run_in, spawn
from ._outcomes import (
    NOT_RUN,
    REQUEUE,
    RetryLater,
    crashed,
    declared,
    interrupted,
    not_served,
    returned,
    stopped,
)
from ._slots import Job, JobKind, ShardState, Slot
from ._streams import end_stream_nowait, run_stream

if TYPE_CHECKING:
    from collections.abc import Coroutine, Mapping
    from contextvars import Context

    from .._core._addresses import EntityAddress
    from .._core._config import ShardingConfig
    from .._registry import EntityType, Handler
    from .._tracing import Tracer
    from ._outcomes import Outcome, Requeue
    from ._slots import Around, ShardHost, Sink

__all__ = ["EntityManager", "NotDelivered"]

log = logging.getLogger("trio_cluster.entity")

T = TypeVar("T")

_INLINE: Final = JobKind.INLINE
_ACTIVE: Final = ShardState.ACTIVE
_QUEUED: Final = Admission.QUEUED
_FULL: Final = Admission.FULL
# NOTE: enum members `call` reads on every call: a module constant is one
# dictionary lookup, a member read through its class a Python-level
# ``__getattr__`` hook of the enum's metaclass (on Python 3.11).


class NotDelivered(Exception):
    """The message was not run here (shard not served, or stopped while it was
    queued). Safe to route again: the handler never started."""


class EntityManager:
    """Runs the entities of the shards this runner serves.

    Args:
        config: the runner's policies.
        runner_label: the runner's address, for logs and errors.
        context: the runner's base context (`_isolation.base_context`).
        tracer: makes a span around each handler's execution, if given.
    """

    def __init__(
        self,
        *,
        config: ShardingConfig,
        runner_label: str,
        context: Context,
        tracer: Tracer | None = None,
    ) -> None:
        self.serialize = config.serialize_local_calls
        """Values and errors make their codecs' round trip even in-process."""
        self.runner_label = runner_label
        self._context = context
        """The runner's base context: every handler runs in a copy of it."""
        self._lifecycle = EntityLifecycle(config=config, jobs=self, context=context)
        self.idle = self._lifecycle.idle
        """Idle entities (passivation and the residency cap)."""
        self.persisted_jobs: dict[int, Job] = {}
        """Persisted requests in memory (queued or running), by request id."""
        self.messages_handled = 0
        self.requeued = 0
        """Persisted jobs put back in their mailbox to run again (a crash of
        their entity or of its ``on_start``, a failed transaction)."""
        self.tracer = tracer
        """Makes the owner's span of each handler run (None: no tracing)."""

    @property
    def crashes(self) -> int:
        """Incarnations crashed so far."""
        return self._lifecycle.crashes

    async def run(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Run the passivation reaper until cancelled. (Asynchronous sinks run
        in the nursery of the shards' tasks: see `ShardHost.background`.)"""
        task_status.started()
        await self.idle.run()

    async def stop_shard(self, shard: ShardHost, *, graceful: bool) -> None:
        """Stop serving a shard (see `EntityLifecycle.stop_shard`). Call it
        shielded: it is cleanup and must finish."""
        await self._lifecycle.stop_shard(shard, graceful=graceful)

    # ------------------------------------------------------------------
    # Admission

    def _slot_for(
        self,
        shard: ShardHost,
        address: EntityAddress,
        entity_type: EntityType,
        wait: bool,
    ) -> Slot:
        """The admission prologue of `call`, `submit` and `run_nowait`: the
        slot a message to ``address`` is offered to, created if needed
        (``wait``: at the residency cap, a slot that waits for room; see
        `EntityLifecycle.new_slot`).

        Raises:
            NotDelivered: the shard is not served here.
            MailboxFullError: the runner is at ``max_resident_entities``, and
                not ``wait``.
        """
        if not shard.active:
            raise NotDelivered(str(address))
        slot = shard.slots.get(address)
        if slot is None:
            return self._lifecycle.new_slot(shard, address, entity_type, wait=wait)
        self.idle.remove(slot)
        return slot

    async def call(
        self,
        shard: ShardHost,
        address: EntityAddress,
        entity_type: EntityType,
        handler: Handler,
        message: Any,
        metadata: Mapping[str, str] | None = None,
    ) -> Any:
        """Run a volatile request in the caller's task and return its value;
        the handler runs with ``metadata`` as its call metadata.

        Raises:
            NotDelivered: the shard is not served here (route again).
            MailboxFullError: the mailbox (or the runner) is full.
            RemoteError: the handler raised an undeclared exception.
            Exception: a declared error of the handler, as itself.

        Cancellation interrupts the handler (or withdraws the queued message).
        """
        await trio.lowlevel.checkpoint_if_cancelled()
        # NOTE: `_slot_for` inlined (the hot path of W1).
        if not shard.active:
            raise NotDelivered(str(address))
        slot = shard.slots.get(address)
        if slot is None:
            slot = self._lifecycle.new_slot(shard, address, entity_type, wait=False)
        else:
            self.idle.remove(slot)
        job = Job(handler, message, _INLINE, slot)
        if metadata is not None:
            job.metadata = metadata
        admission = slot.offer(job)
        if admission is _FULL:
            raise MailboxFullError(address=str(address))
        if admission is _QUEUED:
            await self._wait_granted(slot, job)
        else:
            job.state = GRANT[job.state]
        outcome: Outcome
        try:
            if not shard.may_start():
                outcome = NOT_RUN  # see `_execute`
            elif _in_one_step(slot, job):
                outcome = self._run_one_step(slot, job)
            else:
                # In the caller's task (its cancellation is the handler's),
                # each step in a fresh copy of the base context.
                run: Coroutine[Any, Any, Outcome] = self._execute_in_scope(slot, job)
                if self.tracer is not None:
                    run = self._traced(slot, job, run)
                outcome = await run_in(self._job_context(job), run)
        finally:
            self._finish(slot, job)
        if outcome is NOT_RUN:
            raise NotDelivered(str(address))
        assert outcome is not REQUEUE, "only persisted jobs are replayed"
        await trio.lowlevel.cancel_shielded_checkpoint()
        return outcome.unwrap()

    async def _wait_granted(self, slot: Slot, job: Job) -> None:
        job.granted = trio.Event()
        try:
            await job.granted.wait()
        except BaseException:
            if job.state is JobState.GRANTED:
                self._finish(slot, job)  # hand the permit on
            elif job.state is JobState.QUEUED:
                self._withdraw(job)
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
        metadata: Mapping[str, str] | None = None,
        here: bool = False,
    ) -> Job:
        """Queue a job that runs without a waiting caller in this task.

        Persisted jobs (``request_id`` set on a persisted handler) are
        remembered by request id.

        Args:
            force: a persisted delivery, which is never refused: it is queued
                beyond the mailbox capacity, and for an entity that is not
                resident while the runner is at ``max_resident_entities``, it
                waits (not started, the entity not created) until there is
                room.
            metadata: the call metadata the handler runs with.
            here: a job granted its permit at once is not started: the
                caller runs it in its own task with `run_here` (its state is
                then `JobState.GRANTED`); a queued one runs as usual.

        Raises:
            NotDelivered: the shard is not served here.
            MailboxFullError: the mailbox, or the runner, is full (not ``force``).
        """
        slot = self._slot_for(shard, address, entity_type, force)
        job = Job(
            handler,
            message,
            kind,
            slot,
            request_id=request_id,
            sink=sink,
            stream_channel=stream_channel,
            around=around,
        )
        if metadata is not None:
            job.metadata = metadata
        admission = slot.offer(job, force=force)
        if admission is Admission.FULL:
            self._lifecycle.after_change(slot)
            raise MailboxFullError(address=str(address))
        if request_id is not None and job.persisted:
            self.persisted_jobs[request_id] = job
        if admission is Admission.RUN:
            if here:
                job.state = GRANT[job.state]
            else:
                self.start(slot, job)
        return job

    async def run_here(self, job: Job) -> Exit | None:
        """Run a job granted by ``submit(here=True)`` in the current task, as
        its own task would run it (in a fresh copy of the base context), and
        return what its sink is to receive: None if there is nothing to
        deliver (it did not run here, it was put back in its mailbox to run
        again later with its sink, or its ``around`` dealt with its outcome).

        Cancellation of the current task is the handler's (it is interrupted
        as its caller's would be); the job's permit is handed on and the
        cancellation propagates, the sink told nothing.
        """
        deliver, exit_ = await run_in(
            self._job_context(job), self._run_job(job.slot, job)
        )
        return exit_ if deliver else None

    def run_nowait(
        self,
        shard: ShardHost,
        address: EntityAddress,
        entity_type: EntityType,
        handler: Handler,
        message: Any,
        metadata: Mapping[str, str] | None = None,
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
        if not (  # `shard.may_start()`, inlined
            shard.state is _ACTIVE
            and not shard.closing
            and shard.current_time() < shard.lease_deadline
        ):
            raise NotDelivered(str(address))
        if handler.suspends:
            return None
        slot = shard.slots.get(address)
        if (slot is None or slot.instance is None) and entity_type.start_suspends:
            return None  # on_start would run, and it can suspend
        if slot is None:
            slot = self._lifecycle.new_slot(shard, address, entity_type, wait=False)
        elif not slot.idle or slot.paused or slot.starting is not None:
            return None
        else:
            # `_slot_for`, whose checks were just made (`may_start`).
            self.idle.remove(slot)
        job = Job(handler, message, JobKind.INLINE, slot)
        if metadata is not None:
            job.metadata = metadata
        slot.offer(job)  # a permit: the slot is idle and not paused
        job.state = GRANT[job.state]
        try:
            outcome = self._run_one_step(slot, job)
        finally:
            self._finish(slot, job)
        assert outcome is not REQUEUE, "only persisted jobs are replayed"
        return outcome

    def interrupt(self, request_id: int) -> bool:
        """Interrupt a persisted job in memory: withdraw it if queued (its sink
        gets an interrupted exit), cancel it if running. False if unknown."""
        job = self.persisted_jobs.get(request_id)
        if job is None:
            return False
        if job.state is JobState.QUEUED:
            if self._withdraw(job):
                self.persisted_jobs.pop(request_id, None)
                self._notify_sink(job, interrupted(request_id))
            return True
        self.cancel_job(job)
        return True

    def cancel_job(self, job: Job) -> None:
        """Withdraw or cancel a job whose consumer went away (a remote
        caller, a stream's reader, an interrupted persisted request).

        A job granted its permit whose task has not started the handler yet
        (no scope) is marked: it does not run (`_execute`), or its scope is
        cancelled as it is made (`ShardHost.start_handler`)."""
        if job.state is JobState.QUEUED:
            self._withdraw(job)
        elif job.state is JobState.GRANTED:
            job.stop_reason = StopReason.INTERRUPTED
            if job.scope is not None:
                job.scope.cancel()

    def _withdraw(self, job: Job) -> bool:
        """Take a queued job out of its mailbox; False if it is not queued."""
        slot = job.slot
        if not slot.remove(job):
            return False
        job.state = advance(job.state, JobEvent.WITHDRAW)
        self._lifecycle.after_change(slot)
        return True

    # ------------------------------------------------------------------
    # Execution

    def start(self, slot: Slot, job: Job) -> None:
        """Start a job that was just granted a permit: wake its inline caller,
        or spawn its task in the shard's nursery (in the base context: the
        current task is whichever sent it, or finished the job before it).

        A job that needs a task, of a shard whose nursery is closing
        (`ShardHost.closing`: it would refuse the task), is bounced instead,
        as the shard's stop bounces the others, and the permit goes on to
        the next job: an inline handler that ends in its caller's task
        after its shard stopped hands its permit on to queued jobs."""
        while job.kind is not JobKind.INLINE and slot.shard.closing:
            self.bounce(job)
            next_job = slot.release()
            if next_job is None:
                return
            job = next_job
        job.state = advance(job.state, JobEvent.GRANT)
        if job.kind is JobKind.INLINE:
            assert job.granted is not None
            job.granted.set()
            return
        nursery = slot.shard.nursery
        assert nursery is not None
        if job.kind is JobKind.STREAM:
            spawn(self._context, nursery, run_stream, self, slot, job)
        else:
            spawn(self._context, nursery, self._run_detached, slot, job)

    async def _run_detached(self, slot: Slot, job: Job) -> None:
        if job.metadata is not None:
            # This task's own context: a fresh copy of the base context.
            current_metadata_var.set(job.metadata)
        deliver, exit_ = await self._run_job(slot, job)
        if deliver:
            self._notify_sink(job, exit_)

    async def _run_job(self, slot: Slot, job: Job) -> tuple[bool, Exit | None]:
        """Run a granted job (with its ``around``) and finish it; returns
        whether its sink is to be told, and what (None: it did not run here,
        or ``around`` dealt with its outcome)."""
        outcome: Outcome | None = None
        retry = False
        try:
            if job.around is None:
                outcome = await self._execute(slot, job)
            else:
                crashes = slot.crashes
                try:
                    outcome = await job.around(job, partial(self._execute, slot, job))
                except RetryLater as failure:
                    retry = self._lifecycle.retry_later(slot, job, crashes, failure)
        finally:
            self._finish(slot, job, requeue=retry or outcome is REQUEUE)
        if retry or outcome is REQUEUE:
            return False, None
        return True, None if outcome is NOT_RUN else outcome

    def _notify_sink(self, job: Job, exit_: Exit | None) -> None:
        if job.sink is None:
            if exit_ is not None and exit_.error is not None:
                log.info(
                    "discarded message to %s failed: %s", job.handler.what, exit_.error
                )
            return
        pending = job.sink(job, exit_)
        if pending is not None:  # an async sink: run it in its own task
            try:
                spawn(self._context, job.slot.shard.background, _await, pending)
            except BaseException:
                pending.close()  # never started: not "never awaited"
                raise

    async def _execute(self, slot: Slot, job: Job) -> Outcome:
        """Run one granted job in the current task and its context (a
        detached job's task; see `call` for inline jobs). Returns its outcome;
        lets the caller's own cancellation propagate."""
        if not slot.shard.may_start():
            # Its shard stopped (or its lease ran out) after the job got its
            # permit (the simulator found handlers starting on a runner that
            # no longer served the shard): it did not run; it is redelivered
            # or routed again.
            return NOT_RUN
        if job.stop_reason is StopReason.INTERRUPTED:
            # Interrupted between its grant and now (`cancel_job`): its
            # caller is gone, or asked for it not to run.
            return self.handler_stopped(slot, job)
        if self.tracer is not None:
            return await self._traced(slot, job, self._execute_now(slot, job))
        return await self._execute_now(slot, job)

    async def _execute_now(self, slot: Slot, job: Job) -> Outcome:
        """`_execute` past its checks (and inside its span, if traced)."""
        if _in_one_step(slot, job):
            # In this task's context: the job's own (a copy of the base
            # context, with what `job.around` set, such as the transaction).
            await self._one_step(slot, job)
            return _one_step_outcome(job)
        return await self._execute_in_scope(slot, job)

    def _run_one_step(self, slot: Slot, job: Job) -> Exit | Requeue:
        """Run a job `_in_one_step` admits, to completion and now, in a fresh
        copy of the base context. This is the fast path of handlers that only
        update state, for inline callers and the owner's fast path:
        synchronous, so they need no task switch and no stepping (see
        `_isolation`)."""
        # NOTE: `_one_step` and `_job_context` inlined (the hot path of W1).
        context = self._context.copy()
        if job.metadata is not None:
            context.run(current_metadata_var.set, job.metadata)
        run = (
            self._observed_one_step(slot, job)
            if slot.shard.listeners.any
            else self._execute_in_one_step(slot, job)
        )
        if self.tracer is not None:
            run = self._traced(slot, job, run)
        context.run(drive, run)
        outcome = job.outcome
        assert outcome is not None, "a one-step run leaves its outcome in the job"
        return outcome

    def _job_context(self, job: Job) -> Context:
        """A fresh copy of the base context, with the job's call metadata."""
        context = self._context.copy()
        if job.metadata is not None:
            context.run(current_metadata_var.set, job.metadata)
        return context

    def traced_call(self, slot: Slot, job: Job) -> TracedCall:
        """What the owner's span of ``job`` is about."""
        handler = job.handler
        address = slot.address
        return TracedCall(
            kind="stream" if handler.spec.kind == "stream" else "call",
            entity_type=address.entity_type,
            entity_id=address.entity_id.value,
            handler=handler.spec.name,
            persisted=handler.spec.persisted,
            runner=self.runner_label,
        )

    async def _traced(self, slot: Slot, job: Job, run: Coroutine[Any, Any, T]) -> T:
        """Await ``run`` (a run of ``job``) inside the owner's span, which
        records the handler's failure (an outcome, not an exception)."""
        tracer = self.tracer
        assert tracer is not None
        carrier = EMPTY_METADATA if job.metadata is None else job.metadata
        with tracer.owner_span(self.traced_call(slot, job), carrier) as span:
            result = await run
            outcome = job.outcome if result is None else result
            if isinstance(outcome, Exit) and outcome.error is not None:
                span.record_error(outcome.error)
        return result

    def _one_step(self, slot: Slot, job: Job) -> Coroutine[Any, Any, None]:
        """The coroutine of a one-step run (observed if there are listeners:
        a runner without any pays one attribute read per handler)."""
        if slot.shard.listeners.any:
            return self._observed_one_step(slot, job)
        return self._execute_in_one_step(slot, job)

    async def _execute_in_scope(self, slot: Slot, job: Job) -> Outcome:
        """Run a job whose handler (or ``on_start``) can suspend, in a cancel
        scope its shard can cancel."""
        handler = job.handler
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
                    instance = await activate(slot)
                    starting = False
                # NOTE: the token is set and reset by hand, not with a
                # context manager, on both execution paths: they run for
                # every call, and a generator-based context manager costs
                # two more frames and an allocation each time (review D15).
                token = current_entity_var.set(instance)
                try:
                    value = await handler.spec.fn(instance, job.message)
                finally:
                    current_entity_var.reset(token)
        except Exception as exc:
            return self.handler_failed(slot, job, exc, during_start=starting)
        finally:
            shard.finish_handler(slot, job, scope)

        if scope.cancelled_caught or not shard.leased():
            # Cancelled, or it returned after its shard's lease ran out (no
            # checkpoint since): its result must not leave this runner.
            return self.handler_stopped(slot, job)
        slot.crashes = 0
        self.messages_handled += 1
        return returned(handler, value, self.serialize)

    async def _execute_in_one_step(self, slot: Slot, job: Job) -> None:
        """Run a job whose handler (and ``on_start``, if it must run) cannot
        suspend: it runs to completion without yielding, so nothing can
        interrupt it and it needs no cancel scope. Its outcome is left in
        ``job.outcome``, not returned: `_run_one_step` drives this from
        synchronous code, where a return value costs a StopIteration."""
        handler = job.handler
        instance = slot.instance
        starting = instance is None
        try:
            if instance is None:
                instance = new_instance(slot)
            # NOTE: set and reset by hand on the hot path (see
            # `_execute_in_scope`).
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
            job.outcome = self.handler_failed(slot, job, exc, during_start=starting)
            return
        slot.crashes = 0
        self.messages_handled += 1
        # NOTE: `returned`'s commonest case inlined (every one-step call).
        job.outcome = (
            returned(handler, value, True)
            if self.serialize and handler.reply.value.size_if_unchanged(value) is None
            else value_exit(value)
        )

    async def _observed_one_step(self, slot: Slot, job: Job) -> None:
        """`_execute_in_one_step`, told to the listeners."""
        listeners, name, epoch = (
            slot.shard.listeners,
            job.handler.spec.name,
            slot.shard.epoch,
        )
        listeners.handler_started(slot.address, name, epoch)
        try:
            await self._execute_in_one_step(slot, job)
        finally:
            listeners.handler_finished(slot.address, name, epoch)

    def handler_failed(
        self, slot: Slot, job: Job, exc: Exception, *, during_start: bool
    ) -> Exit | Requeue:
        """``job``'s handler (or ``on_start``, ``during_start``) raised
        ``exc``: its outcome. Anything but a declared error of the handler,
        or an error its retry policy names ``non_retryable`` (a persisted
        request's final failure: dead-lettered, see `Attempts`), crashes the
        incarnation (see `EntityLifecycle.crash`)."""
        handler = job.handler
        if not during_start:
            if handler.reply.is_declared(exc):
                slot.crashes = 0
                self.messages_handled += 1
                return declared(handler, exc, self.serialize)
            if job.persisted and handler.retry.is_final(exc):
                self.messages_handled += 1
                return crashed(exc, address=slot.address, runner=self.runner_label)
        phase = "on_start" if during_start else handler.spec.name
        log.error(
            "entity %s crashed in %s; restarting it",
            slot.address,
            phase,
            exc_info=exc,
            extra={"entity": str(slot.address), "runner": self.runner_label},
        )
        self._lifecycle.crash(slot, job)
        if during_start and job.persisted:
            return REQUEUE
        self.messages_handled += 1
        return crashed(exc, address=slot.address, runner=self.runner_label)

    def handler_stopped(self, slot: Slot, job: Job) -> Outcome:
        """``job``'s handler was cancelled by the runtime: its outcome."""
        return stopped(
            job.stop_reason,
            persisted=job.persisted,
            request_id=job.request_id,
            address=slot.address,
            runner=self.runner_label,
        )

    def _finish(self, slot: Slot, job: Job, *, requeue: bool = False) -> None:
        job.scope = None
        next_job = slot.release()
        if requeue:
            job.state = advance(job.state, JobEvent.REQUEUE)
            slot.requeue_front([job])
            self.requeued += 1
        else:
            job.state = FINISH[job.state]
            if job.request_id is not None:
                self.persisted_jobs.pop(job.request_id, None)
        if next_job is not None:
            self.start(slot, next_job)
        self._lifecycle.after_change(slot)

    def release_stream_permit(self, slot: Slot) -> None:
        """A stream started: give its permit to the next job (it keeps running)."""
        next_job = slot.release()
        if next_job is not None:
            self.start(slot, next_job)

    def stream_ended(self, slot: Slot, job: Job, *, released: bool) -> None:
        """A stream's producer ended; ``released``: its permit was already
        handed on (`release_stream_permit`)."""
        if not released:
            self._finish(slot, job)
            return
        job.scope = None
        job.state = advance(job.state, JobEvent.FINISH)
        self._lifecycle.after_change(slot)

    def bounce(self, job: Job) -> None:
        """A queued job will not run here: its shard stops. Its caller routes
        it again, a persisted request is claimed again by the next owner."""
        job.state = advance(job.state, JobEvent.BOUNCE)
        if job.kind is JobKind.INLINE:
            assert job.granted is not None
            job.granted.set()
            return
        if job.kind is JobKind.STREAM:
            assert job.stream_channel is not None
            end_stream_nowait(job.stream_channel, not_served(job.slot.address))
            return
        if job.request_id is not None and job.persisted:
            # Still stored, claimed at an epoch that is ending: the next
            # owner claims it again (the shard's stop gives its attempt back).
            self.persisted_jobs.pop(job.request_id, None)
            job.slot.shard.bounced.append(job.request_id)
            return
        self._notify_sink(job, None)


def _in_one_step(slot: Slot, job: Job) -> bool:
    """Whether ``job`` can run to completion without suspending: its handler
    cannot (nor ``on_start``, if it is to run), and the entity is neither
    paused nor starting."""
    return (
        not job.handler.suspends
        and not slot.paused
        and slot.starting is None
        and (slot.instance is not None or not slot.entity_type.start_suspends)
    )


async def _await(coroutine: Coroutine[Any, Any, None]) -> None:
    await coroutine


def _one_step_outcome(job: Job) -> Exit | Requeue:
    outcome = job.outcome
    assert outcome is not None, "a one-step run leaves its outcome in the job"
    return outcome
