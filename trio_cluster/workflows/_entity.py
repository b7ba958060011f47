"""The entity of a workflow execution: advancing it over its journal (delivery part).

Each execution is a persisted entity, ``trio_cluster.workflow.<name>``,
keyed by its execution id, whose durable state is its `Journal`. Every
handler that changes the execution is a persisted, transactional rpc, so
the journal is saved with its reply, fenced by the shard epoch, and the
wake messages it sends are saved in the same transaction (the outbox):

* ``start`` (primary key ``start``: a second start is the first one)
  records the argument and wakes the execution;
* ``wake`` (primary key ``wake/<token>``, ``deliver_at``) advances it,
  unless its token is stale (the execution advanced since it was sent);
* ``signal`` (primary key ``signal/<name>``) records a signal and advances
  an execution waiting for it;
* ``interrupt`` starts the compensations; ``resume`` replays a suspended
  execution again;
* ``watch`` (a stream) yields the committed `WorkflowInfo`, then each new
  one: `WorkflowHandle.poll` and `WorkflowHandle.result` read it.

An advance replays the workflow function (`WorkflowContext`) until it
yields, returns or raises, or, once it failed or was interrupted, runs the
next compensation (one per advance, newest step first, each recorded in
``Journal.compensated`` when it returns).
"""

from __future__ import annotations

import contextlib
import random as _random
from collections.abc import AsyncIterator  # noqa: TC003 - the stream's reply type
from typing import TYPE_CHECKING, Any, ClassVar

import attrs

from trio_cluster import Entity, current_runner, rpc, stream

from ._context import Compensation, WorkflowContext, Yield
from ._errors import NonDeterminismError
from ._records import (
    TERMINAL,
    Failure,
    GetInfo,
    Interrupt,
    Journal,
    Resume,
    SignalMessage,
    Start,
    Status,
    Wake,
    WorkflowInfo,
)

if TYPE_CHECKING:
    from ._definition import Workflow

__all__ = ["WorkflowEntity", "info_of"]


def _wake_key(msg: Wake) -> str:
    return f"wake/{msg.token}"


def _wake_at(msg: Wake) -> float | None:
    return msg.at


def _signal_key(msg: SignalMessage) -> str:
    return f"signal/{msg.name}"


class WorkflowEntity(Entity):
    """Base of the execution entity types (one per `Workflow`)."""

    type_name = "trio_cluster.workflow"
    concurrency = 1
    max_idle = 30.0
    definition: ClassVar[Workflow[Any, Any]]
    state: Journal  # the durable state, declared on each subclass
    _watchers: int = 0
    """Open ``watch`` streams (the entity stays in memory while watched)."""

    @rpc(persisted=True, transactional=True, primary_key=lambda msg: "start")
    async def start(self, msg: Start) -> None:
        if self.state.status is Status.NOT_STARTED:
            self.state = attrs.evolve(self.state, status=Status.RUNNING, arg=msg.arg)
            await self._schedule(None)

    @rpc(
        persisted=True,
        transactional=True,
        primary_key=_wake_key,
        deliver_at=_wake_at,
    )
    async def wake(self, msg: Wake) -> None:
        if msg.token == self.state.wake:
            await self._advance()

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
            attempts=0,
        )
        await self._schedule(None)

    @rpc(persisted=True, transactional=True)
    async def resume(self, msg: Resume) -> None:
        journal = self.state
        if journal.status is Status.SUSPENDED:
            again = Status.COMPENSATING if journal.error else Status.RUNNING
            self.state = attrs.evolve(journal, status=again, problem=None, attempts=0)
            await self._schedule(None)

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

    async def _schedule(self, at: float | None, *, waiting: bool = False) -> None:
        """Make a new wake token (older timers are now stale) and send the
        wake message for it, unless waiting for a signal with no timer."""
        token = self.state.wake + 1
        self.state = attrs.evolve(self.state, wake=token, wake_at=at)
        if not waiting or at is not None:
            await self.wake.discard(Wake(token, at))

    async def _advance(self) -> None:
        journal = self.state
        if journal.status in (Status.RUNNING, Status.WAITING):
            await self._run()
        elif journal.status is Status.COMPENSATING:
            await self._compensate()

    def _context(self, *, replay_only: bool = False) -> WorkflowContext:
        definition = self.definition
        return WorkflowContext(
            str(self.address.entity_id),
            self.state,
            current_runner(),
            retry=definition.retry,
            in_memory_sleep=definition.in_memory_sleep,
            replay_only=replay_only,
        )

    async def _run(self) -> None:
        """Replay the workflow function and record where it got to."""
        definition = self.definition
        ctx = self._context()
        journal = self.state
        assert journal.arg is not None
        arg = ctx._decode(journal.arg, definition.arg_type)
        yielded: Yield | None = None
        failure: Failure | None = None
        result: bytes | None = None
        try:
            value = await definition.fn(ctx, arg)
        except Yield as signal:
            yielded = signal
        except Exception as exc:  # the workflow failed (unless a problem)
            failure = Failure(type(exc).__name__, str(exc))
        else:
            result = ctx._encode(value, definition.result_type)
        journal = attrs.evolve(
            journal, entries=tuple(ctx.entries), attempts=ctx.attempts
        )
        problem = ctx.problem
        if problem is None and yielded is None and ctx.cursor < len(ctx.entries):
            problem = NonDeterminismError(
                ctx.execution_id,
                ctx.cursor,
                f"{ctx.entries[ctx.cursor].kind.value}"
                f" {ctx.entries[ctx.cursor].name!r}",
                "the end of the workflow",
            )
        if problem is not None:
            # Keep the journal as committed: nothing of this replay counts.
            self.state = attrs.evolve(
                self.state, status=Status.SUSPENDED, problem=str(problem)
            )
            await self._schedule(None, waiting=True)
        elif yielded is not None:
            status = (
                Status.RUNNING
                if yielded.at is None and not yielded.waiting
                else Status.WAITING
            )
            self.state = attrs.evolve(journal, status=status)
            await self._schedule(yielded.at, waiting=yielded.waiting)
        elif failure is not None:
            status = Status.COMPENSATING if ctx.compensations else Status.FAILED
            self.state = attrs.evolve(journal, status=status, error=failure)
            await self._schedule(None, waiting=status is Status.FAILED)
        else:
            self.state = attrs.evolve(journal, status=Status.COMPLETED, result=result)
            await self._schedule(None, waiting=True)

    async def _compensate(self) -> None:
        """Run the next compensation (newest step first), or end compensated."""
        ctx = self._context(replay_only=True)
        journal = self.state
        assert journal.arg is not None
        arg = ctx._decode(journal.arg, self.definition.arg_type)
        # Replay to collect the compensations of the recorded steps: the
        # function stops where it failed, or at the end of the journal.
        with contextlib.suppress(Yield, Exception):
            await self.definition.fn(ctx, arg)
        if ctx.problem is not None:
            self.state = attrs.evolve(
                journal, status=Status.SUSPENDED, problem=str(ctx.problem)
            )
            await self._schedule(None, waiting=True)
            return
        recorded = len(journal.entries)
        todo = [
            c
            for c in reversed(ctx.compensations)
            if c.seq < recorded and c.seq not in journal.compensated
        ]
        if not todo:
            self.state = attrs.evolve(journal, status=Status.COMPENSATED)
            await self._schedule(None, waiting=True)
            return
        await self._run_compensation(todo[0], ctx)

    async def _run_compensation(
        self, compensation: Compensation, ctx: WorkflowContext
    ) -> None:
        journal = self.state
        try:
            await compensation.fn(compensation.arg, compensation.result)
        except Exception as exc:
            attempt = journal.attempts + 1
            if compensation.retry.retries(attempt, exc):
                unit = _random.Random(
                    f"{ctx.execution_id}/c{compensation.seq}/{attempt}"
                )
                delay = compensation.retry.backoff.delay(attempt - 1, unit.random())
                self.state = attrs.evolve(journal, attempts=attempt)
                await self._schedule(current_runner().clock.now() + delay)
                return
            problem = (
                f"the compensation of step {compensation.name!r}"
                f" (operation {compensation.seq}) failed {attempt} times:"
                f" {type(exc).__name__}: {exc}"
            )
            self.state = attrs.evolve(
                journal, status=Status.SUSPENDED, problem=problem, attempts=0
            )
            await self._schedule(None, waiting=True)
            return
        self.state = attrs.evolve(
            journal,
            compensated=(*journal.compensated, compensation.seq),
            attempts=0,
        )
        await self._schedule(None)


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
