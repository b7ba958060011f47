"""The calling task's deadline (`trio_cluster._engine._deadline`): the same
value as `trio.current_effective_deadline`, in every arrangement of cancel
scopes.

The scopes here hold no checkpoint: they are read, never waited in.
"""

# ruff: noqa: ASYNC100

from __future__ import annotations

import math

import trio
import trio.testing

from trio_cluster._engine import _deadline
from trio_cluster._engine._deadline import effective_deadline


def _same() -> float:
    ours = effective_deadline()
    assert ours == trio.current_effective_deadline()
    return ours


def test_the_installed_trio_has_the_layout_the_loop_reads():
    # A Trio that renames these falls back to its own function (correct,
    # slower): this says so, so that it is noticed.
    assert effective_deadline is _deadline._walk


async def test_no_deadline_at_all(autojump_clock):
    assert _same() == math.inf
    async with trio.open_nursery():
        with trio.CancelScope():
            assert _same() == math.inf


async def test_the_earliest_deadline_of_nested_scopes(autojump_clock):
    now = trio.current_time()
    with trio.move_on_after(10):
        assert _same() == now + 10
        with trio.move_on_after(30):
            assert _same() == now + 10
            with trio.move_on_after(5):
                assert _same() == now + 5
        async with trio.open_nursery() as nursery:
            nursery.cancel_scope.deadline = now + 2
            assert _same() == now + 2


async def test_a_shield_hides_the_deadlines_above_it(autojump_clock):
    now = trio.current_time()
    with trio.move_on_after(10):
        with trio.CancelScope(shield=True):
            assert _same() == math.inf
            with trio.move_on_after(20):
                assert _same() == now + 20
        with trio.CancelScope(shield=True, deadline=now + 15):
            assert _same() == now + 15


async def test_a_cancelled_task_has_minus_infinity(autojump_clock):
    with trio.CancelScope() as outer:
        outer.cancel()
        assert _same() == -math.inf
        with trio.CancelScope():
            assert _same() == -math.inf
        with trio.CancelScope(shield=True):
            assert _same() == math.inf


async def test_a_deadline_moved_after_entering_counts(autojump_clock):
    now = trio.current_time()
    with trio.CancelScope() as outer, trio.CancelScope():
        assert _same() == math.inf
        outer.deadline = now + 7
        assert _same() == now + 7
        outer.deadline = math.inf
        assert _same() == math.inf


async def test_a_relative_deadline_counts_from_entering(autojump_clock):
    await trio.sleep(3)
    now = trio.current_time()
    with trio.CancelScope(relative_deadline=4):
        assert _same() == now + 4


async def test_a_child_task_sees_its_nurserys_deadline(autojump_clock):
    seen: list[float] = []

    async def child() -> None:
        seen.append(_same())
        with trio.CancelScope(shield=True):
            seen.append(_same())

    now = trio.current_time()
    with trio.move_on_after(9):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(child)
    assert seen == [now + 9, math.inf]
