"""Bounded attempts under the simulator: a persisted write whose runners
are killed while it runs is started at most as many times as its retry
policy allows, then dead-lettered; with claims that count no attempt
(a planted bug), the simulator's ``bounded attempts`` invariant fails."""

from __future__ import annotations

import pytest
import trio

from trio_cluster import DeadLetter
from trio_cluster.testing import (
    InvariantViolation,
    Probe,
    ProbeWrite,
    open_simulated_cluster,
    run_simulation,
)

from .planted import attempts_not_counted

pytestmark = pytest.mark.simulation


async def kill_every_runner_running_a_write() -> list[str]:
    """Send a long write; kill the runner running it, each time it has
    started it again (each kill frees its shard at once: the next owner
    claims the write again), until it is dead-lettered; return the errors of
    the dead letters."""
    async with open_simulated_cluster([Probe], runners=3) as cluster:
        await cluster.wait_stable()
        client = cluster.client(Probe)("p0")
        await client.write.discard(ProbeWrite(stream=0, seq=0, work=30.0))

        async def dead_letters() -> list[DeadLetter]:
            runner = next(h.runner for h in cluster.up() if h.runner is not None)
            return await runner.dead_letters.list()

        killed = 0
        with trio.fail_after(120):
            while not (letters := await dead_letters()):
                owner = cluster.owner_of(client.address)
                if owner is not None and cluster.probes.executions > killed:
                    killed += 1
                    await cluster.kill(owner)
                await trio.sleep(0.05)
        return [letter.error for letter in letters]


def test_a_write_whose_runners_keep_dying_is_dead_lettered_after_its_attempts():
    errors = run_simulation(kill_every_runner_running_a_write)
    assert errors == ["its runner stopped during attempt 2"]


def test_claims_that_count_no_attempt_break_bounded_attempts(monkeypatch):
    attempts_not_counted(monkeypatch)
    with pytest.raises(InvariantViolation, match="bounded attempts"):
        run_simulation(kill_every_runner_running_a_write)
