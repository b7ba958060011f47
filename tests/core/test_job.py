"""The job lifecycle (`trio_cluster._core._job`): every allowed transition,
and every refused one."""

from __future__ import annotations

import itertools

import pytest

from trio_cluster import ClusterInternalError
from trio_cluster._core._job import (
    FINISH,
    GRANT,
    ON,
    TRANSITIONS,
    JobEvent,
    JobState,
    advance,
)

Q, G, B, D = JobState.QUEUED, JobState.GRANTED, JobState.BOUNCED, JobState.DONE

ALLOWED = {
    (Q, JobEvent.GRANT): G,
    (Q, JobEvent.WITHDRAW): D,
    (Q, JobEvent.BOUNCE): B,
    (G, JobEvent.FINISH): D,
    (G, JobEvent.REQUEUE): Q,
}
"""The lifecycle of the module docstring, written out again by hand."""

REFUSED = [
    pair for pair in itertools.product(JobState, JobEvent) if pair not in ALLOWED
]


def test_the_table_is_the_documented_lifecycle():
    assert TRANSITIONS == ALLOWED


@pytest.mark.parametrize(("state", "event"), list(ALLOWED), ids=str)
def test_allowed_transition(state, event):
    assert advance(state, event) is ALLOWED[state, event]


@pytest.mark.parametrize(("state", "event"), REFUSED, ids=str)
def test_refused_transition_is_a_bug(state, event):
    with pytest.raises(ClusterInternalError, match=f"a {state.value} job cannot"):
        advance(state, event)


def test_final_states_accept_nothing():
    for state in (B, D):
        for event in JobEvent:
            with pytest.raises(ClusterInternalError):
                advance(state, event)


def test_a_replayed_job_runs_again():
    state = Q
    for event in (JobEvent.GRANT, JobEvent.REQUEUE, JobEvent.GRANT, JobEvent.FINISH):
        state = advance(state, event)
    assert state is D


def test_the_hot_path_moves_are_the_table_checked():
    assert GRANT[JobState.QUEUED] is JobState.GRANTED
    assert FINISH[JobState.GRANTED] is JobState.DONE
    for event, moves in ON.items():
        assert dict(moves) == {
            source: target
            for (source, on), target in TRANSITIONS.items()
            if on is event
        }
    with pytest.raises(ClusterInternalError, match="a done job cannot grant"):
        GRANT[JobState.DONE]
