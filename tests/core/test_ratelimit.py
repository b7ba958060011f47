"""Tests of trio_cluster._core._ratelimit: the token bucket."""

from __future__ import annotations

import pytest

from trio_cluster import ConfigError
from trio_cluster._core._ratelimit import RateLimit, TokenBucket


def test_a_burst_passes_then_events_are_spaced():
    bucket = TokenBucket(RateLimit(2.0, burst=3), now=0.0)
    assert [bucket.take(0.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert bucket.take(0.0) == pytest.approx(0.5)
    assert bucket.take(0.0) == pytest.approx(1.0)


def test_tokens_come_back_with_time_up_to_the_burst():
    bucket = TokenBucket(RateLimit(1.0, burst=2), now=0.0)
    bucket.take(0.0)
    bucket.take(0.0)
    assert bucket.take(0.5) == pytest.approx(0.5)
    assert bucket.take(100.0) == 0.0  # refilled, capped at 2
    assert bucket.take(100.0) == 0.0
    assert bucket.take(100.0) == pytest.approx(1.0)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"per_second": 0},
        {"per_second": -1},
        {"per_second": float("inf")},
        {"per_second": True},
        {"per_second": 1, "burst": 0.5},
    ],
)
def test_bad_limits_raise_config_error(kwargs):
    with pytest.raises(ConfigError):
        RateLimit(**kwargs)
