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
``docs/testing.md``. `MemoryGateways` serves gateways to clients over
memory streams, with faults on the client links (in the simulator too).

Storage backends: subclass `StorageConformance` (and `TransportConformance`
for transports, whose tests can use its `RecordingHandler`) to run the
contract's tests on yours. Your backend's own
tests can build the same records and steps: `persisted_request`,
`final_reply`, `runner_info`, `entity_address`, `conformance_shard`
(`SHARD`, `SHARD2`), the fixed time `BASE_TIME`, `acquire_shards`,
`replies_of` and `saved_and_claimed`.

Workflows: `replay_workflow` replays a recorded execution's journal
against today's code (``docs/workflows.md``).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from .._metadata import fixup_name

if TYPE_CHECKING:
    from ._conformance._base import (
        BASE_TIME as BASE_TIME,
        SHARD as SHARD,
        SHARD2 as SHARD2,
        acquire_shards as acquire_shards,
        conformance_shard as conformance_shard,
        entity_address as entity_address,
        final_reply as final_reply,
        persisted_request as persisted_request,
        replies_of as replies_of,
        runner_info as runner_info,
        saved_and_claimed as saved_and_claimed,
    )
    from ._conformance._storage import StorageConformance as StorageConformance
    from ._conformance._transport import (
        RecordingHandler as RecordingHandler,
        TransportConformance as TransportConformance,
    )
    from ._conformance._webhooks import (
        WebhookStorageConformance as WebhookStorageConformance,
    )
    from ._gateway import MemoryGateways as MemoryGateways, MemoryLink as MemoryLink
    from ._processes import ChildProcess as ChildProcess
    from ._simulation._cluster import SimulatedCluster as SimulatedCluster
    from ._simulation._faults import (
        Fault as Fault,
        FaultSchedule as FaultSchedule,
        FrameFaults as FrameFaults,
        FreezeRunner as FreezeRunner,
        KillRunner as KillRunner,
        LoseLockSession as LoseLockSession,
        PartitionRunners as PartitionRunners,
        SkewClock as SkewClock,
        StopRunner as StopRunner,
        StorageOutage as StorageOutage,
    )
    from ._simulation._probe import (
        Probe as Probe,
        ProbeTouch as ProbeTouch,
        ProbeWrite as ProbeWrite,
    )
    from ._simulation._run import (
        current_simulation as current_simulation,
        open_simulated_cluster as open_simulated_cluster,
        run_simulation as run_simulation,
    )
    from ._simulation._runner import (
        SimulatedRunner as SimulatedRunner,
    )
    from ._simulation._strategies import (
        fault_schedules as fault_schedules,
        scenarios as scenarios,
        workloads as workloads,
    )
    from ._simulation._trace import (
        InvariantViolation as InvariantViolation,
        SimulationTrace as SimulationTrace,
        TraceEvent as TraceEvent,
    )
    from ._simulation._workload import (
        ClientOp as ClientOp,
        OpKind as OpKind,
        Scenario as Scenario,
        ScenarioReport as ScenarioReport,
        Workload as Workload,
        check_scenario as check_scenario,
        run_scenario as run_scenario,
    )
    from ._workflows import replay_workflow as replay_workflow

__all__ = [  # noqa: RUF022 (plain sorted order, checked by tests/test_exports.py)
    "BASE_TIME",
    "ChildProcess",
    "ClientOp",
    "Fault",
    "FaultSchedule",
    "FrameFaults",
    "FreezeRunner",
    "InvariantViolation",
    "KillRunner",
    "LoseLockSession",
    "MemoryGateways",
    "MemoryLink",
    "OpKind",
    "PartitionRunners",
    "Probe",
    "ProbeTouch",
    "ProbeWrite",
    "RecordingHandler",
    "SHARD",
    "SHARD2",
    "Scenario",
    "ScenarioReport",
    "SimulatedCluster",
    "SimulatedRunner",
    "SimulationTrace",
    "SkewClock",
    "StopRunner",
    "StorageConformance",
    "StorageOutage",
    "TraceEvent",
    "TransportConformance",
    "WebhookStorageConformance",
    "Workload",
    "acquire_shards",
    "check_scenario",
    "conformance_shard",
    "current_simulation",
    "entity_address",
    "fault_schedules",
    "final_reply",
    "open_simulated_cluster",
    "persisted_request",
    "replay_workflow",
    "replies_of",
    "run_scenario",
    "run_simulation",
    "runner_info",
    "saved_and_claimed",
    "scenarios",
    "workloads",
]

# Public name -> private module that defines it (add new names here).
_LAZY: dict[str, str] = {
    "BASE_TIME": "._conformance._base",
    "SHARD": "._conformance._base",
    "SHARD2": "._conformance._base",
    "acquire_shards": "._conformance._base",
    "conformance_shard": "._conformance._base",
    "entity_address": "._conformance._base",
    "final_reply": "._conformance._base",
    "persisted_request": "._conformance._base",
    "replies_of": "._conformance._base",
    "runner_info": "._conformance._base",
    "saved_and_claimed": "._conformance._base",
    "StorageConformance": "._conformance._storage",
    "TransportConformance": "._conformance._transport",
    "RecordingHandler": "._conformance._transport",
    "WebhookStorageConformance": "._conformance._webhooks",
    "Fault": "._simulation._faults",
    "ChildProcess": "._processes",
    "ClientOp": "._simulation._workload",
    "FaultSchedule": "._simulation._faults",
    "FrameFaults": "._simulation._faults",
    "FreezeRunner": "._simulation._faults",
    "InvariantViolation": "._simulation._trace",
    "KillRunner": "._simulation._faults",
    "LoseLockSession": "._simulation._faults",
    "MemoryGateways": "._gateway",
    "MemoryLink": "._gateway",
    "OpKind": "._simulation._workload",
    "PartitionRunners": "._simulation._faults",
    "Probe": "._simulation._probe",
    "ProbeTouch": "._simulation._probe",
    "ProbeWrite": "._simulation._probe",
    "Scenario": "._simulation._workload",
    "ScenarioReport": "._simulation._workload",
    "SimulatedCluster": "._simulation._cluster",
    "SimulatedRunner": "._simulation._runner",
    "SimulationTrace": "._simulation._trace",
    "SkewClock": "._simulation._faults",
    "StopRunner": "._simulation._faults",
    "StorageOutage": "._simulation._faults",
    "TraceEvent": "._simulation._trace",
    "Workload": "._simulation._workload",
    "check_scenario": "._simulation._workload",
    "current_simulation": "._simulation._run",
    "fault_schedules": "._simulation._strategies",
    "open_simulated_cluster": "._simulation._run",
    "run_scenario": "._simulation._workload",
    "run_simulation": "._simulation._run",
    "scenarios": "._simulation._strategies",
    "workloads": "._simulation._strategies",
    "replay_workflow": "._workflows",
}


def __getattr__(name: str) -> object:
    module_name = _LAZY.get(name)
    if module_name is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module_name, __name__), name)
    fixup_name(__name__, name, value)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
