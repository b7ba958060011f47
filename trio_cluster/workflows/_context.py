"""`WorkflowContext`: the workflow function's journaled operations (delivery part).

Theory of operation: each time the execution advances, its workflow
function runs again from the start against the journal (*replay*). Every
operation takes the next sequence number. If the journal has an entry
there, the operation checks it is the same kind and name (else
`NonDeterminismError`) and returns the recorded outcome without running
anything. At the end of the journal it runs for real and appends its
entry, in the transaction of the handler that advances the execution.

At most one step runs per advance: a second new step (or a sleep, a wait)
*yields* (`Yield`, a `BaseException` the workflow function cannot catch by
accident) and the entity handler commits the journal, with a wake message
(now, or at a time) that advances it again. So each step's result is
committed before the next step starts, and a replay after a crash,
failover or passivation skips every committed step.
"""

from __future__ import annotations

import random as _random
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, TypeVar

import msgpack
import trio

from trio_cluster import RetryPolicy, Snowflake

from ._errors import NonDeterminismError, SignalTimeoutError, StepFailedError
from ._metrics import run_step
from ._records import Entry, Failure, Kind

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from trio_cluster import Runner

    from ._records import Journal

__all__ = ["Compensation", "WorkflowContext", "Yield"]

A = TypeVar("A")
R = TypeVar("R")
T = TypeVar("T")


class Yield(BaseException):
    """Stop this advance here; commit the journal and wake at ``at`` (None:
    now), or wait for a signal with no timer (``waiting``)."""

    def __init__(self, at: float | None, *, waiting: bool = False) -> None:
        super().__init__(at, waiting)
        self.at = at
        self.waiting = waiting


class Compensation:
    """A journaled step's compensation, as registered by the replay."""

    __slots__ = ("arg", "fn", "name", "result", "retry", "seq")

    def __init__(
        self,
        seq: int,
        name: str,
        fn: Callable[[Any, Any], Awaitable[None]],
        arg: object,
        result: object,
        retry: RetryPolicy,
    ) -> None:
        self.seq, self.name, self.fn = seq, name, fn
        self.arg, self.result, self.retry = arg, result, retry


class WorkflowContext:
    """What a workflow function records its operations through.

    Use only its methods for anything that must be the same on replay
    (time, randomness, ids, effects): the function runs again from the start
    each time the execution advances.
    """

    def __init__(
        self,
        execution_id: str,
        journal: Journal,
        runner: Runner,
        *,
        retry: RetryPolicy,
        in_memory_sleep: float,
        replay_only: bool = False,
    ) -> None:
        self.execution_id = execution_id
        """The execution's id (its idempotency key)."""
        self._journal = journal
        self._runner = runner
        self._retry = retry
        self._in_memory_sleep = in_memory_sleep
        self.entries: list[Entry] = list(journal.entries)
        self.attempts = journal.attempts
        self.compensations: list[Compensation] = []
        self.problem: NonDeterminismError | None = None
        self.cursor = 0
        self._ran_step = False
        self._replay_only = replay_only

    # ------------------------------------------------------------------
    # Replay machinery

    def _next(self, kind: Kind, name: str) -> Entry | None:
        """Take the next sequence number: its recorded entry (checked to be
        ``kind``/``name``), or None at the end of the journal.

        Raises:
            NonDeterminismError: the entry is of another kind or name (also
                on every later call, once one was found).
        """
        if self.problem is not None:
            raise self.problem
        seq = self.cursor
        self.cursor += 1
        if seq >= len(self.entries):
            if self._replay_only:
                raise Yield(None)  # collecting compensations: run nothing new
            return None
        entry = self.entries[seq]
        if entry.kind is not kind or entry.name != name:
            self.problem = NonDeterminismError(
                self.execution_id,
                seq,
                f"{entry.kind.value} {entry.name!r}",
                f"{kind.value} {name!r}",
            )
            raise self.problem
        return entry

    def _now(self) -> float:
        return self._runner.clock.now()

    def _encode(self, value: object, tp: object) -> bytes:
        primitive = self._runner.converter.unstructure(value, tp)
        return msgpack.packb(primitive)  # type: ignore[no-any-return]

    def _decode(self, data: bytes, tp: Any) -> Any:
        return self._runner.converter.structure(msgpack.unpackb(data), tp)

    def _record(self, kind: Kind, value: object) -> object:
        entry = self._next(kind, kind.value)
        if entry is not None:
            assert entry.value is not None
            return msgpack.unpackb(entry.value)
        self.entries.append(Entry(kind, kind.value, msgpack.packb(value)))
        return value

    # ------------------------------------------------------------------
    # Recorded values

    def now(self) -> datetime:
        """The current time, recorded: the same on every replay."""
        return datetime.fromtimestamp(float(self._record(Kind.NOW, self._now())), UTC)  # type: ignore[arg-type]

    def random(self) -> _random.Random:
        """A random generator seeded with a recorded seed: it yields the
        same numbers on every replay."""
        seed = self._record(Kind.RANDOM, int(self._runner.new_id()))
        return _random.Random(seed)  # type: ignore[arg-type]

    def new_id(self) -> Snowflake:
        """A new cluster-unique id, recorded: the same on every replay."""
        return Snowflake(int(self._record(Kind.NEW_ID, int(self._runner.new_id()))))  # type: ignore[call-overload]

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

        ``fn`` runs at least once, and its result is recorded exactly once:
        once recorded, ``fn`` never runs again for this execution.

        Raises:
            StepFailedError: ``fn`` failed for good (now or on the run this
                replays).
            NonDeterminismError: the journal recorded another operation here.
        """
        step_name = name if name is not None else getattr(fn, "__name__", "step")
        policy = retry if retry is not None else self._retry
        result_type = _return_type(fn)
        seq = self.cursor
        entry = self._next(Kind.STEP, step_name)
        if entry is not None:
            if entry.error is not None:
                raise StepFailedError(step_name, entry.error.type, entry.error.message)
            assert entry.value is not None
            value: R = self._decode(entry.value, result_type)
        else:
            if self._ran_step:
                raise Yield(None)  # commit the step that ran first
            await trio.lowlevel.checkpoint()
            try:
                value = await run_step(fn, arg)  # timed for the metrics
            except Exception as exc:
                failure = Failure(type(exc).__name__, str(exc))
                attempt = self.attempts + 1
                if policy.retries(attempt, exc):
                    self.attempts = attempt
                    unit = _random.Random(f"{self.execution_id}/{seq}/{attempt}")
                    delay = policy.backoff.delay(attempt - 1, unit.random())
                    raise Yield(self._now() + delay) from exc
                self.entries.append(
                    Entry(Kind.STEP, step_name, error=failure, attempts=attempt)
                )
                self.attempts = 0
                self._ran_step = True
                raise StepFailedError(step_name, failure.type, failure.message) from exc
            self.entries.append(
                Entry(
                    Kind.STEP,
                    step_name,
                    self._encode(value, result_type),
                    attempts=self.attempts + 1,
                )
            )
            self.attempts = 0
            self._ran_step = True
        if compensate is not None:
            self.compensations.append(
                Compensation(seq, step_name, compensate, arg, value, policy)
            )
        return value

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
        entry = self._next(Kind.SLEEP, Kind.SLEEP.value)
        if entry is None:
            until = self._now() + max(0.0, float(seconds))
            self.entries.append(Entry(Kind.SLEEP, Kind.SLEEP.value, until=until))
        else:
            assert entry.until is not None
            until = entry.until
        remaining = until - self._now()
        if remaining <= 0:
            await trio.lowlevel.checkpoint()
        elif self._replay_only:
            raise Yield(None)
        elif remaining <= self._in_memory_sleep and not self._ran_step:
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
        seq = self.cursor
        entry = self._next(Kind.SIGNAL, name)
        if entry is None:
            until = None if timeout is None else self._now() + max(0.0, timeout)
            entry = Entry(Kind.SIGNAL, name, until=until)
            self.entries.append(entry)
        if not entry.resolved:
            if self._replay_only:
                raise Yield(None)
            payload = self._journal.signal(name)
            if payload is not None:
                entry = Entry(Kind.SIGNAL, name, payload, until=entry.until)
            elif entry.until is not None and self._now() >= entry.until:
                timed_out = Failure("SignalTimeoutError", f"no signal {name!r}")
                entry = Entry(Kind.SIGNAL, name, error=timed_out, until=entry.until)
            else:
                raise Yield(entry.until, waiting=True)
            self.entries[seq] = entry
        await trio.lowlevel.checkpoint()
        if entry.error is not None:
            raise SignalTimeoutError(f"no signal {name!r} before its timeout")
        assert entry.value is not None
        return self._decode(entry.value, type_)  # type: ignore[no-any-return]


def _return_type(fn: Callable[..., Any]) -> Any:
    """``fn``'s return annotation (Any if it has none)."""
    import typing

    try:
        hints = typing.get_type_hints(fn)
    except Exception:
        return Any
    return hints.get("return", Any)
