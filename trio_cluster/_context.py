"""Context lookups: the current runner, entity and transaction (API).

They live in `contextvars`, never in module globals, so several runners can
share one process (tests, the simulator, the demo). Entity code (handlers,
``on_start``, ``on_stop``) runs in a fresh copy of its runner's base context,
where the runner is set, never in its caller's context, even when it runs in
the caller's task (`trio_cluster._engine._isolation`); the engine sets the
current entity (and transaction) inside that copy.

The engine sets `current_runner_var` to the value the façade gives it at
assembly (the `Runner`), without knowing its type: what the declarative API
may use of it is `RunnerContext`; the public, fully typed lookup is
`trio_cluster.current_runner`.
"""

from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar, Token
from typing import TYPE_CHECKING, Any, Protocol

from ._errors import NoCurrentRunnerError, NotInTransactionError

if TYPE_CHECKING:
    from collections.abc import Iterator

    from ._clock import Clock
    from ._core._addresses import Addressed, EntityAddress, RunnerAddress
    from ._storage_abc import StorageTransaction

__all__ = [
    "RunnerContext",
    "current_entity_address",
    "current_transaction",
    "enter_runner",
    "leave_runner",
    "outside_transaction",
    "runner_context",
]


class RunnerContext(Protocol):
    """What code below the façade may use of the current runner."""

    @property
    def address(self) -> RunnerAddress: ...

    @property
    def clock(self) -> Clock: ...

    def client(self, cls: type[Any], /) -> Any: ...


current_runner_var: ContextVar[RunnerContext] = ContextVar("trio_cluster.runner")
current_entity_var: ContextVar[Addressed | None] = ContextVar(
    "trio_cluster.entity", default=None
)
current_transaction_var: ContextVar[StorageTransaction | None] = ContextVar(
    "trio_cluster.transaction", default=None
)
current_singleton_var: ContextVar[tuple[str, int] | None] = ContextVar(
    "trio_cluster.singleton", default=None
)
"""``(name, shard epoch)`` of the singleton whose task (or a task it started)
is running; set once per singleton start, never per call."""


def runner_context() -> RunnerContext:
    """The runner whose task (or handler) is calling.

    Raises:
        NoCurrentRunnerError: called outside a runner's tasks and handlers.
    """
    try:
        return current_runner_var.get()
    except LookupError:
        raise NoCurrentRunnerError(
            "no current runner: call this from an entity handler, a singleton,"
            " or a task started inside open_runner()"
        ) from None


def enter_runner(context: RunnerContext) -> Token[RunnerContext] | None:
    """Make ``context`` the current runner of this task, unless it already is
    (the common case, checked first because calls do this); returns what to
    give `leave_runner`. Tasks started meanwhile inherit it."""
    if current_runner_var.get(None) is context:
        return None
    return current_runner_var.set(context)


def leave_runner(token: Token[RunnerContext] | None) -> None:
    """Undo `enter_runner`."""
    if token is not None:
        current_runner_var.reset(token)


def current_entity_address() -> EntityAddress | None:
    """The address of the entity whose handler is running, or None."""
    entity = current_entity_var.get()
    return None if entity is None else entity.address


@contextmanager
def outside_transaction() -> Iterator[None]:
    """Run a block of a transactional handler (or of a ``runner.transaction()``
    block) outside its transaction: inside, `current_transaction` raises
    `NotInTransactionError`, persisted messages sent with ``.discard`` are
    stored at once (not with the transaction), and persisted calls may wait
    for their replies. The transaction goes on around the block. (Workflows
    run their steps that are not transactional this way.)"""
    token = current_transaction_var.set(None)
    try:
        yield
    finally:
        current_transaction_var.reset(token)


def current_transaction() -> StorageTransaction:
    """The storage transaction of the running transactional handler
    (``@rpc(persisted=True, transactional=True)``), or of the block of
    ``runner.transaction()``: run your SQL through its ``execute`` so it
    commits atomically with the handler's reply; persisted messages sent
    meanwhile (``.discard``) are saved in it too (the outbox).

    Raises:
        NotInTransactionError: called outside a transactional handler or
            a ``runner.transaction()`` block.
    """
    transaction = current_transaction_var.get()
    if transaction is None:
        raise NotInTransactionError(
            "no current transaction: only handlers declared with"
            " @rpc(persisted=True, transactional=True), runner.transaction()"
            " blocks and workflow steps with transactional=True run in one"
            " (outside_transaction() blocks do not)"
        )
    return transaction
