"""Cron jobs (`trio_cluster._cron`): persisted schedules that run once per
instant, cluster-wide. (The schedule arithmetic of `trio_cluster._core._cron`
is tested in ``tests/core/test_cron.py``.)"""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
import trio

import trio_cluster as tc
from trio_cluster.storage import MemoryStorage

from .helpers import config

# 2027-01-15T10:00:00Z, a round instant for readable schedules.
ORIGIN = datetime(2027, 1, 15, 10, 0, tzinfo=UTC).timestamp()


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
