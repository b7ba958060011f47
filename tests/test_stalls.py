"""`trio_cluster._stalls`: deadlines that do not count the time the event
loop stood still. A stall is simulated with ``MockClock.jump``: virtual time
moves on while no task runs, as during a long garbage collection."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from trio_cluster._stalls import fail_after_unstalled, move_on_after_unstalled


async def test_a_responsive_loop_gets_the_clocks_deadline(autojump_clock):
    start = trio.current_time()
    with pytest.raises(trio.TooSlowError), fail_after_unstalled(1.0):
        await trio.sleep_forever()
    assert trio.current_time() - start == pytest.approx(1.0)


async def test_a_stall_longer_than_the_deadline_is_not_counted(autojump_clock):
    # Regression (W12): a lease refresh answered at once was abandoned
    # because a long GC pause held the loop past its deadline.
    answered = trio.Event()

    async def server() -> None:
        await trio.sleep(0.1)
        autojump_clock.jump(30.0)  # the loop stands still for 30 s
        await trio.lowlevel.checkpoint()  # then the answer is read
        answered.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(server)
        with fail_after_unstalled(1.0):
            await answered.wait()
    # With `trio.fail_after(1.0)` the same block is cancelled.
    answered = trio.Event()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server)
        with trio.move_on_after(1.0) as scope:
            await answered.wait()
    assert scope.cancelled_caught


async def test_deadlines_added_later_are_counted_from_their_start(autojump_clock):
    start = trio.current_time()
    ended: list[float] = []

    async def block(delay: float, seconds: float) -> None:
        await trio.sleep(delay)
        with move_on_after_unstalled(seconds):
            await trio.sleep(3600)
        ended.append(trio.current_time() - start)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(block, 0.0, 1.0)
        nursery.start_soon(block, 0.3, 0.1)
        nursery.start_soon(block, 0.55, 1.0)
    assert ended == pytest.approx([0.4, 1.0, 1.55])


async def test_stalls_cost_at_most_a_step_each(autojump_clock):
    start = trio.current_time()

    async def stalls() -> None:
        for _ in range(3):
            await trio.sleep(0.05)
            autojump_clock.jump(10.0)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(stalls)
        with move_on_after_unstalled(1.0) as scope:
            await trio.sleep(3600)
    assert scope.cancelled_caught
    # 30 s stood still, of which each stall counted one step (0.2 s) at most:
    # the block ran for at least 0.4 s of its 1 s.
    assert 30.4 <= trio.current_time() - start <= 31.0 + 1e-9


async def test_exceptions_and_cancellation_propagate_unwrapped(autojump_clock):
    with pytest.raises(KeyError), fail_after_unstalled(1.0):
        raise KeyError("x")
    with trio.CancelScope() as outer, move_on_after_unstalled(5.0) as scope:
        outer.cancel()
        await trio.sleep_forever()

    assert not scope.cancelled_caught
    with pytest.raises(ValueError, match="seconds"), move_on_after_unstalled(-1.0):
        pass  # pragma: no cover
