"""Scenarios the simulator's ``ci`` profile found failing, pinned.

Hypothesis's example database is not in git, so each failing example it
found is kept here as an explicit scenario that must keep passing. Each
names what it broke and what fixed it.
"""

from __future__ import annotations

import pytest

from trio_cluster.testing import (
    ClientOp,
    FaultSchedule,
    FrameFaults,
    FreezeRunner,
    KillRunner,
    LoseLockSession,
    OpKind,
    PartitionRunners,
    Scenario,
    StopRunner,
    StorageOutage,
    Workload,
    run_scenario,
)

pytestmark = pytest.mark.simulation

CALL = OpKind.CALL

PINNED = {
    # FIFO: a sender's second persisted write ran (on the restarted r1)
    # before its first, stored earlier, after r0 froze and r1 was killed.
    "fifo-after-freeze-and-kill": Scenario(
        seed=1,
        runners=2,
        faults=FaultSchedule(
            (
                FreezeRunner(at=0.0, runner=0, duration=8.0),
                KillRunner(at=0.6, runner=1, down_for=5.0),
            )
        ),
        workload=Workload(
            (ClientOp(0.0, 0, 0, CALL), ClientOp(6.1, 0, 0, CALL)), background=8
        ),
    ),
    "fifo-after-freeze-and-kill-background-only": Scenario(
        seed=1,
        runners=2,
        faults=FaultSchedule(
            (
                FreezeRunner(at=0.0, runner=0, duration=6.0),
                KillRunner(at=0.6, runner=1, down_for=5.0),
            )
        ),
        workload=Workload((), background=8),
    ),
    # Single owner: r0 drained a shard that moved back to the restarted r1,
    # lost its lock session meanwhile and went on running the handler while
    # r1 took the shard (issue 11, items 1 and 2: a lost lock escalates a
    # graceful stop, and a draining shard keeps its lease until then).
    # Single owner: r2 shut down (its shards draining) and lost its lock
    # session at the same moment; its leaving registration was announced, r1
    # took a shard at once and ran a request r2's drain still ran: a session
    # lost while shutting down did not stop the draining handlers.
    "lock-lost-while-leaving": Scenario(
        seed=0,
        runners=3,
        faults=FaultSchedule(
            (
                FrameFaults(
                    at=0.0,
                    duration=1.0,
                    drop=0.0,
                    duplicate=0.05,
                    delay=0.0,
                    max_delay=0.01,
                ),
                StopRunner(at=16.5, runner=2, down_for=1.0),
                LoseLockSession(at=16.5, runner=2),
            )
        ),
        workload=Workload(
            (
                ClientOp(17.1, 0, 0, OpKind.ABANDON),
                ClientOp(0.0, 0, 0, OpKind.ABANDON),
                ClientOp(0.0, 0, 0, OpKind.ABANDON),
                ClientOp(11.4, 0, 0, OpKind.DISCARD, count=3, work=3.0),
            ),
            background=4,
        ),
    ),
    # FIFO: r2 ran a sender's write 5.5 before its 5.4 (same epoch) under a
    # hanging storage outage and a partition, once the built-in backends
    # stopped the safety-net claim (`notifications_lossless`): 5.4's send
    # began before r2 served the shard again, so r2 did not note it waiting
    # in storage, and a claim that read storage just before it was saved
    # marked the shard caught up (also `test_regressions.py`).
    "fifo-without-the-safety-net-claim": Scenario(
        seed=22190,
        runners=3,
        faults=FaultSchedule(
            (
                StorageOutage(at=13.5, runner=None, duration=8.0, hang=True),
                PartitionRunners(at=15.7, a=2, b=1, duration=8.0),
            )
        ),
        workload=Workload(
            (
                ClientOp(20.0, 0, 0, CALL),
                ClientOp(3.9, 0, 0, OpKind.VOLATILE, resend=True),
                ClientOp(11.7, 2, 1, CALL),
                ClientOp(14.1, 1, 0, OpKind.DISCARD, count=4),
                ClientOp(10.2, 1, 1, CALL, count=4, work=3.0, resend=True),
                ClientOp(15.2, 2, 0, OpKind.DISCARD, count=6),
            ),
            background=0,
        ),
    ),
    "lock-lost-while-draining": Scenario(
        seed=0,
        runners=2,
        faults=FaultSchedule(
            (
                FreezeRunner(at=0.0, runner=1, duration=3.0),
                KillRunner(at=10.9, runner=1, down_for=1.0),
                LoseLockSession(at=13.6, runner=0),
            )
        ),
        workload=Workload(
            (
                ClientOp(0.0, 0, 0, CALL),
                ClientOp(0.0, 0, 0, CALL),
                ClientOp(0.0, 0, 0, CALL),
                ClientOp(0.0, 0, 0, CALL, count=4, work=3.0),
                ClientOp(3.0, 0, 0, CALL),
            ),
            background=4,
        ),
    ),
    "kill-then-hanging-outage": Scenario(
        seed=0,
        runners=2,
        faults=FaultSchedule(
            (
                KillRunner(at=16.4, runner=0, down_for=1.0),
                StorageOutage(at=17.4, runner=None, duration=6.0, hang=True),
            )
        ),
        workload=Workload((), background=4),
    ),
    # r0 stopped while a caller's inline handler still ran on one of its
    # shards: finishing, it handed its permit to a queued persisted job,
    # whose task went to the shard's nursery, closed meanwhile
    # ("Nursery is closed to new arrivals" in the caller). Such a job is
    # now bounced, as the shard's stop bounces the others.
    "permit-handed-on-after-the-shard-closed": Scenario(
        seed=8,
        runners=2,
        faults=FaultSchedule(
            (
                FreezeRunner(at=0.0, runner=0, duration=12.0),
                LoseLockSession(at=0.0, runner=0),
                FreezeRunner(at=0.3, runner=0, duration=1.0),
                KillRunner(at=16.5, runner=1, down_for=1.0),
            )
        ),
        workload=Workload(
            (
                ClientOp(0.0, 0, 0, CALL),
                ClientOp(0.0, 0, 0, CALL),
                ClientOp(0.0, 0, 0, CALL),
                ClientOp(0.0, 0, 3, CALL, count=2),
                ClientOp(0.0, 1, 3, CALL, count=3, work=3.0),
                ClientOp(3.6, 1, 3, OpKind.VOLATILE, count=3, work=3.0),
            ),
            background=4,
        ),
    ),
    # FIFO after retries and dead letters: a write queued (unstarted) behind
    # others was claimed by r2, then by r1 whose graceful stop gave it back
    # too late (its lock was released before the give-back, so the claim
    # stayed counted), then dead-lettered on r2's third claim; the next
    # write ran, and the journal still waited for the dead-lettered one.
    # Fixed: a graceful stop's give-back runs before its lock is released,
    # and a write answered without running waits no more.
    "dead-lettered-write-and-late-give-back": Scenario(
        seed=0,
        runners=3,
        faults=FaultSchedule(
            (
                FreezeRunner(at=0.0, runner=0, duration=1.0),
                FreezeRunner(at=0.0, runner=1, duration=1.0),
                KillRunner(at=0.1, runner=1, down_for=1.0),
                KillRunner(at=5.4, runner=0, down_for=6.0),
                FreezeRunner(at=13.3, runner=2, duration=8.0),
                FreezeRunner(at=19.6, runner=0, duration=3.0),
            )
        ),
        workload=Workload(
            (
                ClientOp(0.0, 0, 0, CALL),
                ClientOp(1.1, 1, 0, CALL, count=5, pause=2.0),
                ClientOp(5.5, 2, 0, OpKind.DISCARD, count=4, work=3.0),
                ClientOp(0.0, 0, 0, CALL),
            ),
            background=4,
        ),
    ),
    # FIFO and dead letters: writes queued behind a long one were claimed by
    # two runners whose lock sessions were lost (no graceful give-back), and
    # dead-lettered without running on the third claim, in the same claim
    # as a later write of their stream, which ran before their dead-letter
    # replies were recorded. Not a violation: a write answered without
    # running is overtaken by no run (the journal now reports an overtaken
    # write only when it runs).
    "writes-dead-lettered-behind-a-long-one": Scenario(
        seed=0,
        runners=3,
        faults=FaultSchedule(
            (
                StorageOutage(at=4.3, runner=None, duration=6.0),
                LoseLockSession(at=11.5, runner=2),
                LoseLockSession(at=14.4, runner=1),
            )
        ),
        workload=Workload(
            (
                ClientOp(0.0, 0, 0, CALL),
                ClientOp(5.3, 0, 3, OpKind.DISCARD, count=3, pause=0.5),
                ClientOp(0.0, 0, 0, CALL, count=2),
                ClientOp(4.9, 0, 3, CALL, work=3.0),
            ),
            background=4,
        ),
    ),
}


@pytest.mark.parametrize("name", sorted(PINNED))
def test_pinned_scenario_keeps_every_invariant(name: str) -> None:
    report = run_scenario(PINNED[name])
    assert report.executions > 0
