"""Test support for trio_cluster and its users (public namespace).

Names are imported lazily, on first access, so that ``import
trio_cluster.testing`` does not import pytest or Hypothesis: those are only
needed by the parts that use them (`StorageConformance` needs pytest, the
strategies `fault_schedules`, `workloads` and `scenarios` need Hypothesis).

The simulator: `open_simulated_cluster` runs a whole cluster in one process on
virtual time, with fault injection (`SimulatedCluster.kill`, ``freeze``,
``partition``, ... or a `FaultSchedule`) and invariants checked as it runs
(`InvariantViolation`); `run_scenario` plays a `Scenario` of faults and a
`Workload` of `Probe` clients in its own ``trio.run``. See
``docs/testing.md``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ._conformance import StorageConformance as StorageConformance
    from ._simulation import (
        current_simulation as current_simulation,
        open_simulated_cluster as open_simulated_cluster,
        run_simulation as run_simulation,
    )
    from ._simulation_cluster import SimulatedCluster as SimulatedCluster
    from ._simulation_faults import (
        FaultSchedule as FaultSchedule,
        FrameFaults as FrameFaults,
        FreezeRunner as FreezeRunner,
        KillRunner as KillRunner,
        LoseLockSession as LoseLockSession,
        PartitionRunners as PartitionRunners,
        SkewClock as SkewClock,
        StorageOutage as StorageOutage,
    )
    from ._simulation_probe import (
        Probe as Probe,
        ProbeTouch as ProbeTouch,
        ProbeWrite as ProbeWrite,
    )
    from ._simulation_runner import (
        SimulatedRunner as SimulatedRunner,
    )
    from ._simulation_strategies import (
        fault_schedules as fault_schedules,
        scenarios as scenarios,
        workloads as workloads,
    )
    from ._simulation_trace import (
        InvariantViolation as InvariantViolation,
        SimulationTrace as SimulationTrace,
        TraceEvent as TraceEvent,
    )
    from ._simulation_workload import (
        ClientOp as ClientOp,
        OpKind as OpKind,
        Scenario as Scenario,
        ScenarioReport as ScenarioReport,
        Workload as Workload,
        check_scenario as check_scenario,
        run_scenario as run_scenario,
    )
    from ._transport_conformance import (
        TransportConformance as TransportConformance,
    )

__all__ = [
    "ClientOp",
    "FaultSchedule",
    "FrameFaults",
    "FreezeRunner",
    "InvariantViolation",
    "KillRunner",
    "LoseLockSession",
    "OpKind",
    "PartitionRunners",
    "Probe",
    "ProbeTouch",
    "ProbeWrite",
    "Scenario",
    "ScenarioReport",
    "SimulatedCluster",
    "SimulatedRunner",
    "SimulationTrace",
    "SkewClock",
    "StorageConformance",
    "StorageOutage",
    "TraceEvent",
    "TransportConformance",
    "Workload",
    "check_scenario",
    "current_simulation",
    "fault_schedules",
    "open_simulated_cluster",
    "run_scenario",
    "run_simulation",
    "scenarios",
    "workloads",
]

# Public name -> private module that defines it (add new names here).
_LAZY: dict[str, str] = {
    "StorageConformance": "._conformance",
    "TransportConformance": "._transport_conformance",
    "ClientOp": "._simulation_workload",
    "FaultSchedule": "._simulation_faults",
    "FrameFaults": "._simulation_faults",
    "FreezeRunner": "._simulation_faults",
    "InvariantViolation": "._simulation_trace",
    "KillRunner": "._simulation_faults",
    "LoseLockSession": "._simulation_faults",
    "OpKind": "._simulation_workload",
    "PartitionRunners": "._simulation_faults",
    "Probe": "._simulation_probe",
    "ProbeTouch": "._simulation_probe",
    "ProbeWrite": "._simulation_probe",
    "Scenario": "._simulation_workload",
    "ScenarioReport": "._simulation_workload",
    "SimulatedCluster": "._simulation_cluster",
    "SimulatedRunner": "._simulation_runner",
    "SimulationTrace": "._simulation_trace",
    "SkewClock": "._simulation_faults",
    "StorageOutage": "._simulation_faults",
    "TraceEvent": "._simulation_trace",
    "Workload": "._simulation_workload",
    "check_scenario": "._simulation_workload",
    "current_simulation": "._simulation",
    "fault_schedules": "._simulation_strategies",
    "open_simulated_cluster": "._simulation",
    "run_scenario": "._simulation_workload",
    "run_simulation": "._simulation",
    "scenarios": "._simulation_strategies",
    "workloads": "._simulation_strategies",
}


def __getattr__(name: str) -> object:
    module_name = _LAZY.get(name)
    if module_name is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module_name, __name__), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
