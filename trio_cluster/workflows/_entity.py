"""The entity of a workflow execution: advancing it over its journal (delivery part).

Each execution is a persisted entity, ``trio_cluster.workflow.<name>``,
keyed by its execution id, whose durable state is its `Journal`. Every
handler that changes the execution is a persisted, transactional rpc, so
the journal is saved with its reply, fenced by the shard epoch, and the
messages it sends (wakes, children's starts and interrupts, a parent's
notice) are saved in the same transaction (the outbox):

* ``start`` (primary key ``start``, or ``start/<parent>`` for a child:
  a second start is the first one) records the argument and runs the first
  advance, committed with it; a parent's start also records the parent,
  told when it ends;
* ``wake`` (primary key ``wake/<token>``, ``deliver_at``) advances it,
  unless its token is stale (the execution advanced since it was sent);
* ``signal`` (primary key ``signal/<name>``) records a signal and advances
  an execution waiting for it; ``child_done`` (``child/<position>``)
  likewise records how a child ended;
* ``interrupt`` starts the compensations; ``resume`` replays a suspended
  execution again;
* ``watch`` (a stream) yields the committed `WorkflowInfo`, then each new
  one: `WorkflowHandle.poll` and `WorkflowHandle.result` read it;
  ``history`` answers the committed journal.

An advance replays the workflow function (`WorkflowContext`) until it
yields, returns or raises, or, once it failed or was interrupted, takes the
next compensation (`_compensation`).
"""

from __future__ import annotations

from collections.abc import AsyncIterator  # noqa: TC003 - the stream's reply type
from typing import TYPE_CHECKING, Any, ClassVar

import attrs

from trio_cluster import Entity, checkpoint_state, current_runner, rpc, stream

from ._compensation import compensate
from ._context import WorkflowContext, Yield
from ._errors import NonDeterminismError
from ._peers import execution_of
from ._records import (
    TERMINAL,
    ChildDone,
    ChildOutcome,
    Failure,
    GetInfo,
    GetJournal,
    Interrupt,
    Journal,
    Kind,
    ParentRef,
    Resume,
    SignalMessage,
    Start,
    Status,
    Wake,
    WorkflowInfo,
    dotted,
)
from ._replay import Replay, describe

if TYPE_CHECKING:
    from collections.abc import Iterable

    from trio_cluster import Snowflake

    from ._definition import Workflow

__all__ = ["RunnerRuntime", "WorkflowEntity", "info_of"]


def _start_key(msg: Start) -> str:
    parent = msg.parent
    if parent is None:
        return "start"
    return f"start/{parent.workflow}/{parent.execution_id}/{dotted(parent.position)}"


def _wake_key(msg: Wake) -> str:
    return f"wake/{msg.token}"


def _wake_at(msg: Wake) -> float | None:
    return msg.at


def _signal_key(msg: SignalMessage) -> str:
    return f"signal/{msg.name}"


def _child_key(msg: ChildDone) -> str:
    return f"child/{dotted(msg.outcome.position)}"


class RunnerRuntime:
    """The `Runtime` of a context in a handler: the current runner's."""

    __slots__ = ("_runner",)

    def __init__(self) -> None:
        self._runner = current_runner()

    @property
    def converter(self) -> Any:
        return self._runner.converter

    def now(self) -> float:
        return self._runner.clock.now()

    def new_id(self) -> Snowflake:
        return self._runner.new_id()


class WorkflowEntity(Entity):
    """Base of the execution entity types (one per `Workflow`)."""

    type_name = "trio_cluster.workflow"
    concurrency = 1
    max_idle = 30.0
    definition: ClassVar[Workflow[Any, Any]]
    state: Journal  # the durable state, declared on each subclass
    _watchers: int = 0
    """Open ``watch`` streams (the entity stays in memory while watched)."""

    @rpc(persisted=True, transactional=True, primary_key=_start_key)
    async def start(self, msg: Start) -> None:
        journal = self.state
        parent = msg.parent
        if parent is not None and parent not in journal.parents:
            journal = attrs.evolve(journal, parents=(*journal.parents, parent))
            if journal.status in TERMINAL:
                await self._tell_parents(journal, [parent])
        if journal.status is Status.NOT_STARTED:
            journal = attrs.evolve(journal, status=Status.RUNNING, arg=msg.arg)
            self.state = journal
            # The first advance runs here, committed with the start: no wake
            # message between the start and the first step.
            await self._run(checkpoints=True)
        elif journal.status is Status.RUNNING and parent is None:
            # This start again after its advance checkpointed steps but did
            # not commit (a crash): nothing else would advance it. (Any wake
            # message still pending is made stale by this advance.)
            await self._run(checkpoints=True)
        else:
            self.state = journal

    @rpc(
        persisted=True,
        transactional=True,
        primary_key=_wake_key,
        deliver_at=_wake_at,
    )
    async def wake(self, msg: Wake) -> None:
        if msg.token == self.state.wake:
            # A checkpoint keeps the token: after a crash, this message
            # (redelivered) advances the execution again.
            await self._advance(checkpoints=True)

    @rpc(persisted=True, transactional=True, primary_key=_signal_key)
    async def signal(self, msg: SignalMessage) -> None:
        journal = self.state
        if journal.signal(msg.name) is not None:
            return
        self.state = attrs.evolve(
            journal, signals=(*journal.signals, (msg.name, msg.payload))
        )
        if journal.status is Status.WAITING:
            await self._advance()

    @rpc(persisted=True, transactional=True, primary_key=_child_key)
    async def child_done(self, msg: ChildDone) -> None:
        journal = self.state
        position = msg.outcome.position
        if any(known.position == position for known in journal.children):
            return
        self.state = attrs.evolve(journal, children=(*journal.children, msg.outcome))
        if journal.status in (Status.WAITING, Status.COMPENSATING):
            await self._advance()

    @rpc(persisted=True, transactional=True, primary_key=lambda msg: "interrupt")
    async def interrupt(self, msg: Interrupt) -> None:
        journal = self.state
        if journal.status in TERMINAL or journal.interrupted is not None:
            return
        self.state = attrs.evolve(
            journal,
            interrupted=msg.reason,
            status=Status.COMPENSATING,
            error=journal.error or Failure("Interrupted", msg.reason),
        )
        await self.schedule(None)

    @rpc(persisted=True, transactional=True)
    async def resume(self, msg: Resume) -> None:
        journal = self.state
        if journal.status is Status.SUSPENDED:
            again = Status.COMPENSATING if journal.error else Status.RUNNING
            self.state = attrs.evolve(journal, status=again, problem=None)
            await self.schedule(None)

    @rpc
    async def history(self, msg: GetJournal) -> Journal:
        return type(self).__dict__["state"].cell(self).committed  # type: ignore[no-any-return]

    @stream
    async def watch(self, msg: GetInfo) -> AsyncIterator[WorkflowInfo]:
        # Committed snapshots only, through the durable state's cell (the
        # same seam as a state machine's watch_state).
        # NOTE: the entity stays in memory while watched: an idle
        # passivation would leave the stream on the old incarnation's state.
        cell = type(self).__dict__["state"].cell(self)
        self._watchers += 1
        self.keep_alive(True)
        try:
            last = None
            while True:
                journal = cell.committed
                if journal is not last:
                    last = journal
                    yield info_of(journal)
                else:
                    await cell.wait_commit()
        finally:
            self._watchers -= 1
            if not self._watchers:
                self.keep_alive(False)

    # ------------------------------------------------------------------

    async def schedule(self, at: float | None, *, waiting: bool = False) -> None:
        """Make a new wake token (older timers are now stale) and send the
        wake message for it, unless waiting for a message with no timer."""
        token = self.state.wake + 1
        self.state = attrs.evolve(self.state, wake=token, wake_at=at)
        if not waiting or at is not None:
            await self.wake.discard(Wake(token, at))

    async def _advance(self, *, checkpoints: bool = False) -> None:
        """Run the workflow (or its next compensation). ``checkpoints``: the
        advance may commit its steps as it goes (`_checkpoint`); only for
        the handlers whose message, redelivered after a crash, advances the
        execution again (``wake``, ``start``)."""
        journal = self.state
        if journal.status in (Status.RUNNING, Status.WAITING):
            await self._run(checkpoints=checkpoints)
        elif journal.status is Status.COMPENSATING:
            await compensate(self)

    def context(
        self, *, replay_only: bool = False, checkpoints: bool = False
    ) -> WorkflowContext:
        definition = self.definition
        return WorkflowContext(
            str(self.address.entity_id),
            self.state,
            RunnerRuntime(),
            retry=definition.retry,
            in_memory_sleep=definition.in_memory_sleep,
            replay_only=replay_only,
            steps_per_checkpoint=definition.steps_per_checkpoint,
            advance_seconds=definition.advance_seconds,
            checkpoint=self._checkpoint if checkpoints and not replay_only else None,
            step_types=definition.step_types,
        )

    async def _checkpoint(self, replay: Replay) -> None:
        """Commit the journal recorded so far, the advance going on (see
        `WorkflowContext._commit_so_far`)."""
        self.state = attrs.evolve(
            self.state,
            status=Status.RUNNING,
            entries=tuple(replay.entries),
            retries=tuple(replay.retries.values()),
            patches=tuple(replay.patches.items()),
        )
        await checkpoint_state()

    async def _run(self, *, checkpoints: bool = False) -> None:
        """Replay the workflow function and record where it got to."""
        definition = self.definition
        ctx = self.context(checkpoints=checkpoints)
        journal = self.state
        assert journal.arg is not None
        arg = ctx.decode(journal.arg, definition.arg_type)
        yielded: tuple[float | None, bool] | None = None
        failure: Failure | None = None
        result: bytes | None = None
        try:
            value = await definition.fn(ctx, arg)
        except Yield as signal:
            # Its time only: the exception itself, kept in this frame, would
            # make a reference cycle (its traceback holds this frame) of
            # everything the advance used, left to the garbage collector.
            yielded = (signal.at, signal.waiting)
        except Exception as exc:  # the workflow failed (unless a problem)
            failure = failure_of(exc)
        else:
            result = ctx.encode(value, definition.result_type)
        replay = ctx.replay
        problem = replay.problem
        left = replay.unconsumed() if yielded is None else None
        if problem is None and left is not None:
            problem = NonDeterminismError(
                ctx.execution_id, left.position, describe(left), "no operation there"
            )
        if problem is not None:
            # Keep the journal as committed: nothing of this replay counts.
            self.state = attrs.evolve(
                self.state, status=Status.SUSPENDED, problem=str(problem)
            )
            await self.schedule(None, waiting=True)
            return
        journal = attrs.evolve(
            journal,
            entries=tuple(replay.entries),
            retries=tuple(replay.retries.values()),
            patches=tuple(replay.patches.items()),
        )
        for start in ctx.started:
            parent = ParentRef(
                definition.name,
                ctx.execution_id,
                start.position,
                definition.shard_group,
            )
            child: Any = current_runner().client(start.workflow.entity)
            await child(start.execution_id).start.discard(Start(start.arg, parent))
        if yielded is not None:
            at, waiting = yielded
            status = Status.RUNNING if at is None and not waiting else Status.WAITING
            self.state = attrs.evolve(journal, status=status)
            await self.schedule(at, waiting=waiting)
        elif failure is not None:
            running = bool(running_children(journal))
            if ctx.compensations or running:
                self.state = attrs.evolve(
                    journal, status=Status.COMPENSATING, error=failure
                )
                await self.schedule(None)
            else:
                self.state = attrs.evolve(journal, status=Status.FAILED, error=failure)
                await self.finish()
        else:
            self.state = attrs.evolve(journal, status=Status.COMPLETED, result=result)
            # Children whose wait the code abandoned (a cancelled task).
            await self.interrupt_children(
                running_children(journal), "their parent completed"
            )
            await self.finish()

    async def finish(self) -> None:
        """The execution ended (its status is final): tell its parents."""
        await self._tell_parents(self.state, self.state.parents)
        await self.schedule(None, waiting=True)

    async def _tell_parents(
        self, journal: Journal, parents: Iterable[ParentRef]
    ) -> None:
        runner = current_runner()
        for parent in parents:
            outcome = ChildOutcome(
                parent.position,
                str(self.address.entity_id),
                journal.status,
                journal.result,
                journal.error,
            )
            target = execution_of(
                runner,
                parent.workflow,
                parent.execution_id,
                base=WorkflowEntity,
                shard_group=parent.shard_group,
            )
            await target.child_done.discard(ChildDone(outcome))

    async def interrupt_children(
        self, children: Iterable[tuple[str, str]], reason: str
    ) -> None:
        """Send an interrupt to each ``(workflow name, execution id)``."""
        runner = current_runner()
        for workflow, execution_id in children:
            target = execution_of(runner, workflow, execution_id, base=WorkflowEntity)
            await target.interrupt.discard(Interrupt(reason))


def failure_of(exc: BaseException) -> Failure:
    """How a workflow's exception is recorded; a group (from a nursery)
    names the exceptions in it."""
    message = str(exc)
    if isinstance(exc, BaseExceptionGroup):
        leaves = "; ".join(str(failure_of(inner)) for inner in exc.exceptions)
        message = f"{message}: {leaves}"
    return Failure(type(exc).__name__, message)


def running_children(journal: Journal) -> list[tuple[str, str]]:
    """``(workflow, execution id)`` of the children started and not ended."""
    ended = {outcome.position for outcome in journal.children}
    return [
        (entry.name, entry.execution_id)
        for entry in journal.entries
        if entry.kind is Kind.CHILD
        and entry.execution_id is not None
        and entry.position not in ended
    ]


def info_of(journal: Journal) -> WorkflowInfo:
    """The `WorkflowInfo` of ``journal``."""
    return WorkflowInfo(
        status=journal.status,
        steps=len(journal.entries),
        error=journal.error,
        problem=journal.problem,
        compensated=journal.compensated,
        waiting_until=journal.wake_at if journal.status is Status.WAITING else None,
        result=journal.result,
    )
