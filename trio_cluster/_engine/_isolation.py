"""Entity code runs in its runner's context, never in its caller's (Trio driver).

Theory of operation. A `contextvars` context belongs to a Trio task: code
sees the context of the task it runs in, and a new task starts with a copy of
the context of the task that spawned it (`trio.Nursery.start_soon` copies the
current one). Left alone, entity code would see whatever its caller had set:
an inline call runs the handler in the caller's own task, and a detached job,
a stream producer or a restart runs in a task spawned by whichever task
happened to start it (often another sender, whose job just finished). And what
entity code sets would stay behind for its caller, or for the next handler
run in the same task (the owner's fast path runs requests from other runners
in a connection's reader task).

So the rule is: every run of entity code (a handler, with ``on_start`` when
the incarnation starts with it; ``on_stop``) starts from a fresh copy of the
runner's *base context* (`base_context`): the context ``open_runner`` was
entered in, with the runtime's own variables set (the current runner; no
current entity, no transaction, no singleton, no call metadata). What the
application set around ``open_runner`` is visible; nothing a caller set is,
and what entity code sets ends with its run. What a handler needs from its
caller travels in the message, or in the call metadata
(`trio_cluster.with_metadata`), which the manager sets in the handler's copy.

Three ways to get there, from the cheapest:

* code that cannot suspend (the one-step fast path) runs synchronously inside
  ``context.run``: one copy of the context and one call;
* a task of the runtime is started by `spawn`, inside ``base.run``, so that
  its task copies the base context and not its spawner's;
* code that can suspend and must stay in the caller's task (an inline
  handler, which keeps the caller's cancellation and needs no task switch)
  is awaited through `run_in`, which runs each of its steps inside
  ``context.run``: one more generator step and one call per suspension.

The base context is never any task's own context (tasks and runs get
copies), so entering it in `spawn` cannot find it already entered.
"""

from __future__ import annotations

import types
from contextvars import Context, copy_context
from typing import TYPE_CHECKING, Any, TypeVar

from .._call_metadata import current_metadata_var
from .._context import (
    current_entity_var,
    current_runner_var,
    current_singleton_var,
    current_transaction_var,
)

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Coroutine, Generator

    import trio

    from .._context import RunnerContext

__all__ = ["base_context", "drive", "run_in", "spawn"]

T = TypeVar("T")


def base_context(runner: RunnerContext) -> Context:
    """The base context of ``runner``'s entity code: a copy of the current
    context (call it where ``open_runner`` was entered) with ``runner`` as the
    current runner and no current entity, transaction, singleton or call
    metadata (a handler runs with its caller's, set in its copy by the
    manager)."""
    context = copy_context()
    context.run(_enter_runner, runner)
    return context


def _enter_runner(runner: RunnerContext) -> None:
    current_runner_var.set(runner)
    current_entity_var.set(None)
    current_transaction_var.set(None)
    current_singleton_var.set(None)
    current_metadata_var.set(None)


def spawn(
    context: Context,
    nursery: trio.Nursery,
    fn: Callable[..., Awaitable[object]],
    *args: object,
) -> None:
    """``nursery.start_soon(fn, *args)``, the new task starting with a copy of
    ``context`` instead of the current task's.

    Raises:
        RuntimeError: the nursery is closed (as `trio.Nursery.start_soon`).
    """
    context.run(nursery.start_soon, fn, *args)


@types.coroutine
def run_in(
    context: Context, coroutine: Coroutine[Any, Any, T]
) -> Generator[Any, Any, T]:
    """Await ``coroutine`` in the current task, with every step of it run in
    ``context``: it sees (and sets) ``context``'s variables, never the
    task's; the task keeps its own cancel scopes, so cancelling the awaiting
    task cancels ``coroutine`` as if awaited directly.

    ``context`` must not be entered elsewhere while this runs (give each run
    a copy of its own).

    Raises:
        BaseException: whatever ``coroutine`` raises.
    """
    send = coroutine.send
    value: Any = None
    error: BaseException | None = None
    while True:
        try:
            if error is None:
                trap = context.run(send, value)
            else:
                trap = context.run(coroutine.throw, error)
        except StopIteration as done:
            return done.value  # type: ignore[no-any-return]
        error = None
        try:
            value = yield trap
        except GeneratorExit:
            context.run(coroutine.close)
            raise
        except BaseException as exc:
            # Thrown in by the scheduler (Trio sends outcomes; it throws
            # only into a task that yielded something foreign): forwarded
            # into the coroutine, which decides; nothing is swallowed here.
            error = exc
            value = None


def drive(coroutine: Coroutine[Any, Any, None]) -> None:
    """Drive a coroutine that cannot suspend (its bytecode has no suspension
    point on the path taken) to completion from synchronous code (inside
    ``context.run``: the one-step way above). It returns None: a ``for``
    loop then ends it without raising StopIteration in Python, which would
    cost more than the rest of the context switch.

    Raises:
        RuntimeError: it suspended after all (closed first).
    """
    # The body is unreachable: the caller checked that it cannot suspend.
    for _ in coroutine.__await__():  # pragma: no cover
        coroutine.close()
        raise RuntimeError("a handler that cannot suspend suspended")
