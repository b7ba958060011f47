"""Property tests: no generated fault schedule breaks an invariant.

Each example is one simulated cluster in its own ``trio.run`` (see
`run_scenario`): the faults are played while clients of `Probe` entities send
persisted and volatile messages; every invariant is checked continuously, and
liveness once the faults stop. The ``dev`` profile tries a few dozen
scenarios, ``ci`` (``tox -e simulation``) hundreds.
"""

from __future__ import annotations

import pytest
from hypothesis import given, strategies as st

from trio_cluster.testing import OpKind, run_scenario, scenarios

pytestmark = pytest.mark.simulation


@given(scenario=scenarios(runners=3))
def test_no_fault_schedule_breaks_an_invariant(scenario):
    run_scenario(scenario)


@given(
    scenario=scenarios(
        runners=st.integers(2, 5),
        kinds={"kill", "stop", "freeze", "partition", "session"},
        max_faults=6,
    )
)
def test_clusters_of_any_size_survive_kills_freezes_and_partitions(scenario):
    run_scenario(scenario)


@given(scenario=scenarios(runners=3, op_kinds=tuple(OpKind)))
def test_callers_giving_up_mid_call_break_no_invariant(scenario):
    # Persisted callers cancelled while their request is written (in their
    # own task when alone: `Batcher`), while it runs in their task, or while
    # they wait: every request is still answered once (its reply, or its
    # interruption), nothing stays claimed with nobody to run it.
    run_scenario(scenario)
