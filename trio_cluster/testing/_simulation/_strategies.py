"""Hypothesis strategies for fault schedules, workloads and scenarios (test support).

Importing this module imports Hypothesis (``pip install trio-cluster[testing]``);
`trio_cluster.testing` imports it only when one of these names is used.

Times are drawn on a 0.1 s grid and durations from a few round values, so a
shrunk counterexample reads well (``KillRunner(at=2.0, runner=1,
down_for=3.0)``); faults shrink towards fewer, earlier, shorter ones on runner
0, and probabilities towards none.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from hypothesis import strategies as st

from ._faults import (
    FaultSchedule,
    FrameFaults,
    FreezeRunner,
    KillRunner,
    LoseLockSession,
    PartitionRunners,
    SkewClock,
    StopRunner,
    StorageOutage,
)
from ._workload import DEFAULT_KINDS, ClientOp, OpKind, Scenario, Workload

if TYPE_CHECKING:
    from collections.abc import Collection

    from hypothesis.strategies import SearchStrategy

    from ._faults import Fault

__all__ = ["FAULT_KINDS", "fault_schedules", "scenarios", "workloads"]

FAULT_KINDS = frozenset(
    {"kill", "stop", "freeze", "partition", "storage", "session", "skew", "frames"}
)
"""Names of the fault kinds `fault_schedules` can draw (all by default)."""

_DURATIONS = (1.0, 3.0, 5.0, 6.0, 8.0, 12.0)
_PROBABILITIES = (0.0, 0.05, 0.2, 0.5)


def _times(duration: float) -> SearchStrategy[float]:
    return st.integers(0, max(0, int(duration * 10))).map(lambda tenths: tenths / 10)


def fault_schedules(
    *,
    runners: int,
    duration: float = 20.0,
    max_faults: int = 4,
    kinds: Collection[str] = FAULT_KINDS,
) -> SearchStrategy[FaultSchedule]:
    """Schedules of up to ``max_faults`` faults starting within ``duration``
    virtual seconds, on runners ``0 .. runners-1``.

    Args:
        runners: runners of the cluster the schedule is for.
        duration: latest start time of a fault.
        max_faults: most faults in a schedule.
        kinds: which kinds of faults to draw, among `FAULT_KINDS`.

    Raises:
        ValueError: an unknown kind, or no kind at all.
    """
    unknown = set(kinds) - FAULT_KINDS
    if unknown or not kinds:
        raise ValueError(
            f"kinds must be a non-empty subset of {sorted(FAULT_KINDS)}, got {sorted(kinds)}"
        )
    at = _times(duration)
    runner = st.integers(0, runners - 1)
    lasting = st.sampled_from(_DURATIONS)
    options: dict[str, SearchStrategy[Fault]] = {
        "kill": st.builds(KillRunner, at=at, runner=runner, down_for=lasting),
        "stop": st.builds(StopRunner, at=at, runner=runner, down_for=lasting),
        "freeze": st.builds(FreezeRunner, at=at, runner=runner, duration=lasting),
        "partition": st.builds(
            PartitionRunners, at=at, a=runner, b=runner, duration=lasting
        ),
        "storage": st.builds(
            StorageOutage,
            at=at,
            runner=st.none() | runner,
            duration=lasting,
            hang=st.booleans(),
        ),
        "session": st.builds(LoseLockSession, at=at, runner=runner),
        "skew": st.builds(
            SkewClock, at=at, runner=runner, seconds=st.integers(-30, 30).map(float)
        ),
        "frames": st.builds(
            FrameFaults,
            at=at,
            duration=lasting,
            drop=st.sampled_from(_PROBABILITIES),
            duplicate=st.sampled_from(_PROBABILITIES),
            delay=st.sampled_from(_PROBABILITIES),
            max_delay=st.sampled_from((0.01, 0.1, 0.5)),
        ),
    }
    fault = st.one_of(*(options[name] for name in sorted(kinds)))
    return st.lists(fault, max_size=max_faults).map(
        lambda faults: FaultSchedule(sorted(faults, key=lambda f: f.at))
    )


def workloads(
    *,
    runners: int,
    entities: int = 4,
    duration: float = 20.0,
    max_ops: int = 6,
    max_count: int = 8,
    kinds: Collection[OpKind] = DEFAULT_KINDS,
    background: Collection[int] = (4, 8, 0),
) -> SearchStrategy[Workload]:
    """Workloads of up to ``max_ops`` clients of `Probe` entities
    ``p0 .. p<entities-1>``, each sending up to ``max_count`` messages,
    starting within ``duration`` virtual seconds, plus one of ``background``
    (see `Workload.background`)."""
    op = st.builds(
        ClientOp,
        at=_times(duration),
        via=st.integers(0, runners - 1),
        entity=st.integers(0, entities - 1),
        kind=st.sampled_from(sorted(kinds, key=lambda kind: kind.value)),
        count=st.integers(1, max_count),
        work=st.sampled_from((0.0, 0.2, 1.0, 3.0)),
        resend=st.booleans(),
        pause=st.sampled_from((0.0, 0.5, 2.0)),
    )
    return st.builds(
        Workload,
        ops=st.lists(op, max_size=max_ops),
        background=st.sampled_from(list(background)),
    )


def scenarios(
    *,
    runners: SearchStrategy[int] | int = 3,
    duration: float = 20.0,
    max_faults: int = 4,
    kinds: Collection[str] = FAULT_KINDS,
    entities: int = 4,
    max_ops: int = 6,
    op_kinds: Collection[OpKind] = DEFAULT_KINDS,
) -> SearchStrategy[Scenario]:
    """Scenarios for `run_scenario`: a seed, a cluster size, a fault
    schedule and a workload (of clients of ``op_kinds``) over the same
    ``duration``."""
    sizes = st.just(runners) if isinstance(runners, int) else runners

    @st.composite
    def build(draw: st.DrawFn) -> Scenario:
        size = draw(sizes)
        faults = draw(
            fault_schedules(
                runners=size, duration=duration, max_faults=max_faults, kinds=kinds
            )
        )
        workload = draw(
            workloads(
                runners=size,
                entities=entities,
                duration=duration,
                max_ops=max_ops,
                kinds=op_kinds,
            )
        )
        seed = draw(st.integers(0, 2**16))
        return Scenario(seed=seed, runners=size, faults=faults, workload=workload)

    return build()
