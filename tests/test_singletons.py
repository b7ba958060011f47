"""Singletons (restarted with backoff) and persisted cron schedules."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime

import pytest
import trio

import trio_cluster as tc
from trio_cluster.storage import MemoryStorage

from .helpers import config

# 2027-01-15T10:00:00Z, a round instant for readable schedules.
ORIGIN = datetime(2027, 1, 15, 10, 0, tzinfo=UTC).timestamp()


async def test_singleton_runs_and_is_restarted_with_backoff(autojump_clock):
    starts: list[float] = []

    async def flaky() -> None:
        starts.append(trio.current_time())
        if len(starts) < 4:
            raise RuntimeError("flaky")
        await trio.sleep_forever()

    cfg = config(entity_restart_backoff=0.5, entity_restart_backoff_max=1.5)
    async with tc.open_runner(
        singletons=[tc.Singleton("flaky", flaky)], config=cfg
    ) as runner:
        await trio.sleep(10)
        assert runner.statistics().singletons_running == 2  # with the janitor
    gaps = [b - a for a, b in itertools.pairwise(starts)]
    assert gaps == pytest.approx([0.5, 1.0, 1.5])


async def test_singleton_that_returns_stays_finished(autojump_clock):
    runs: list[float] = []

    async def once() -> None:
        runs.append(trio.current_time())

    async with tc.open_runner(
        singletons=[tc.Singleton("once", once)], config=config()
    ) as runner:
        await trio.sleep(5)
        assert runner.statistics().singletons_running == 1  # the janitor
    assert len(runs) == 1


async def test_singleton_has_the_runner_in_context(autojump_clock):
    seen: list[tc.Runner] = []

    async def look() -> None:
        seen.append(tc.current_runner())

    async with tc.open_runner(
        singletons=[tc.Singleton("look", look)], config=config()
    ) as runner:
        await trio.sleep(1)
    assert seen == [runner]


async def test_cron_runs_once_per_instant(autojump_clock):
    instants: list[datetime] = []

    async def job(instant: datetime) -> None:
        instants.append(instant)

    cron = tc.Cron("every-5-minutes", "*/5 * * * *", job)
    clock = tc.TrioWallClock(origin=ORIGIN + 30)
    async with tc.open_runner(crons=[cron], config=config(), clock=clock):
        await trio.sleep(16 * 60)
    assert [i.strftime("%H:%M") for i in instants] == ["10:05", "10:10", "10:15"]
    assert all(i.tzinfo is not None for i in instants)


async def test_cron_survives_a_restart_without_double_runs(autojump_clock):
    instants: list[str] = []

    async def job(instant: datetime) -> None:
        instants.append(instant.strftime("%H:%M"))

    storage = MemoryStorage()
    cron = tc.Cron("minutely", "* * * * *", job)
    origin = ORIGIN + 10
    start = trio.current_time()
    async with tc.open_runner(
        crons=[cron],
        config=config(),
        storage=storage,
        clock=tc.TrioWallClock(origin=origin),
    ):
        await trio.sleep(125)
    # Restart on the same storage (same wall clock, continued).
    elapsed = trio.current_time() - start
    async with tc.open_runner(
        crons=[cron],
        config=config(),
        storage=storage,
        clock=tc.TrioWallClock(origin=origin + elapsed),
    ):
        await trio.sleep(120)
    assert instants == ["10:01", "10:02", "10:03", "10:04"]


async def test_cron_skips_runs_that_are_too_old(autojump_clock):
    instants: list[str] = []

    async def job(instant: datetime) -> None:
        instants.append(instant.strftime("%H:%M"))

    storage = MemoryStorage()
    cron = tc.Cron("hourly", "0 * * * *", job, skip_if_older_than=600)
    async with tc.open_runner(
        crons=[cron],
        config=config(),
        storage=storage,
        clock=tc.TrioWallClock(origin=ORIGIN + 5),
    ):
        await trio.sleep(1)
    # The cluster is down from 10:00:06 until 13:30: the 11:00 tick is stale.
    later = datetime(2027, 1, 15, 13, 30, tzinfo=UTC).timestamp()
    async with tc.open_runner(
        crons=[cron],
        config=config(),
        storage=storage,
        clock=tc.TrioWallClock(origin=later),
    ):
        await trio.sleep(31 * 60)
    assert instants == ["14:00"]


async def test_cron_failure_is_logged_and_the_schedule_goes_on(autojump_clock, caplog):
    calls: list[str] = []

    async def job(instant: datetime) -> None:
        calls.append(instant.strftime("%H:%M"))
        raise RuntimeError("report failed")

    cron = tc.Cron("failing", "* * * * *", job)
    async with tc.open_runner(
        crons=[cron], config=config(), clock=tc.TrioWallClock(origin=ORIGIN)
    ):
        await trio.sleep(150)
    assert calls == ["10:01", "10:02"]
    assert "cron failing failed" in caplog.text


def test_cron_rejects_bad_schedules():
    async def job(instant: datetime) -> None:
        pass

    with pytest.raises(tc.ConfigError):
        tc.Cron("bad", "61 * * * *", job)
    with pytest.raises(tc.ConfigError):
        tc.Cron("bad", "* * * * *", job, skip_if_older_than=0)
    with pytest.raises(tc.EntityDefinitionError):
        tc.Cron(" bad", "* * * * *", job)
