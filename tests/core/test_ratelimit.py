"""Tests of trio_cluster._core._ratelimit: the token bucket and keyed windows."""

from __future__ import annotations

import pytest

from trio_cluster import ConfigError
from trio_cluster._core._ratelimit import (
    KeyedWindows,
    RateLimit,
    TokenBucket,
    WindowLimit,
)


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


def test_try_take_refuses_without_taking() -> None:
    bucket = TokenBucket(RateLimit(2.0, burst=2), now=0.0)
    assert bucket.try_take(0.0) == 0.0
    assert bucket.try_take(0.0) == 0.0
    assert bucket.try_take(0.0) == 0.5  # a token in half a second
    assert bucket.try_take(0.25) == 0.25  # the refusal took nothing
    assert bucket.try_take(0.5) == 0.0


def test_ahead_counts_the_events_over_the_rate() -> None:
    bucket = TokenBucket(RateLimit(10.0, burst=20), now=0.0)
    assert bucket.ahead == 0.0
    for _ in range(5):
        bucket.try_take(0.0)
    assert bucket.ahead == 5.0
    bucket.try_take(0.2)  # 2 tokens back, 1 taken
    assert bucket.ahead == pytest.approx(4.0)
    bucket.try_take(10.0)  # full again, then 1 taken
    assert bucket.ahead == pytest.approx(1.0)


def test_window_allows_limit_then_blocks() -> None:
    windows = KeyedWindows(WindowLimit(3, per=60.0, block_for=300.0))
    assert [windows.check("1.2.3.4", float(t)) for t in range(3)] == [0.0] * 3
    assert windows.check("1.2.3.4", 10.0) == 300.0  # over: blocked from now
    assert windows.check("5.6.7.8", 10.0) == 0.0  # other keys are untouched
    assert windows.check("1.2.3.4", 100.0) == 210.0
    assert windows.check("1.2.3.4", 310.0) == 0.0  # block over: a new window


def test_blocked_for_says_the_block_and_counts_nothing() -> None:
    windows = KeyedWindows(WindowLimit(2, per=60.0, block_for=300.0))
    assert windows.blocked_for("1.2.3.4", 0.0) == 0.0  # unknown
    windows.check("1.2.3.4", 0.0)
    windows.check("1.2.3.4", 1.0)
    for _ in range(5):  # at the limit, not over: asking counts nothing
        assert windows.blocked_for("1.2.3.4", 2.0) == 0.0
    assert windows.check("1.2.3.4", 10.0) == 300.0
    assert windows.blocked_for("1.2.3.4", 110.0) == 200.0
    assert windows.blocked_for("5.6.7.8", 110.0) == 0.0
    assert windows.blocked_for("1.2.3.4", 310.0) == 0.0  # over
    assert windows.check("1.2.3.4", 310.0) == 0.0


def test_window_without_block_waits_for_the_window_end() -> None:
    windows = KeyedWindows(WindowLimit(1, per=10.0))
    assert windows.check("k", 0.0) == 0.0
    assert windows.check("k", 4.0) == 6.0
    assert windows.check("k", 10.0) == 0.0


def test_window_table_is_bounded_and_keeps_blocked_keys() -> None:
    windows = KeyedWindows(WindowLimit(1, per=60.0, block_for=300.0), max_keys=2)
    windows.check("blocked", 0.0)
    assert windows.check("blocked", 0.0) == 300.0
    windows.check("b", 1.0)
    windows.check("c", 2.0)  # forgets "b", not the blocked key
    assert len(windows) == 2
    assert windows.check("blocked", 3.0) == 297.0
    assert windows.check("b", 3.0) == 0.0  # forgotten: a fresh window


@pytest.mark.parametrize(
    "kwargs",
    [
        {"limit": 0, "per": 1.0},
        {"limit": 1.5, "per": 1.0},
        {"limit": 1, "per": 0.0},
        {"limit": 1, "per": 1.0, "block_for": -1.0},
    ],
)
def test_window_limit_is_validated(kwargs: dict[str, object]) -> None:
    with pytest.raises(ConfigError):
        WindowLimit(**kwargs)  # type: ignore[arg-type]
    with pytest.raises(ConfigError):
        KeyedWindows(WindowLimit(1, per=1.0), max_keys=0)
