"""The simulator itself: a cluster in one process, its faults, its trace."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import trio
import trio.testing

import trio_cluster as tc
from trio_cluster.testing import (
    ClientOp,
    FaultSchedule,
    FrameFaults,
    FreezeRunner,
    InvariantViolation,
    KillRunner,
    OpKind,
    Probe,
    ProbeTouch,
    ProbeWrite,
    Scenario,
    SimulatedCluster,
    SimulationTrace,
    StopRunner,
    StorageOutage,
    Workload,
    current_simulation,
    open_simulated_cluster,
    run_scenario,
    run_simulation,
)

from .planted import release_without_cancelling

pytestmark = pytest.mark.simulation


def owner_of(cluster: SimulatedCluster, entity: str) -> int | None:
    return cluster.owner_of(cluster.client(Probe)(entity).address)


def hosts(cluster: SimulatedCluster, index: int) -> list[object]:
    runner = cluster.runner(index).runner
    assert runner is not None
    return list(runner.served_shards())


async def test_runners_split_the_shards_and_answer_from_anywhere(autojump_clock):
    async with open_simulated_cluster([Probe], runners=3, seed=1) as cluster:
        served = [len(hosts(cluster, i)) for i in range(3)]
        assert sum(served) == 16
        assert all(served)
        for handle in cluster.up():
            # What each run's listener heard is what its runner serves.
            assert handle.runner is not None
            assert handle.incarnation is not None
            assert handle.incarnation.serving == handle.runner.served_shards()
        for via in range(3):
            client = cluster.client(Probe, via=via)
            assert (await client("p1").touch(ProbeTouch(op=via))).startswith("r")
            reply = await client("p2").write(ProbeWrite(stream=via, seq=0))
            assert reply.startswith(f"r{owner_of(cluster, 'p2')}@")
        assert cluster.checker.unanswered() == []
        assert cluster.probes.executions == 6


def test_the_same_seed_gives_the_same_trace():
    scenario = Scenario(
        seed=5,
        runners=3,
        faults=FaultSchedule(
            (
                KillRunner(at=1.0, runner=1, down_for=2.0),
                FreezeRunner(at=2.0, runner=2, duration=6.0),
            )
        ),
        workload=Workload(
            (ClientOp(at=0.5, via=0, entity=1, kind=OpKind.CALL, count=3, work=1.0),),
            background=2,
        ),
    )
    first = run_scenario(scenario)
    assert run_scenario(scenario) == first
    assert first.executions > 10


@pytest.mark.slow
def test_the_same_seed_gives_the_same_trace_in_another_process():
    code = textwrap.dedent(
        """
        from trio_cluster.testing import *
        scenario = Scenario(
            seed=9, runners=3,
            faults=FaultSchedule((KillRunner(at=1.0, runner=0, down_for=2.0),)),
            workload=Workload((ClientOp(1.0, 1, 2, OpKind.DISCARD, 4, 0.5),),
                              background=2),
        )
        print(run_scenario(scenario).trace_digest)
        """
    )
    digests = {
        subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            check=True,
            env={"PYTHONHASHSEED": seed, "PATH": ""},
            timeout=120,
        ).stdout.strip()
        for seed in ("1", "2")
    }
    assert len(digests) == 1


def test_it_needs_virtual_time():
    async def on_the_real_clock() -> None:
        async with open_simulated_cluster([Probe]):
            pass  # pragma: no cover

    with pytest.raises(tc.ConfigError, match="autojump_clock"):
        trio.run(on_the_real_clock)
    with pytest.raises(tc.ConfigError, match="MockClock"):
        trio.run(on_the_real_clock, clock=trio.testing.MockClock())
    with pytest.raises(tc.ConfigError, match="at least 1 runner"):
        run_simulation(_open_empty)


async def _open_empty() -> None:
    async with open_simulated_cluster([Probe], runners=0):
        pass  # pragma: no cover


def test_current_simulation_needs_an_open_cluster():
    with pytest.raises(RuntimeError, match="no simulated cluster"):
        current_simulation()

    async def inside() -> None:
        with pytest.raises(RuntimeError, match="no simulated cluster"):
            current_simulation()
        async with open_simulated_cluster([Probe], runners=1) as cluster:
            assert current_simulation() is cluster

    run_simulation(inside)


async def test_kill_frees_the_locks_at_once_and_restart_rejoins(autojump_clock):
    async with open_simulated_cluster([Probe], runners=3) as cluster:
        before = trio.current_time()
        killed = cluster.runner(1).incarnation
        assert killed is not None
        assert killed.serving
        await cluster.kill(1)
        assert trio.current_time() == before
        assert killed.serving == {}  # the aborted runner stopped every shard
        owners = await _owners(cluster)
        assert "r1:7000" not in owners.values()
        assert cluster.runner(1).runner is None
        with pytest.raises(RuntimeError, match="down"):
            cluster.client(Probe, via=1)
        await cluster.kill(1)  # already down: a no-op
        await cluster.wait_stable()
        assert sum(len(hosts(cluster, h.index)) for h in cluster.up()) == 16
        await cluster.restart(1)
        assert str(cluster.runner(1).incarnation) == "r1#2"
        await cluster.wait_stable()
        assert hosts(cluster, 1)
        cluster.restart_soon(1)  # not down: a no-op
    faults = [event.text for event in cluster.trace.faults()]
    assert faults[:3] == ["kill r1", "kill r1: already down", "restart r1#2"]


async def test_a_graceful_stop_drains_releases_and_restart_rejoins(autojump_clock):
    async with open_simulated_cluster([Probe], runners=3) as cluster:
        handle = cluster.runner(1)
        stopped = handle.incarnation
        assert stopped is not None
        assert stopped.serving
        cluster.stop_soon(1)
        assert not handle.up  # down for its callers from the instant it stops
        cluster.stop_soon(1)  # stopping already: a no-op
        cluster.restart_soon(1)  # not down yet: a no-op
        await cluster.wait_stopped(1)
        assert handle.down
        assert not stopped.dead  # stopped, not killed
        assert stopped.serving == {}
        assert stopped.draining == {}
        owners = await _owners(cluster)
        assert "r1:7000" not in owners.values()
        await cluster.wait_stable()
        assert sum(len(hosts(cluster, h.index)) for h in cluster.up()) == 16
        await cluster.kill(1)  # down: a no-op
        await cluster.restart(1)
        assert str(handle.incarnation) == "r1#2"
        await cluster.wait_stable()
        assert hosts(cluster, 1)
        for via in range(3):
            await cluster.client(Probe, via=via)("p5").touch(ProbeTouch(op=via))
    faults = [event.text for event in cluster.trace.faults()]
    assert faults[:5] == [
        "stop r1",
        "stop r1: already down or stopping",
        "restart r1: not down",
        "kill r1: already down",
        "restart r1#2",
    ]
    runners = [event.text for event in cluster.trace.events(kinds={"runner"})]
    assert "r1 stopped" in runners


def test_a_stop_in_a_schedule_restarts_the_runner_after_its_stop():
    async def main() -> list[tuple[float, str]]:
        async with open_simulated_cluster([Probe], runners=3) as cluster:
            start = trio.current_time()
            await cluster.run_schedule(
                FaultSchedule((StopRunner(at=1.0, runner=2, down_for=2.0),))
            )
            await cluster.runner(2).wait_up()
            return [(round(e.time - start, 6), e.text) for e in cluster.trace.faults()]

    assert run_simulation(main) == [(1.0, "stop r2"), (3.0, "restart r2#2")]


async def _owners(cluster: SimulatedCluster) -> dict[object, str]:
    owners: dict[object, str] = {}
    for owner in cluster.storage._shard_owners():
        if owner.runner is not None:
            owners[owner.shard] = str(owner.runner)
    await trio.lowlevel.checkpoint()
    return owners


def test_handlers_of_a_run_still_starting_are_that_runs():
    # r0#2 serves the shards of its first poll, and runs their handlers,
    # before `open_runner` returns it: those executions were taken for a dead
    # run's (unchecked), and the write that ran then was later reported as
    # overtaken ("FIFO") by the next one.
    scenario = Scenario(
        seed=0,
        runners=3,
        faults=FaultSchedule(
            (
                KillRunner(at=15.1, runner=0, down_for=3.0),
                StorageOutage(at=16.8, runner=None, duration=12.0, hang=True),
            )
        ),
        workload=Workload(ops=[], background=4),
    )
    assert run_scenario(scenario).replies


async def test_a_task_on_a_runner_dies_with_it(autojump_clock):
    finished = []

    async def on_r2() -> None:
        await trio.sleep(10)
        finished.append(True)  # pragma: no cover

    async with open_simulated_cluster([Probe], runners=3) as cluster:
        cluster.start_soon_on(2, on_r2)
        await trio.sleep(1)
        await cluster.kill(2)
        with pytest.raises(RuntimeError, match="down"):
            cluster.start_soon_on(2, on_r2)
        await trio.sleep(20)
    assert finished == []


def test_a_frozen_runner_loses_its_leases_and_its_late_writes_are_fenced():
    # p1 lives on r1; r1 freezes while p1 has writes in flight and more queue
    # up: its lease lapses, another runner takes p1 over, and the replies r1
    # recorded during the freeze reach storage late, refused by fencing.
    scenario = Scenario(
        seed=3,
        runners=3,
        faults=FaultSchedule((FreezeRunner(at=3.0, runner=1, duration=8.0),)),
        workload=Workload(
            (
                ClientOp(
                    at=0.0,
                    via=0,
                    entity=1,
                    kind=OpKind.DISCARD,
                    count=10,
                    work=1.0,
                    pause=0.5,
                ),
            )
        ),
    )
    report = run_scenario(scenario)
    assert report.stale_replies_refused >= 1
    assert report.stored == report.replies == 10


async def test_a_partition_cuts_calls_until_it_heals(autojump_clock):
    async with open_simulated_cluster([Probe], runners=2) as cluster:
        entity = next(f"p{i}" for i in range(50) if owner_of(cluster, f"p{i}") == 1)
        client = cluster.client(Probe, via=0)(entity)
        cluster.partition(0, 1)
        with trio.move_on_after(3) as scope:
            await client.touch(ProbeTouch(op=1))
        assert scope.cancelled_caught
        cluster.heal(0, 1)
        assert await client.touch(ProbeTouch(op=2))
        with pytest.raises(tc.ConfigError, match="itself"):
            cluster.partition(1, 1)


async def test_storage_outages_fail_or_hold_calls(autojump_clock):
    async with open_simulated_cluster([Probe], runners=2) as cluster:
        client = cluster.client(Probe, via=0)("p1")
        cluster.storage_outage(0)
        with pytest.raises(tc.PersistenceError, match="simulated storage outage"):
            await client.write(ProbeWrite(stream=0, seq=0))
        cluster.end_storage_outage(0)
        cluster.storage_outage(hang=True)
        start = trio.current_time()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(client.write.discard, ProbeWrite(stream=0, seq=1))
            await trio.sleep(2)
            cluster.end_storage_outage(hang=True)
        assert trio.current_time() - start == pytest.approx(2)
        await cluster.wait_quiescent()
        assert len(cluster.checker.accepted) == 1


async def test_a_lost_lock_session_stops_every_shard_until_reacquired(autojump_clock):
    async with open_simulated_cluster([Probe], runners=2) as cluster:
        runner = cluster.runner(0).runner
        assert runner is not None
        before = runner.statistics().failovers
        cluster.lose_session(0)
        await trio.testing.wait_all_tasks_blocked()
        assert runner.statistics().failovers > before
        await cluster.wait_stable()
        assert runner.served_shards()


async def test_skewed_clocks_read_another_wall_time(autojump_clock):
    async with open_simulated_cluster([Probe], runners=2) as cluster:
        cluster.skew_clock(1, -30.0)
        first, second = (h.clock for h in cluster.runners)
        assert first is not None
        assert second is not None
        assert first.now() - second.now() == pytest.approx(30.0)
        await cluster.kill(1)
        await cluster.restart(1)
        clock = cluster.runner(1).clock
        assert clock is not None
        assert clock.skew == -30.0


async def test_dropped_frames_lose_volatile_calls(autojump_clock):
    async with open_simulated_cluster([Probe], runners=2) as cluster:
        entity = next(f"p{i}" for i in range(50) if owner_of(cluster, f"p{i}") == 1)
        client = cluster.client(Probe, via=0)(entity)
        token = cluster.frame_faults(drop=1.0)
        with trio.move_on_after(3) as scope:
            await client.touch(ProbeTouch(op=1))
        assert scope.cancelled_caught
        cluster.end_frame_faults(token)
        assert await client.touch(ProbeTouch(op=2))


async def test_a_frozen_runner_holds_its_envelopes_until_it_thaws(autojump_clock):
    async with open_simulated_cluster([Probe], runners=2) as cluster:
        entity = next(f"p{i}" for i in range(50) if owner_of(cluster, f"p{i}") == 1)
        client = cluster.client(Probe, via=0)(entity)
        cluster.freeze(1)
        cluster.freeze(1)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(client.touch, ProbeTouch(op=1))
            await trio.sleep(1)
            cluster.thaw(1)  # still frozen: freezes nest
            await trio.sleep(1)
            cluster.thaw(1)
        assert trio.current_time() > 2
        cluster.thaw(1)  # not frozen: a no-op


async def test_heal_all_undoes_every_fault(autojump_clock):
    async with open_simulated_cluster([Probe], runners=3) as cluster:
        await cluster.kill(0)
        cluster.freeze(1)
        cluster.partition(1, 2)
        cluster.partition(1, 2)
        cluster.storage_outage(2, hang=True)
        cluster.storage_outage(None)
        cluster.frame_faults(drop=0.5)
        await trio.sleep(3)
        await cluster.heal_all()
        await cluster.wait_stable()
        assert len(cluster.up()) == 3
        assert cluster.storage.fault_hook is None
        assert cluster.network.fault is None
        for via in range(3):
            await cluster.client(Probe, via=via)("p3").touch(ProbeTouch(op=via))


def test_a_schedule_plays_its_faults_in_time_order():
    async def main() -> list[tuple[float, str]]:
        async with open_simulated_cluster([Probe], runners=3) as cluster:
            start = trio.current_time()
            await cluster.run_schedule(
                FaultSchedule(
                    (
                        FreezeRunner(at=2.0, runner=2, duration=1.0),
                        KillRunner(at=1.0, runner=1, down_for=1.0),
                        FrameFaults(at=0.5, duration=0.5, duplicate=1.0),
                        StorageOutage(at=3.0, runner=None, duration=0.0),
                    )
                )
            )
            return [(round(e.time - start, 6), e.text) for e in cluster.trace.faults()]

    assert run_simulation(main) == [
        (0.5, "frames: drop 0.00, duplicate 1.00, delay 0.00 (max 0.100s)"),
        (1.0, "frames: normal"),
        (1.0, "kill r1"),
        (2.0, "restart r1#2"),
        (2.0, "freeze r2"),
        (3.0, "thaw r2 (0 held envelopes let through)"),
        (3.0, "storage fails for every runner"),
        (3.0, "storage back for every runner"),
    ]


def test_faults_are_validated():
    with pytest.raises(tc.ConfigError, match="at must be"):
        KillRunner(at=-1.0, runner=0, down_for=1.0)
    with pytest.raises(tc.ConfigError, match="runner must be"):
        FreezeRunner(at=0.0, runner=-1, duration=1.0)
    with pytest.raises(tc.ConfigError, match="probability"):
        FrameFaults(at=0.0, duration=1.0, drop=2.0)

    async def unknown_runner() -> None:
        async with open_simulated_cluster([Probe], runners=2) as cluster:
            await cluster.run_schedule(
                FaultSchedule((KillRunner(at=0.0, runner=5, down_for=1.0),))
            )

    with pytest.raises(tc.ConfigError, match="no runner 5"):
        run_simulation(unknown_runner)


def test_a_violation_names_the_invariant_the_seed_and_the_trace(monkeypatch):
    release_without_cancelling(monkeypatch)

    async def main() -> None:
        async with open_simulated_cluster([Probe], runners=3, seed=77):
            pass  # pragma: no cover - the cluster fails while starting

    with pytest.raises(InvariantViolation) as info:
        run_simulation(main)
    text = str(info.value)
    assert text.startswith("single owner: r")
    assert "simulation seed 77" in text
    assert " acquired default:" in text
    assert "VIOLATION: single owner" in text
    assert info.value.seed == 77


def test_an_error_in_the_test_gets_the_trace_as_a_note():
    async def main() -> None:
        async with open_simulated_cluster([Probe], runners=2, seed=4):
            raise KeyError("oops")

    with pytest.raises(KeyError) as info:
        run_simulation(main)
    notes = "\n".join(info.value.__notes__)
    assert "--- seed 4: 0 fault event(s) ---" in notes
    assert "r0 up (machine id 0)" in notes


def test_the_trace_is_bounded_and_formats_its_tail():
    async def main() -> SimulationTrace:
        trace = SimulationTrace(limit=3)
        for i in range(5):
            trace.record("fault" if i == 0 else "check", "event %d", i)
            await trio.sleep(1)
        return trace

    trace = run_simulation(main)
    assert trace.dropped == 2
    assert [e.text for e in trace.events()] == ["event 2", "event 3", "event 4"]
    assert [e.text for e in trace.faults()] == ["event 0"]
    assert trace.format(last=1).splitlines() == [
        "... 4 earlier events not shown ...",
        "     4.000  check     event 4",
    ]
    assert len(trace.digest()) == 64
    with pytest.raises(ValueError, match="limit"):
        SimulationTrace(limit=0)


async def test_the_first_example_of_the_docs(autojump_clock):
    from .test_bank_account import bank

    Account, Deposit = bank.Account, bank.Deposit
    async with open_simulated_cluster([Account], runners=3, seed=1) as cluster:
        alice = cluster.client(Account)("alice")
        assert await alice.deposit(Deposit("t1", 10)) == 10
        owner = cluster.owner_of(alice.address)
        assert owner is not None
        await cluster.kill(owner)
        assert cluster.owner_of(alice.address) is None
        await cluster.wait_stable()
        alice = cluster.client(Account)("alice")
        assert await alice.deposit(Deposit("t2", 5)) == 5
        assert await alice.deposit(Deposit("t1", 10)) == 10


async def test_a_held_envelope_for_an_unreachable_peer_reports_it_lost(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A request queued while its runner was frozen, towards a runner cut
    off from it, fails at the thaw (a real transport's dial fails and
    reports the peer lost) instead of waiting forever."""
    async with open_simulated_cluster([Probe], runners=3) as cluster:
        entity = next(f"p{n}" for n in range(100) if owner_of(cluster, f"p{n}") == 2)
        cluster.partition(0, 2)
        cluster.freeze(0)
        client = cluster.client(Probe, via=0)

        async def thaw_later() -> None:
            await trio.sleep(1.0)
            cluster.thaw(0)

        cluster.start_soon_on(1, thaw_later)
        started = trio.current_time()
        with trio.fail_after(30), pytest.raises(tc.RunnerUnavailableError):
            await client(entity).touch(ProbeTouch(1))
        assert trio.current_time() - started == pytest.approx(1.0)
        cluster.heal(0, 2)
