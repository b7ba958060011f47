"""`WorkflowContext`: the workflow function's journaled operations (delivery part).

Each operation takes the next position of its task (`_replay`): recorded,
it returns the recorded outcome without running anything; new, it runs for
real and records its outcome, in the transaction of the handler that
advances the execution (`_entity`).

At most one step runs per task and advance: a task's next new step yields
(`Yield`), and the handler commits the journal with a wake message that
advances it again. So each step's result is committed before that task's
next step starts, and a replay after a crash, failover or passivation skips
every committed step. The tasks of a step nursery each run their next step
in the same advance, concurrently; their results commit together.
"""

from __future__ import annotations

import contextlib
import random as _random
import typing
import weakref
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Protocol, TypeVar, cast

import attrs
import msgpack
import trio

from trio_cluster import (
    RetryPolicy,
    Snowflake,
    current_transaction,
    outside_transaction,
)

from ._children import await_child
from ._errors import SignalTimeoutError, StepFailedError
from ._metrics import run_step
from ._nursery import open_step_nursery
from ._records import Entry, Failure, Kind, Retry, dotted
from ._replay import Compensation, Replay, Yield

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable
    from contextlib import AbstractAsyncContextManager

    import cattrs

    from ._definition import Workflow
    from ._nursery import StepNursery
    from ._records import Journal, Position

__all__ = ["Compensation", "Runtime", "WorkflowContext", "Yield"]

A = TypeVar("A")
R = TypeVar("R")
T = TypeVar("T")


class Runtime(Protocol):
    """What a context needs of its runner."""

    @property
    def converter(self) -> cattrs.Converter: ...

    def now(self) -> float: ...

    def new_id(self) -> Snowflake: ...


class WorkflowContext:
    """What a workflow function records its operations through.

    Use only its methods for anything that must be the same on replay
    (time, randomness, ids, effects, concurrency): the function runs again
    from the start each time the execution advances.

    Cancellation: an operation the journal recorded returns (or raises) its
    recorded outcome at once, without a checkpoint, so a task replays the
    same whatever its sibling tasks do; a new operation starts with a
    checkpoint. A step cancelled while it runs records nothing (it runs
    again, unless its task is cancelled again on replay). A transactional
    step's writes roll back with it.
    """

    def __init__(
        self,
        execution_id: str,
        journal: Journal,
        runtime: Runtime,
        *,
        retry: RetryPolicy,
        in_memory_sleep: float,
        replay_only: bool = False,
        steps_per_checkpoint: int = 1,
        advance_seconds: float = 0.0,
        checkpoint: Callable[[Replay], Awaitable[None]] | None = None,
        step_types: StepTypes | None = None,
    ) -> None:
        self.execution_id = execution_id
        """The execution's id (its idempotency key)."""
        self.replay = Replay(execution_id, journal, replay_only=replay_only)
        self._runtime = runtime
        self.retry_policy = retry
        """The workflow's default retry policy (of its steps and children's
        compensations)."""
        self._in_memory_sleep = in_memory_sleep
        self._steps_per_checkpoint = steps_per_checkpoint
        self._advance_seconds = advance_seconds
        self._advance_until: float | None = None
        """When this advance stops starting new steps (set by its first)."""
        self._checkpoint = checkpoint
        """Commits the journal so far without ending the advance (None:
        only the advance's end commits it)."""
        self._checkpoint_lock = trio.Lock()
        self._step_types = StepTypes() if step_types is None else step_types
        """The steps' return types (the definition's, shared by its runs)."""
        self._transactional = False
        """Whether a transactional step ran in this advance (its SQL commits
        only with the advance: no checkpoint may record it before)."""
        self.compensations = self.replay.compensations
        self.started = self.replay.started
        self._transaction_lock = trio.Lock()

    # ------------------------------------------------------------------
    # Encoding

    def encode(self, value: object, tp: object) -> bytes:
        primitive = self._runtime.converter.unstructure(value, tp)
        return msgpack.packb(primitive)  # type: ignore[no-any-return]

    def decode(self, data: bytes, tp: Any) -> Any:
        return self._runtime.converter.structure(msgpack.unpackb(data), tp)

    # ------------------------------------------------------------------
    # Recorded values

    def _record(self, kind: Kind, make: Callable[[], object]) -> object:
        replay = self.replay
        position, entry = replay.take(kind, kind.value)
        if entry is not None:
            assert entry.value is not None
            return msgpack.unpackb(entry.value)
        if replay.replay_only:
            replay.stop(position, kind, kind.value)
        value = make()
        replay.record(Entry(kind, kind.value, position, msgpack.packb(value)))
        return value

    def now(self) -> datetime:
        """The current time, recorded: the same on every replay."""
        stamp = self._record(Kind.NOW, self._runtime.now)
        return datetime.fromtimestamp(cast("float", stamp), UTC)

    def random(self) -> _random.Random:
        """A random generator seeded with a recorded seed: it yields the
        same numbers on every replay."""
        seed = self._record(Kind.RANDOM, lambda: int(self._runtime.new_id()))
        return _random.Random(cast("int", seed))

    def new_id(self) -> Snowflake:
        """A new cluster-unique id, recorded: the same on every replay."""
        value = self._record(Kind.NEW_ID, lambda: int(self._runtime.new_id()))
        return Snowflake(cast("int", value))

    def patched(self, change_id: str) -> bool:
        """Whether this execution takes the new branch of a code change.

        ``if ctx.patched("free-shipping"): <new code> else: <old code>``
        lets executions that ran the old code past this point replay it,
        while the others (new ones, and old ones that had not got here yet)
        take the new code. Decided on the first call for ``change_id`` in
        the execution and recorded: False if the journal holds an operation
        at the position the call is at (the old code went past it), True
        otherwise; every later call (and replay) returns the same. It takes
        no position itself. Once no execution that took the old branch is
        running, delete the old branch and the call.

        Raises:
            TypeError: ``change_id`` is not a non-empty str.
            NonDeterminismError, WorkflowUsageError: as the other operations.
        """
        if not isinstance(cast("object", change_id), str) or not change_id:
            raise TypeError(f"a change id must be a non-empty str, got {change_id!r}")
        replay = self.replay
        decided = replay.patches.get(change_id)
        if decided is not None:
            return decided
        if replay.problem is not None:
            raise replay.problem
        scope = replay.scope()
        decided = (*scope.path, scope.cursor) not in replay.index
        replay.patches[change_id] = decided
        return decided

    # ------------------------------------------------------------------
    # Steps

    async def step(
        self,
        fn: Callable[[A], Awaitable[R]],
        arg: A,
        /,
        *,
        name: str | None = None,
        retry: RetryPolicy | None = None,
        compensate: Callable[[A, R], Awaitable[None]] | None = None,
        transactional: bool = False,
    ) -> R:
        """Run ``fn(arg)`` once for the execution, or return its recorded result.

        Args:
            fn: ``async def fn(arg: A) -> R``; its return annotation is the
                result's type (encoded with the runner's converter).
            arg: its argument (not recorded: the code computes it again).
            name: the step's name in the journal (default ``fn.__name__``);
                keep it stable while executions run.
            retry: attempts of a failing ``fn`` (default: the workflow's
                policy); between attempts the execution waits on a durable
                timer.
            compensate: ``async def undo(arg: A, result: R) -> None``, run if
                the workflow fails or is interrupted after this step.
            transactional: run each attempt in a savepoint of the advance's
                storage transaction, reachable with
                `trio_cluster.current_transaction` (its SQL and persisted
                sends commit with the step's result, exactly once; a failed
                attempt's are rolled back). Transactional steps of one
                advance take turns. Otherwise ``fn`` runs outside any
                transaction: persisted sends are stored at once, and
                persisted calls may wait for their replies.

        ``fn`` runs at least once, and its outcome is recorded exactly once:
        once recorded, ``fn`` never runs again for this execution.

        Raises:
            StepFailedError: ``fn`` failed for good (now or on the run this
                replays).
            NonDeterminismError: the journal recorded another operation here.
        """
        step_name = name if name is not None else getattr(fn, "__name__", "step")
        policy = retry if retry is not None else self.retry_policy
        result_type = self._step_types.return_type(fn)
        position, entry = self.replay.take(Kind.STEP, step_name)
        if entry is None:
            entry = await self._run_step(
                position, step_name, fn, arg, policy, transactional, result_type
            )
        if entry.error is not None:
            raise StepFailedError(step_name, entry.error.type, entry.error.message)
        assert entry.value is not None
        value: R = self.decode(entry.value, result_type)
        if compensate is not None:
            self.compensations.append(
                Compensation(
                    position, step_name, compensate, arg, value, policy, transactional
                )
            )
        return value

    async def _run_step(
        self,
        position: Position,
        name: str,
        fn: Callable[[A], Awaitable[R]],
        arg: A,
        policy: RetryPolicy,
        transactional: bool,
        result_type: Any,
    ) -> Entry:
        """Attempt a new step; its entry once it succeeded or failed for good.

        Raises:
            Yield: its task ran a step in this advance already, or a retry
                is not due yet (or was just scheduled).
        """
        replay = self.replay
        scope = await replay.begin(position, Kind.STEP, name)
        now = self._runtime.now()
        if self._advance_until is None:
            self._advance_until = now + self._advance_seconds
        if scope.ran_step:
            if now >= self._advance_until:
                raise Yield(None)  # end the advance (it commits)
            if scope.steps_run >= self._steps_per_checkpoint:
                # Commit the task's previous steps first.
                if not await self._commit_so_far():
                    raise Yield(None)
                scope.steps_run = 0
        key = (position, False)
        pending = replay.retries.get(key)
        if pending is not None and pending.not_before > now:
            raise Yield(pending.not_before)
        attempt = 1 if pending is None else pending.attempts + 1
        try:
            # Timed for the metrics (`workflow_metrics`).
            value = await run_step(lambda: self.attempt(fn, arg, transactional))
        except Exception as exc:
            if policy.retries(attempt, exc):
                unit = _random.Random(
                    f"{self.execution_id}/{dotted(position)}/{attempt}"
                )
                at = now + policy.backoff.delay(attempt - 1, unit.random())
                replay.retries[key] = Retry(position, attempt, at)
                raise Yield(at) from exc
            failure = Failure(type(exc).__name__, str(exc))
            entry = Entry(Kind.STEP, name, position, error=failure, attempts=attempt)
        else:
            data = self.encode(value, result_type)
            entry = Entry(Kind.STEP, name, position, data, attempts=attempt)
        replay.retries.pop(key, None)
        replay.record(entry)
        scope.ran_step = True
        scope.steps_run += 1
        return entry

    async def _commit_so_far(self) -> bool:
        """Checkpoint the journal recorded so far (the advance goes on);
        False if it cannot be: only the advance's end commits a journal
        that records a transactional step (with its SQL) or a child's start
        (sent with it).

        Raises:
            PersistenceError and the fencing errors of
            `trio_cluster._durable.checkpoint_state` (the advance fails and
            runs again).
        """
        replay = self.replay
        if (
            self._checkpoint is None
            or self._transactional
            or replay.started
            or replay.problem is not None
        ):
            return False
        async with self._checkpoint_lock:
            await self._checkpoint(replay)
        return True

    async def attempt(
        self, fn: Callable[[A], Awaitable[R]], arg: A, transactional: bool
    ) -> R:
        """One attempt of a step (or a compensation): in a savepoint of the
        current transaction (transactional), or outside any transaction."""
        if transactional:
            self._transactional = True
            transaction = current_transaction()
            async with self._transaction_lock, transaction.savepoint():
                return await fn(arg)
        with outside_transaction():
            return await fn(arg)

    def open_nursery(self) -> AbstractAsyncContextManager[StepNursery]:
        """A nursery for concurrent operations:
        ``async with ctx.open_nursery() as n: n.start_soon(fn, *args)``.

        Each task started in it numbers its operations apart (by the order
        it was started, never by the order things finish), so every replay
        finds each task's recorded results; the tasks run their next steps
        concurrently, in one advance. Trio's rules hold: the block waits for
        its tasks, an exception in one cancels the others and propagates in
        an `ExceptionGroup` (``except* StepFailedError``), and
        ``n.cancel_scope.cancel()`` cancels them. Do not start tasks that use
        ``ctx`` in any other nursery (`WorkflowUsageError`).

        Raises:
            NonDeterminismError: the journal recorded another operation here.
        """
        position, entry = self.replay.take(Kind.NURSERY, Kind.NURSERY.value)
        return open_step_nursery(self.replay, position, new=entry is None)

    # ------------------------------------------------------------------
    # Time and signals

    async def sleep(self, seconds: float) -> None:
        """Sleep ``seconds`` of wall time, durably.

        The end time is recorded. Up to the workflow's ``in_memory_sleep``,
        it sleeps in the running handler; longer, the execution yields and a
        durable timer (a persisted ``deliver_at`` message) wakes it: nothing
        stays in memory, the entity may passivate, and a failover or restart
        sleeps only what remains.

        Raises:
            NonDeterminismError: the journal recorded another operation here.
        """
        replay = self.replay
        position, entry = replay.take(Kind.SLEEP, Kind.SLEEP.value)
        if entry is None:
            scope = await replay.begin(position, Kind.SLEEP, Kind.SLEEP.value)
            until = self._runtime.now() + max(0.0, float(seconds))
            replay.record(Entry(Kind.SLEEP, Kind.SLEEP.value, position, until=until))
        elif replay.replay_only:
            return  # what follows tells whether it ended
        else:
            assert entry.until is not None
            until = entry.until
            scope = replay.scope()
        remaining = until - self._runtime.now()
        if remaining <= 0:
            return
        if remaining <= self._in_memory_sleep and not scope.ran_step:
            await trio.sleep(remaining)
        else:
            raise Yield(until)

    async def wait_signal(
        self,
        name: str,
        type_: type[T],
        *,
        timeout: float | None = None,  # noqa: ASYNC109 - durable, see below
    ) -> T:
        """Wait for the signal ``name`` (`WorkflowHandle.signal`), durably.

        A signal is a value set once per name: the first one sent is the
        one every wait for that name returns, even one that arrived before
        the wait. ``timeout`` is durable (a persisted timer), which is why
        this call takes one instead of a cancel scope.

        Raises:
            SignalTimeoutError: ``timeout`` seconds passed first (recorded).
            NonDeterminismError: the journal recorded another operation here.
            cattrs errors: the payload is not a ``type_``.
        """
        replay = self.replay
        position, entry = replay.take(Kind.SIGNAL, name)
        if entry is None:
            await replay.begin(position, Kind.SIGNAL, name)
            until = None if timeout is None else self._runtime.now() + max(0.0, timeout)
            entry = Entry(Kind.SIGNAL, name, position, until=until)
            replay.record(entry)
        elif not entry.resolved:
            if replay.replay_only:
                replay.stop(position, Kind.SIGNAL, name)
            await trio.lowlevel.checkpoint()
        if not entry.resolved:
            payload = replay.journal.signal(name)
            if payload is not None:
                entry = attrs.evolve(entry, value=payload)
            elif entry.until is not None and self._runtime.now() >= entry.until:
                timed_out = Failure("SignalTimeoutError", f"no signal {name!r}")
                entry = attrs.evolve(entry, error=timed_out)
            else:
                raise Yield(entry.until, waiting=True)
            replay.update(entry)
        if entry.error is not None:
            raise SignalTimeoutError(f"no signal {name!r} before its timeout")
        assert entry.value is not None
        return self.decode(entry.value, type_)  # type: ignore[no-any-return]

    # ------------------------------------------------------------------
    # Child workflows

    async def child(
        self,
        workflow: Workflow[A, R],
        arg: A,
        /,
        *,
        execution_id: str | None = None,
        compensate: Callable[[A, R], Awaitable[None]] | None = None,
    ) -> R:
        """Start an execution of ``workflow`` as this one's child and wait,
        durably, for its result.

        The child's execution id is recorded: ``execution_id``, else one
        derived from this execution's id and the call's position. The start
        is stored with this advance's commit (once); this execution then
        waits with no task and no timer until the child, when it ends, tells
        it in a persisted message. If this execution is interrupted (or
        fails) while the child runs, the child is interrupted and this
        execution's compensation waits for it to end. The child runs wherever
        its workflow's entity is hosted. An existing execution with that id
        is adopted as is (it tells this one when it ends).

        Args:
            compensate: ``async def undo(arg: A, result: R) -> None``, run if
                this workflow fails or is interrupted after the child
                completed (under the workflow's retry policy).

        Raises:
            ChildWorkflowFailedError: the child ended failed or compensated.
            InvalidIdError: ``execution_id`` is not a valid entity id.
            NonDeterminismError: the journal recorded another operation here.
        """
        return await await_child(
            self, workflow, arg, execution_id=execution_id, compensate=compensate
        )


class StepTypes:
    """The return annotations of step functions, each resolved once (a
    workflow definition keeps one): resolving string annotations costs
    ~17 µs, at every step otherwise. Keyed weakly by the function (a
    method's underlying function): a step made anew at each run (a lambda)
    is resolved each time, and nothing is kept for it."""

    __slots__ = ("_known",)

    def __init__(self) -> None:
        self._known: weakref.WeakKeyDictionary[Callable[..., Any], Any] = (
            weakref.WeakKeyDictionary()
        )

    def return_type(self, fn: Callable[..., Any]) -> Any:
        """``fn``'s return annotation (Any if it has none, or if it does not
        resolve)."""
        key = getattr(fn, "__func__", fn)
        try:
            return self._known[key]
        except (KeyError, TypeError):  # not yet, or not weakly referable
            pass
        try:
            found = typing.get_type_hints(fn).get("return", Any)
        except Exception:
            found = Any
        with contextlib.suppress(TypeError):
            self._known[key] = found
        return found
