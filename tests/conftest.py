"""Shared test configuration: Hypothesis profiles and common fixtures."""

from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, settings

from .helpers import Tracked

pytest_plugins = ["tests.pg_fixture", "tests.tls_fixture"]

# `dev` keeps the default test command fast and deterministic; `ci` explores
# much more (selected with HYPOTHESIS_PROFILE=ci, as `tox -e simulation` does).
settings.register_profile(
    "dev",
    max_examples=25,
    deadline=None,
    # The default test command is deterministic: the same examples every run
    # (the `ci` profile explores new ones).
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)
# `ci`: sized so that `.ci/run` stays near 20 minutes on a 2-core machine
# (its 73 simulation tests took 30 min at 400 examples under load);
# `thorough` for a longer hunt (`HYPOTHESIS_PROFILE=thorough tox -e
# simulation`).
settings.register_profile(
    "ci",
    max_examples=250,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile(
    "thorough",
    max_examples=1500,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))


@pytest.fixture
def clear_tracked_log() -> None:
    """A fresh `tests.helpers.Tracked.log` (it is shared across incarnations)."""
    Tracked.log = []
