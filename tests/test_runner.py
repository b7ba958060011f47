"""The runner (`trio_cluster._runner`): `open_runner` and `serve_runner`,
graceful shutdown, calls after shutdown."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import pytest
import trio
import trio.lowlevel
import trio.testing

import trio_cluster as tc

from .helpers import Add, Counter, Get, Sleep, Tracked, config

pytestmark = pytest.mark.usefixtures("clear_tracked_log")


async def close_during(
    call: Callable[[tc.Runner], Awaitable[None]], *, termination_timeout: float
) -> tuple[float, float]:
    """Open a runner of `Tracked`, start ``call(runner)`` beside it and leave
    the runner's block once everything blocks; return when leaving began and
    when it ended (``call`` has ended too by then)."""
    async with trio.open_nursery() as nursery:
        async with tc.open_runner(
            entities=[Tracked],
            config=config(entity_termination_timeout=termination_timeout),
        ) as runner:
            nursery.start_soon(call, runner)
            await trio.testing.wait_all_tasks_blocked()
            closed_at = trio.current_time()
        left_at = trio.current_time()
    return closed_at, left_at


async def test_graceful_shutdown_lets_handlers_finish(autojump_clock):
    finished: list[float] = []

    async def nap(runner: tc.Runner) -> None:
        await runner.client(Tracked)("a").nap(Sleep(3))
        finished.append(trio.current_time())

    closed_at, left_at = await close_during(nap, termination_timeout=5)
    # Leaving the block waited for the running handler, then on_stop ran.
    assert left_at == pytest.approx(closed_at + 3)
    assert finished == [pytest.approx(closed_at + 3)]
    assert Tracked.log[-1] == "stop a"


async def test_shutdown_cancels_handlers_after_the_termination_timeout(autojump_clock):
    outcome: list[BaseException] = []

    async def call(runner: tc.Runner) -> None:
        try:
            await runner.client(Tracked)("a").nap(Sleep(100))
        except tc.ClusterError as exc:
            outcome.append(exc)

    start, left_at = await close_during(call, termination_timeout=2)
    assert left_at - start == pytest.approx(2, abs=0.01)
    assert len(outcome) == 1
    assert isinstance(outcome[0], tc.EntityNotAssignedError)
    assert "may have partly run" in str(outcome[0])


async def test_calls_after_shutdown_raise_runner_closed(autojump_clock):
    async with tc.open_runner(entities=[Counter], config=config()) as runner:
        ref = runner.client(Counter)("a")
    with pytest.raises(tc.RunnerClosedError):
        await ref.add(Add(1))
    with pytest.raises(trio.ClosedResourceError):
        await ref.get(Get())


async def test_serve_runner_with_nursery_start(autojump_clock):
    async with trio.open_nursery() as nursery:
        runner = await nursery.start(tc.serve_runner, [Counter], config())
        assert isinstance(runner, tc.Runner)
        assert await runner.client(Counter)("a").add(Add(4)) == 4
        nursery.cancel_scope.cancel()
    with pytest.raises(tc.RunnerClosedError):
        await runner.client(Counter)("a").add(Add(1))


async def test_error_in_the_block_propagates_unwrapped(autojump_clock):
    with pytest.raises(ZeroDivisionError):
        async with tc.open_runner(entities=[Counter], config=config()):
            1 / 0  # noqa: B018


async def test_abort_cuts_handlers_at_once_as_a_crash_would(autojump_clock):
    outcome: list[BaseException] = []
    async with trio.open_nursery() as nursery:
        async with tc.open_runner(
            entities=[Tracked], config=config(entity_termination_timeout=30)
        ) as runner:

            async def call() -> None:
                try:
                    await runner.client(Tracked)("a").nap(Sleep(100))
                except tc.ClusterError as exc:
                    outcome.append(exc)

            nursery.start_soon(call)
            await trio.testing.wait_all_tasks_blocked()
            aborted_at = trio.current_time()
            runner.abort()
            await trio.testing.wait_all_tasks_blocked()
            # Cut now: no termination timeout, no on_stop hook.
            assert trio.current_time() == aborted_at
            assert [type(exc) for exc in outcome] == [tc.EntityNotAssignedError]
            with pytest.raises(tc.RunnerClosedError):
                await runner.client(Tracked)("b").nap(Sleep(1))
        assert trio.current_time() == aborted_at
    assert "stop a" not in Tracked.log
