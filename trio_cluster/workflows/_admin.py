"""`WorkflowAdmin`: executions seen from storage, for operators (delivery part).

What ``trio-cluster workflows`` runs, usable from any runner of the cluster
without the workflows' code: it knows executions by workflow *name* and
execution id only.

* Listing and counting read the executions' durable state
  (`trio_cluster.abc.StateStorage.list_states`/``count_states``): each
  journal is saved labelled with its status, so a listing filtered by status
  and the counts per workflow and status are index reads that decode no
  journal (the listing decodes the page it returns).
* ``purge`` deletes finished executions older than a given age (their
  durable state), a page at a time: the retention of journals, run by an
  operator or a scheduled job.
* ``signal``, ``interrupt`` and ``resume`` send the execution the same
  persisted messages its `WorkflowHandle` sends, through a stand-in entity
  class of the workflow's entity type (same type name, shard group and
  handlers, no function): they are stored before the call returns and run
  when a runner that hosts the workflow has it. A message is sent only to an
  execution that is stored, and only if this runner computes the same shard
  for it as the one it is stored in (else its ``shards_per_group`` is not
  the cluster's, and the message would reach another incarnation).
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any, cast

import attrs
import msgpack

from trio_cluster import ClusterError, ConfigError, Runner, durable
from trio_cluster.abc import MessageStorage, StateQuery
from trio_cluster.serialization import Codec

from .._core._addresses import EntityAddress, EntityId, ShardId
from .._core._checks import (
    ARGUMENT,
    non_negative_seconds,
    part_name,
    positive_count,
)
from ._entity import WorkflowEntity, info_of
from ._peers import TYPE_PREFIX
from ._records import (
    TERMINAL,
    Interrupt,
    Journal,
    Resume,
    SignalMessage,
    Status,
    WorkflowInfo,
)

if TYPE_CHECKING:
    import builtins

    from trio_cluster import Entity
    from trio_cluster.abc import ListedState

__all__ = [
    "TYPE_PREFIX",
    "ExecutionNotFoundError",
    "WorkflowAdmin",
    "WorkflowExecution",
    "workflow_of",
]


_PAGE = 500
"""Executions `WorkflowAdmin.purge` reads at once."""


def workflow_of(entity_type: str) -> str:
    """The workflow name of an execution's entity type."""
    return entity_type.removeprefix(TYPE_PREFIX)


class ExecutionNotFoundError(ClusterError, LookupError):
    """No execution of that workflow and id is stored (never started, or
    its entity's state was cleared)."""


@attrs.frozen
class WorkflowExecution:
    """An execution as stored: its committed journal and where it stands."""

    workflow: str
    execution_id: str
    status: Status | None
    """Its status (from the journal; from the stored label if the journal
    does not decode; None if neither tells)."""
    journal: Journal | None
    """The committed journal (None: it does not decode, see ``problem``)."""
    version: int
    """How many times it was saved (one per committed advance or message)."""
    saved_at: float
    """When it was last saved (Unix seconds, the saving runner's clock)."""
    shard: ShardId
    problem: str | None = None
    """Why the journal does not decode."""

    @property
    def info(self) -> WorkflowInfo | None:
        """Its `WorkflowInfo` (what `WorkflowHandle.poll` answers)."""
        return None if self.journal is None else info_of(self.journal)


class WorkflowAdmin:
    """Lists, shows, counts, signals, interrupts and resumes executions by
    workflow name, through ``runner`` (any runner of the cluster, a
    client-only one included).

    Every async method checkpoints, raises `PersistenceError` when storage
    fails, and `ConfigError` for an invalid workflow name or when the
    runner's storage keeps no durable state. Cancelled, it leaves nothing
    half done (a message is stored or not).
    """

    def __init__(self, runner: Runner) -> None:
        if not isinstance(runner, Runner):
            raise TypeError(f"runner must be a trio_cluster.Runner, got {runner!r}")
        self._runner = runner
        self._codec: Codec[Journal] = Codec(
            runner.converter, Journal, "workflow journal"
        )

    # ------------------------------------------------------------------
    # Reading

    async def list(
        self,
        *,
        workflow: str | None = None,
        status: Status | None = None,
        after: tuple[str, str] | None = None,
        limit: int = 100,
    ) -> builtins.list[WorkflowExecution]:
        """Up to ``limit`` executions, in order of workflow name then
        execution id (code-point order), after ``after`` (the ``(workflow,
        execution_id)`` of the last one of the previous page).

        Args:
            workflow: only this workflow's (None: every workflow's).
            status: only those with this status.

        Raises:
            ConfigError: an invalid workflow name.
            TypeError, ValueError: an invalid status, cursor or limit.
        """
        if status is not None and not isinstance(cast("object", status), Status):
            raise TypeError(f"status must be a Status, got {status!r}")
        query = self._query(workflow, status)
        cursor = None
        if after is not None:
            if not (isinstance(cast("object", after), tuple) and len(after) == 2):
                raise TypeError(
                    f"after must be a (workflow, execution_id) pair, got {after!r}"
                )
            cursor = (TYPE_PREFIX + part_name("workflow", after[0]), after[1])
        rows = await self._runner.state_storage.list_states(
            query, after=cursor, limit=limit
        )
        return [self._execution(row) for row in rows]

    async def get(self, workflow: str, execution_id: str) -> WorkflowExecution | None:
        """The execution ``execution_id`` of ``workflow``, or None if none
        is stored.

        Raises:
            ConfigError: an invalid workflow name.
            TypeError: ``execution_id`` is not a str.
        """
        if not isinstance(execution_id, str):
            raise TypeError(f"execution_id must be a str, got {execution_id!r}")
        query = attrs.evolve(self._query(workflow, None), entity_id=execution_id)
        rows = await self._runner.state_storage.list_states(query, limit=1)
        return self._execution(rows[0]) if rows else None

    async def counts(self) -> builtins.list[tuple[str, str | None, int]]:
        """How many executions are stored per workflow and status (the
        status's value; None for an execution saved before statuses were
        stored with journals), in order of workflow then status."""
        counts = await self._runner.state_storage.count_states(
            StateQuery(TYPE_PREFIX, prefix=True)
        )
        return [(workflow_of(c.entity_type), c.label, c.count) for c in counts]

    def journal_data(self, journal: Journal) -> dict[str, Any]:
        """``journal`` as plain data (the runner converter's primitives),
        with its encoded values (argument, results, payloads, result)
        decoded to primitives too: for printing and JSON. A value that does
        not decode stays bytes."""
        data = self._runner.converter.unstructure(journal)
        return _decoded(data)  # type: ignore[no-any-return]

    # ------------------------------------------------------------------
    # Acting

    async def signal(
        self, workflow: str, execution_id: str, name: str, payload: object
    ) -> None:
        """Send the execution the signal ``name`` with ``payload`` (encoded
        with the runner's converter: a JSON-like value, or an attrs
        instance), as `WorkflowHandle.signal` does. Stored when it returns.

        Raises:
            ExecutionNotFoundError: no such execution is stored.
            TypeError: ``name`` is not a non-empty str.
            ConfigError: this runner's ``shards_per_group`` is not the
                cluster's (nothing sent).
        """
        if not isinstance(cast("object", name), str) or not name:
            raise TypeError(f"a signal name must be a non-empty str, got {name!r}")
        data = msgpack.packb(self._runner.converter.unstructure(payload))
        ref = await self._stored_ref(workflow, execution_id)
        await ref.signal.discard(SignalMessage(name, data))

    async def interrupt(
        self, workflow: str, execution_id: str, reason: str = ""
    ) -> None:
        """Interrupt the execution (its compensations run), as
        `WorkflowHandle.interrupt` does. Stored when it returns.

        Raises:
            ExecutionNotFoundError, ConfigError: as for `signal`.
        """
        if not isinstance(reason, str):
            raise TypeError(f"reason must be a str, got {reason!r}")
        ref = await self._stored_ref(workflow, execution_id)
        await ref.interrupt.discard(Interrupt(reason))

    async def resume(self, workflow: str, execution_id: str) -> None:
        """Replay a suspended execution again, as `WorkflowHandle.resume`
        does (it does nothing to an execution that is not suspended).
        Stored when it returns.

        Raises:
            ExecutionNotFoundError, ConfigError: as for `signal`.
        """
        ref = await self._stored_ref(workflow, execution_id)
        await ref.resume.discard(Resume())

    # ------------------------------------------------------------------
    # Retention

    async def purge(
        self,
        *,
        older_than: float,
        workflow: str | None = None,
        limit: int = 1000,
    ) -> int:
        """Delete up to ``limit`` finished executions (completed, failed or
        compensated) whose journal was last saved more than ``older_than``
        seconds ago (by this runner's wall clock), of ``workflow`` (None:
        of every workflow); the number deleted. Executions in any other
        status are never deleted. A deleted execution is gone, with its
        stored messages (`MessageStorage.clear_address`, when the storage
        keeps both: the start request too, so that its id is not answered
        from it): its handle's ``poll`` says ``not_started``, and starting
        its id again starts a new execution. The count is of the executions
        found old enough and deleted (by this call or, at the same time, by
        another).

        It reads the finished executions a page at a time (their journals
        are not decoded) and deletes the old ones one by one: call it again
        while it returns ``limit``.

        Raises:
            ConfigError: an invalid workflow name.
            TypeError, ValueError: ``older_than`` or ``limit`` is not a
                finite number >= 0 or an int >= 1.
            PersistenceError: storage failed (what was deleted stays so).

        Cancellation: what was deleted stays deleted.
        """
        older_than = non_negative_seconds("older_than", older_than, errors=ARGUMENT)
        limit = positive_count("limit", limit, errors=ARGUMENT)
        storage = self._runner.state_storage
        messages = storage if isinstance(storage, MessageStorage) else None
        cutoff = self._runner.clock.now() - older_than
        deleted = 0
        for status in sorted(TERMINAL, key=lambda status: status.value):
            query = self._query(workflow, status)
            after: tuple[str, str] | None = None
            while deleted < limit:
                rows = await storage.list_states(query, after=after, limit=_PAGE)
                for row in rows:
                    if row.saved_at < cutoff and deleted < limit:
                        address = EntityAddress(
                            row.entity_type, EntityId(row.entity_id), row.shard
                        )
                        # Its messages first: should the state's deletion
                        # fail then, the execution stays whole (a start of
                        # its id finds it finished), never a start request
                        # without its execution.
                        if messages is not None:
                            await messages.clear_address(address)
                        await storage.delete_state(address)  # if still there
                        deleted += 1
                if len(rows) < _PAGE:
                    break
                after = (rows[-1].entity_type, rows[-1].entity_id)
        return deleted

    # ------------------------------------------------------------------

    def _query(self, workflow: str | None, status: Status | None) -> StateQuery:
        label = None if status is None else status.value
        if workflow is None:
            return StateQuery(TYPE_PREFIX, prefix=True, label=label)
        return StateQuery(TYPE_PREFIX + part_name("workflow", workflow), label=label)

    def _execution(self, row: ListedState) -> WorkflowExecution:
        journal: Journal | None = None
        problem = None
        try:
            journal = self._codec.decode(row.state.payload)
        except Exception as exc:  # a stored row this code cannot read
            problem = f"{type(exc).__name__}: {exc}"
        if journal is not None:
            status: Status | None = journal.status
        else:
            status = _status_of(row.state.label)
        return WorkflowExecution(
            workflow=workflow_of(row.entity_type),
            execution_id=row.entity_id,
            status=status,
            journal=journal,
            version=row.state.version,
            saved_at=row.saved_at,
            shard=row.shard,
            problem=problem,
        )

    async def _stored_ref(self, workflow: str, execution_id: str) -> Any:
        """The handle of a stored execution, on a stand-in class of its
        entity type in the shard group it is stored in."""
        execution = await self.get(workflow, execution_id)
        if execution is None:
            raise ExecutionNotFoundError(
                f"no execution {execution_id!r} of workflow {workflow!r} is stored"
            )
        client = self._runner.client(_stand_in(workflow, execution.shard.group))
        shard = client.address_of(execution_id).shard
        if shard != execution.shard:
            raise ConfigError(
                f"execution {execution_id!r} of workflow {workflow!r} is stored in"
                f" shard {execution.shard}, but this runner places it in shard"
                f" {shard}: set shards_per_group (TRIO_CLUSTER_SHARDS_PER_GROUP)"
                " to the cluster's; nothing was sent"
            )
        return client(execution_id)


def _decoded(value: Any, *, encoded: bool = True) -> Any:
    """``value`` with its encoded bytes decoded (once: bytes inside a
    decoded value stay bytes)."""
    if isinstance(value, bytes):
        if not encoded:
            return value
        try:
            return _decoded(msgpack.unpackb(value), encoded=False)
        except (ValueError, msgpack.UnpackException):
            return value
    if isinstance(value, dict):
        return {k: _decoded(v, encoded=encoded) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_decoded(item, encoded=encoded) for item in value]
    return value


def _status_of(label: str | None) -> Status | None:
    try:
        return None if label is None else Status(label)
    except ValueError:
        return None


@functools.cache
def _stand_in(workflow: str, shard_group: str) -> type[Entity]:
    """The entity class that sends to ``workflow``'s executions in
    ``shard_group`` (it runs nothing: no runner hosts it). On a runner that
    knows the workflow's own class, that class's type is used instead (see
    `trio_cluster._registry`)."""
    namespace = {
        "__tc_stand_in__": True,  # gives way to the workflow's own class
        "type_name": TYPE_PREFIX + workflow,
        "shard_group": shard_group,
        "state": durable(Journal),
        "__module__": __name__,
    }
    name = f"WorkflowStandIn_{workflow.replace('.', '_').replace('-', '_')}"
    return type(name, (WorkflowEntity,), namespace)
