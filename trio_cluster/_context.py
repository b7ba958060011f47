"""Context lookups: the current runner and the current entity (Trio driver).

Both live in `contextvars`, never in module globals, so several runners can
share one process (tests, the simulator, the demo). Tasks a runner starts
inherit its context; handlers that run in a caller's task get the variables
set around the handler.
"""

from __future__ import annotations

from contextvars import ContextVar
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ._core._addresses import EntityAddress
    from ._entity import Entity
    from ._runner import Runner
    from ._storage_abc import StorageTransaction

__all__ = ["current_entity_address", "current_runner", "current_transaction"]

current_runner_var: ContextVar[Runner] = ContextVar("trio_cluster.runner")
current_entity_var: ContextVar[Entity | None] = ContextVar(
    "trio_cluster.entity", default=None
)
current_transaction_var: ContextVar[StorageTransaction | None] = ContextVar(
    "trio_cluster.transaction", default=None
)


def current_runner() -> Runner:
    """The runner whose task (or handler) is calling.

    Raises:
        RuntimeError: called outside a runner's tasks and handlers.
    """
    try:
        return current_runner_var.get()
    except LookupError:
        raise RuntimeError(
            "no current runner: call this from an entity handler, a singleton,"
            " or a task started inside open_runner()"
        ) from None


def current_entity_address() -> EntityAddress | None:
    """The address of the entity whose handler is running, or None."""
    entity = current_entity_var.get()
    return None if entity is None else entity.address


def current_transaction() -> StorageTransaction:
    """The storage transaction of the running transactional handler
    (``@rpc(persisted=True, transactional=True)``): run your SQL through its
    ``execute`` so it commits atomically with the handler's reply.

    Raises:
        RuntimeError: called outside a transactional handler.
    """
    transaction = current_transaction_var.get()
    if transaction is None:
        raise RuntimeError(
            "no current transaction: only handlers declared with"
            " @rpc(persisted=True, transactional=True) run in one"
        )
    return transaction
