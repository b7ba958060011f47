"""Singletons (`trio_cluster._singletons`): restarted with backoff, run once,
move to a survivor; their names."""

from __future__ import annotations

import itertools
from contextlib import AsyncExitStack
from typing import TYPE_CHECKING

import pytest
import trio
import trio.testing

import trio_cluster as tc

from .helpers import config
from .memory_cluster import open_cluster

if TYPE_CHECKING:
    pass


async def run_singleton(
    singleton: tc.Singleton, seconds: float, cfg: tc.ShardingConfig | None = None
) -> tuple[tc.Runner, tc.RunnerStatistics]:
    """Run a runner with ``singleton`` for ``seconds``; return the runner and
    its statistics at the end."""
    async with tc.open_runner(
        singletons=[singleton], config=config() if cfg is None else cfg
    ) as runner:
        await trio.sleep(seconds)
        stats = runner.statistics()
    return runner, stats


async def test_singleton_runs_and_is_restarted_with_backoff(autojump_clock):
    starts: list[float] = []

    async def flaky() -> None:
        starts.append(trio.current_time())
        if len(starts) < 4:
            raise RuntimeError("flaky")
        await trio.sleep_forever()

    cfg = config(entity_restart_backoff=0.5, entity_restart_backoff_max=1.5)
    _, stats = await run_singleton(tc.Singleton("flaky", flaky), 10, cfg)
    assert stats.singletons_running == 2  # with the janitor
    gaps = [b - a for a, b in itertools.pairwise(starts)]
    assert gaps == pytest.approx([0.5, 1.0, 1.5])


async def test_singleton_that_returns_stays_finished(autojump_clock):
    runs: list[float] = []

    async def once() -> None:
        runs.append(trio.current_time())

    _, stats = await run_singleton(tc.Singleton("once", once), 5)
    assert stats.singletons_running == 1  # the janitor
    assert len(runs) == 1


async def test_singleton_has_the_runner_in_context(autojump_clock):
    seen: list[tc.Runner] = []

    async def look() -> None:
        seen.append(tc.current_runner())

    runner, _ = await run_singleton(tc.Singleton("look", look), 1)
    assert seen == [runner]


async def test_singleton_restarts_on_a_survivor_when_its_runner_dies(autojump_clock):
    async with AsyncExitStack() as stack:
        cluster = await open_cluster(stack, [1, 2, 3])
        with trio.fail_after(5):
            while not cluster.singleton_active:  # noqa: ASYNC110
                await trio.sleep(0.01)
        [first_host] = cluster.singleton_active
        port = int(first_host.rsplit(":", 1)[1])
        runs = len(cluster.singleton_runs)
        cluster.kill(port)
        with trio.fail_after(1):
            while len(cluster.singleton_runs) == runs:  # noqa: ASYNC110
                await trio.sleep(0.01)
        assert cluster.singleton_active != [first_host]
        assert len(cluster.singleton_active) == 1


async def test_reserved_singleton_names(autojump_clock):
    async def run() -> None:
        pass

    with pytest.raises(tc.EntityDefinitionError, match="reserved"):
        async with tc.open_runner(
            singletons=[tc.Singleton("trio_cluster.janitor", run)]
        ):
            pytest.fail("must not start")


async def test_duplicate_singleton_names_are_refused():
    async def run() -> None:
        pass

    with pytest.raises(tc.EntityDefinitionError, match="unique"):
        async with tc.open_runner(
            singletons=[tc.Singleton("s", run), tc.Singleton("s", run)]
        ):
            pytest.fail("must not start")
    with pytest.raises(tc.EntityDefinitionError, match="singleton name"):
        tc.Singleton("", run)
