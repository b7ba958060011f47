"""Compensating an execution: one compensation per advance, newest first (delivery part).

Once the workflow function failed, or the execution was interrupted, each
advance replays the function in replay-only mode (nothing new runs) to
collect the compensations of its recorded steps and children, then takes
the first *item* in reverse order of position (the newest in the code's
structure first: a nursery's tasks in reverse order of starting):

* a compensation not run yet: run it (retried under its step's policy on
  durable timers; when that gives up the execution is suspended), and
  record its position in ``Journal.compensated``;
* a child still running: interrupt it (once: ``Journal.stopping``) and
  wait, with no timer, for it to tell how it ended (``child_done``);
* a child that ended after being interrupted: record its position.

With no item left, the execution is compensated.
"""

from __future__ import annotations

import contextlib
import random as _random
from typing import TYPE_CHECKING

import attrs

from ._records import Kind, Retry, Status, dotted
from ._replay import Compensation, Yield

if TYPE_CHECKING:
    from ._context import WorkflowContext
    from ._entity import WorkflowEntity
    from ._records import Journal, Position

__all__ = ["compensate"]

_STOP = "stop"
_STOPPED = "stopped"

Item = Compensation | tuple[str, str, str]
"""A compensation, or ``(what, workflow, execution id)`` of a child."""


def _items(journal: Journal, ctx: WorkflowContext) -> list[tuple[Position, Item]]:
    """What is left to compensate, newest position first."""
    done = set(journal.compensated)
    items: dict[Position, Item] = {
        c.position: c for c in ctx.compensations if c.position not in done
    }
    ended = {outcome.position for outcome in journal.children}
    for entry in journal.entries:
        position = entry.position
        if entry.kind is not Kind.CHILD or position in done or position in items:
            continue
        assert entry.execution_id is not None
        if position not in ended:
            items[position] = (_STOP, entry.name, entry.execution_id)
        elif position in journal.stopping:
            items[position] = (_STOPPED, entry.name, entry.execution_id)
    return sorted(items.items(), key=lambda item: item[0], reverse=True)


async def compensate(entity: WorkflowEntity) -> None:
    """Take the next item (see the module docstring), or end compensated."""
    journal = entity.state
    if journal.arg is None:
        # Interrupted before its start ran (``start`` returns once the start
        # is stored): nothing ran, nothing to compensate.
        entity.state = attrs.evolve(journal, status=Status.COMPENSATED)
        await entity.finish()
        return
    ctx = entity.context(replay_only=True)
    arg = ctx.decode(journal.arg, entity.definition.arg_type)
    # Replay to collect the compensations of the recorded steps: the
    # function stops where it failed, or at the end of the journal.
    with contextlib.suppress(Yield, Exception):
        await entity.definition.fn(ctx, arg)
    if ctx.replay.problem is not None:
        entity.state = attrs.evolve(
            journal, status=Status.SUSPENDED, problem=str(ctx.replay.problem)
        )
        await entity.schedule(None, waiting=True)
        return
    items = _items(journal, ctx)
    if not items:
        entity.state = attrs.evolve(journal, status=Status.COMPENSATED)
        await entity.finish()
        return
    position, item = items[0]
    if isinstance(item, Compensation):
        await _run(entity, ctx, item)
        return
    what, workflow, execution_id = item
    if what == _STOPPED:
        entity.state = attrs.evolve(
            journal, compensated=(*journal.compensated, position)
        )
        await entity.schedule(None)
        return
    if position not in journal.stopping:
        reason = journal.interrupted or f"its parent failed: {journal.error}"
        await entity.interrupt_children([(workflow, execution_id)], reason)
        entity.state = attrs.evolve(journal, stopping=(*journal.stopping, position))
    await entity.schedule(None, waiting=True)  # until it tells how it ended


async def _run(
    entity: WorkflowEntity, ctx: WorkflowContext, compensation: Compensation
) -> None:
    journal = entity.state
    key = (compensation.position, True)
    retries = dict(ctx.replay.retries)
    pending = retries.pop(key, None)
    now = ctx._runtime.now()
    if pending is not None and pending.not_before > now:
        await entity.schedule(pending.not_before)
        return
    attempt = 1 if pending is None else pending.attempts + 1

    async def undo(_: None) -> None:
        await compensation.fn(compensation.arg, compensation.result)

    try:
        await ctx.attempt(undo, None, compensation.transactional)
    except Exception as exc:
        if compensation.retry.retries(attempt, exc):
            where = dotted(compensation.position)
            unit = _random.Random(f"{ctx.execution_id}/c{where}/{attempt}")
            at = now + compensation.retry.backoff.delay(attempt - 1, unit.random())
            retries[key] = Retry(compensation.position, attempt, at, compensation=True)
            entity.state = attrs.evolve(journal, retries=tuple(retries.values()))
            await entity.schedule(at)
            return
        problem = (
            f"the compensation of step {compensation.name!r}"
            f" (operation {dotted(compensation.position)}) failed {attempt} times:"
            f" {type(exc).__name__}: {exc}"
        )
        entity.state = attrs.evolve(
            journal,
            status=Status.SUSPENDED,
            problem=problem,
            retries=tuple(retries.values()),
        )
        await entity.schedule(None, waiting=True)
        return
    entity.state = attrs.evolve(
        journal,
        compensated=(*journal.compensated, compensation.position),
        retries=tuple(retries.values()),
    )
    await entity.schedule(None)
