"""W3's caller counts (`benchmarks.w3_persisted`): 50 by default, else those
of ``TRIO_CLUSTER_BENCH_W3_CALLERS``."""

from __future__ import annotations

import pytest

from benchmarks.w3_persisted import CALLERS, ENV_CALLERS, _callers


def test_the_concurrent_phase_runs_with_50_callers_by_default(monkeypatch):
    monkeypatch.delenv(ENV_CALLERS, raising=False)
    assert _callers() == [CALLERS] == [50]
    monkeypatch.setenv(ENV_CALLERS, " ")
    assert _callers() == [50]


def test_the_environment_names_the_caller_counts_in_order(monkeypatch):
    monkeypatch.setenv(ENV_CALLERS, "500, 50,200")
    assert _callers() == [500, 50, 200]


def test_a_caller_count_that_is_not_a_number_is_refused(monkeypatch):
    monkeypatch.setenv(ENV_CALLERS, "50,many")
    with pytest.raises(ValueError, match="many"):
        _callers()
    monkeypatch.setenv(ENV_CALLERS, "50,0")
    with pytest.raises(ValueError, match="positive"):
        _callers()
