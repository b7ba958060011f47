"""`Workflows` and `WorkflowHandle`: start and follow executions (delivery part)."""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING, Any, Generic, TypeVar, cast

import msgpack

from trio_cluster import RemoteError, Runner, RunnerUnavailableError

from ._errors import WorkflowFailedError
from ._history import WorkflowHistory
from ._records import (
    TERMINAL,
    GetInfo,
    GetJournal,
    Interrupt,
    Resume,
    SignalMessage,
    Start,
    Status,
    WorkflowInfo,
)

if TYPE_CHECKING:
    from ._definition import Workflow

__all__ = ["WorkflowHandle", "Workflows"]

A = TypeVar("A")
R = TypeVar("R")


class Workflows(Generic[A, R]):
    """Starts executions of one workflow through one runner (`Workflow.client`)."""

    def __init__(self, definition: Workflow[A, R], runner: Runner) -> None:
        if not isinstance(runner, Runner):
            raise TypeError(f"runner must be a Runner, got {runner!r}")
        self._definition = definition
        self._runner = runner
        self._entities = runner.client(definition.entity)

    def _encode(self, value: object, tp: object) -> bytes:
        return msgpack.packb(self._runner.converter.unstructure(value, tp))  # type: ignore[no-any-return]

    def execution_id(self, arg: A) -> str:
        """The execution id ``start(arg)`` uses without ``execution_id``:
        the definition's ``idempotency_key(arg)``, else a digest of the
        encoded argument (so the same argument is the same execution)."""
        key = self._definition.idempotency_key
        if key is not None:
            return key(arg)
        digest = hashlib.sha256(self._encode(arg, self._definition.arg_type))
        return digest.hexdigest()[:32]

    def get(self, execution_id: str) -> WorkflowHandle[R]:
        """The handle of the execution ``execution_id`` (started or not)."""
        return WorkflowHandle(self._definition, self._runner, execution_id)

    async def start(
        self, arg: A, *, execution_id: str | None = None
    ) -> WorkflowHandle[R]:
        """Start an execution (idempotent: starting an execution id again
        does nothing, whatever its argument).

        Returns once the start is stored (it then runs, at least to its
        first yield, even if this runner stops). On cancellation it may or
        may not be stored; start it again with the same id to be sure.

        Raises:
            MalformedMessageError: ``arg`` does not encode as the
                workflow's argument type.
            InvalidIdError: a bad execution id.
            PersistenceError: storage failed; it may not be started.
        """
        ident = execution_id if execution_id is not None else self.execution_id(arg)
        payload = self._encode(arg, self._definition.arg_type)
        # Stored, not waited for: the owner runs its first advance in the
        # start handler itself (`WorkflowEntity.start`).
        await self._entities(ident).start.discard(Start(payload))  # type: ignore[attr-defined]
        return self.get(ident)

    async def execute(self, arg: A, *, execution_id: str | None = None) -> R:
        """``start`` it, then wait for its ``result``.

        Raises:
            WorkflowFailedError: it ended failed or compensated.
            (and those of `start`)
        """
        handle = await self.start(arg, execution_id=execution_id)
        return await handle.result()


class WorkflowHandle(Generic[R]):
    """One execution, followed through a runner (`Workflows.get`)."""

    def __init__(
        self, definition: Workflow[Any, R], runner: Runner, execution_id: str
    ) -> None:
        self._definition = definition
        self._runner = runner
        self.execution_id = execution_id
        """The execution's id."""
        self._entity: Any = runner.client(definition.entity)(execution_id)

    async def poll(self) -> WorkflowInfo:
        """The execution's committed status (`WorkflowInfo`).

        Raises:
            RemoteError, RunnerUnavailableError: its entity was unreachable.
        """
        async with self._entity.watch(GetInfo()) as infos:
            async for info in infos:
                return info  # type: ignore[no-any-return]
        raise AssertionError("the watch stream always yields")  # pragma: no cover

    async def result(self) -> R:
        """Wait until the execution ends; its result.

        Waits through suspensions and restarts (re-opening its watch when
        its entity restarts or moves). Keeps the execution's entity in
        memory while it waits. On cancellation nothing happens to the execution.

        Raises:
            WorkflowFailedError: it ended failed or compensated.
        """
        while True:
            try:
                async with self._entity.watch(GetInfo()) as infos:
                    async for info in infos:
                        if info.status in TERMINAL:
                            return self._outcome(info)
            except (RemoteError, RunnerUnavailableError):
                pass  # its entity restarted or moved: watch it again

    def _outcome(self, info: WorkflowInfo) -> R:
        if info.status is Status.COMPLETED:
            assert info.result is not None
            primitive = msgpack.unpackb(info.result)
            return self._runner.converter.structure(  # type: ignore[no-any-return]
                primitive, self._definition.result_type
            )
        raise WorkflowFailedError(
            self.execution_id,
            info.status.value,
            str(info.error),
            info.status is Status.COMPENSATED,
        )

    async def signal(self, name: str, payload: object) -> None:
        """Send the signal ``name`` (the first of each name counts; later
        ones are ignored). Stored before it returns.

        Raises:
            TypeError: ``name`` is not a non-empty str.
            PersistenceError: storage failed; it may not be stored.
        """
        if not isinstance(cast("object", name), str) or not name:
            raise TypeError(f"a signal name must be a non-empty str, got {name!r}")
        data = msgpack.packb(self._runner.converter.unstructure(payload))
        await self._entity.signal(SignalMessage(name, data))

    async def interrupt(self, reason: str = "") -> None:
        """Stop the execution: its compensations run (newest first), and it
        ends compensated. Does nothing to an execution that ended.

        Raises:
            PersistenceError: storage failed; it may not be interrupted.
        """
        await self._entity.interrupt(Interrupt(reason))

    async def history(self) -> WorkflowHistory:
        """The execution's committed journal (`WorkflowHistory`): to look at,
        or to keep and replay against new code
        (`trio_cluster.testing.replay_workflow`).

        Raises:
            RemoteError, RunnerUnavailableError: its entity was unreachable.
        """
        journal = await self._entity.history(GetJournal())
        return WorkflowHistory(self._definition.name, self.execution_id, journal)

    async def resume(self) -> None:
        """Replay a suspended execution again (after deploying fixed code).

        Raises:
            PersistenceError: storage failed.
        """
        await self._entity.resume(Resume())
