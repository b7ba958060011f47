"""The simulator finds bugs: with a bug planted in the runtime (`planted`),
Hypothesis must find a scenario that breaks the invariant it threatens.

In the ``dev`` profile the search is focused on the faults that matter, at
most two (a fast, deterministic check that the invariant is wired up); in
the ``ci`` profile it draws many more schedules of those kinds, of any
length, and the counterexample must also shrink to a schedule a person can
read. (Drawing from every kind of fault, as the property tests do, found
`no_fencing` in 1 of 250 schedules at best: whether it did hung on timings
that changed when runners stopped polling the live runners.)
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, Phase, find, settings

from trio_cluster.testing import (
    InvariantViolation,
    Scenario,
    run_scenario,
    scenarios,
)

from .planted import PLANTED

pytestmark = pytest.mark.simulation

THOROUGH = settings().max_examples >= 100
"""Running with a large profile (``ci``)."""

CASES = [
    # bug, the invariant it breaks, the faults a focused search draws
    ("release_without_cancelling", "single owner", {"kill"}),
    ("lease_never_lapses", "single owner", {"freeze"}),
    ("no_fencing", "fencing", {"freeze"}),
    ("claims_out_of_order", "FIFO", {"kill"}),
]


def violation(scenario: Scenario) -> InvariantViolation | None:
    try:
        run_scenario(scenario)
    except InvariantViolation as exc:
        return exc
    return None


@pytest.mark.parametrize(("bug", "invariant", "focus"), CASES)
def test_the_simulation_finds_a_planted_bug(monkeypatch, bug, invariant, focus):
    PLANTED[bug](monkeypatch)
    strategy = (
        scenarios(kinds=focus) if THOROUGH else scenarios(kinds=focus, max_faults=2)
    )
    found = find(
        strategy,
        lambda scenario: violation(scenario) is not None,
        settings=settings(
            max_examples=settings().max_examples,
            derandomize=True,
            database=None,
            deadline=None,
            phases=[Phase.generate, Phase.shrink] if THOROUGH else [Phase.generate],
            suppress_health_check=[HealthCheck.too_slow],
        ),
    )
    error = violation(found)  # the same seed fails the same way
    assert error is not None
    assert error.message.startswith(f"{invariant}:"), error.message
    if THOROUGH:
        # Shrunk to a schedule a person can read.
        assert len(found.faults.faults) <= 2, found
        assert len(found.workload.ops) <= 2, found
