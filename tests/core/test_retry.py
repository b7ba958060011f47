"""Tests of trio_cluster._core._retry: the backoff schedule and its validation."""

from __future__ import annotations

import itertools
import math

import pytest
from hypothesis import given, strategies as st

from trio_cluster import ConfigError
from trio_cluster._core._retry import Backoff, RetryPolicy, spread


def test_doubles_up_to_the_maximum():
    backoff = Backoff(0.1, 1.0)
    assert [backoff.delay(n) for n in range(6)] == pytest.approx(
        [0.1, 0.2, 0.4, 0.8, 1.0, 1.0]
    )


def test_custom_factor():
    backoff = Backoff(0.2, 5.0, factor=1.5)
    assert backoff.delay(0) == 0.2
    assert backoff.delay(2) == pytest.approx(0.45)


def test_factor_one_is_a_constant_rate():
    backoff = Backoff(0.5, 0.5, factor=1)
    assert {backoff.delay(n) for n in (0, 1, 100, 10**6, 10**30)} == {0.5}


@pytest.mark.parametrize("attempt", [1100, 10**6, 10**30, 2**64, 10**400])
def test_huge_attempts_saturate_without_overflow(attempt):
    assert Backoff(0.1, 10.0).delay(attempt) == 10.0
    assert Backoff(0.1, 10.0, factor=1.0).delay(attempt) == 0.1


def test_a_factor_barely_above_one_still_saturates():
    backoff = Backoff(1e-300, 1e300, factor=1 + 2**-52)
    assert backoff.delay(10**6) == pytest.approx(1e-300)
    assert backoff.delay(2**64) == backoff.delay(10**400) == 1e300


def test_jitter_removes_a_fraction():
    backoff = Backoff(1.0, 8.0, jitter=0.5)
    assert backoff.delay(0, 0.0) == 1.0
    assert backoff.delay(0, 0.5) == 0.75
    assert backoff.delay(3, 0.999) == pytest.approx(8.0 * (1 - 0.4995))


def test_random_unit_is_ignored_without_jitter():
    backoff = Backoff(1.0, 8.0)
    assert backoff.delay(2, 0.9) == backoff.delay(2) == 4.0


def test_delays_follow_the_random_units():
    backoff = Backoff(1.0, 4.0, jitter=1.0)
    assert list(backoff.delays([0.0, 0.5, 0.0, 0.25])) == [1.0, 1.0, 4.0, 3.0]
    deterministic = Backoff(1.0, 4.0).delays(itertools.repeat(0.0))
    assert list(itertools.islice(deterministic, 4)) == [1.0, 2.0, 4.0, 4.0]


def test_delays_check_each_unit_when_reached():
    delays = Backoff(1.0, 4.0).delays([0.0, 1.0])
    assert next(delays) == 1.0
    with pytest.raises(ValueError, match="random_unit"):
        next(delays)


@given(
    initial=st.floats(1e-3, 10.0),
    ratio=st.floats(1.0, 1e4),
    factor=st.floats(1.0, 10.0),
    jitter=st.floats(0.0, 1.0),
    attempt=st.integers(0, 10_000),
    unit=st.floats(0.0, 1.0, exclude_max=True),
)
def test_delay_is_bounded_and_monotonic(initial, ratio, factor, jitter, attempt, unit):
    backoff = Backoff(initial, initial * ratio, factor=factor, jitter=jitter)
    plain = Backoff(initial, initial * ratio, factor=factor)
    delay = backoff.delay(attempt, unit)
    assert (1 - jitter) * plain.delay(attempt) * (1 - 1e-12) <= delay
    assert delay <= plain.delay(attempt) <= backoff.maximum
    assert plain.delay(attempt) <= plain.delay(attempt + 1)
    assert plain.delay(0) == initial


# --------------------------------------------------------------------------
# Errors


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"initial": 0, "maximum": 1}, "initial must be > 0"),
        ({"initial": -1.0, "maximum": 1}, "initial must be > 0"),
        ({"initial": 1, "maximum": 0}, "maximum must be > 0"),
        ({"initial": math.nan, "maximum": 1}, "initial must be finite"),
        ({"initial": 1, "maximum": math.inf}, "maximum must be finite"),
        ({"initial": "1", "maximum": 1}, "initial must be a number"),
        ({"initial": True, "maximum": 1}, "initial must be a number"),
        ({"initial": 2, "maximum": 1}, "maximum .* is below initial"),
        ({"initial": 1, "maximum": 2, "factor": 0.5}, "factor must be >= 1"),
        ({"initial": 1, "maximum": 2, "factor": None}, "factor must be a number"),
        ({"initial": 1, "maximum": 2, "jitter": -0.1}, r"jitter must be in \[0, 1\]"),
        ({"initial": 1, "maximum": 2, "jitter": 1.5}, r"jitter must be in \[0, 1\]"),
        ({"initial": 1, "maximum": 2, "jitter": math.inf}, "jitter must be finite"),
    ],
)
def test_invalid_policies_are_config_errors(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        Backoff(**kwargs)


@pytest.mark.parametrize("attempt", [1.0, "1", True])
def test_attempt_must_be_an_int(attempt):
    with pytest.raises(TypeError, match="attempt must be an int"):
        Backoff(1, 2).delay(attempt)


def test_attempt_must_not_be_negative():
    with pytest.raises(ValueError, match="attempt must be >= 0, got -1"):
        Backoff(1, 2).delay(-1)


@pytest.mark.parametrize("unit", [-0.1, 1.0, math.nan])
def test_random_unit_must_be_in_unit_interval(unit):
    with pytest.raises(ValueError, match=r"random_unit must be in \[0, 1\)"):
        Backoff(1, 2, jitter=0.5).delay(0, unit)


# ----------------------------------------------------------------------
# RetryPolicy


def test_retry_policy_allows_attempts_up_to_its_maximum():
    policy = RetryPolicy(max_attempts=3)
    assert policy.retries(1, RuntimeError())
    assert policy.retries(2, None)  # the runner stopped during attempt 2
    assert not policy.retries(3, RuntimeError())
    assert not RetryPolicy(max_attempts=1).retries(1, RuntimeError())


def test_non_retryable_errors_and_their_subclasses_end_the_attempts():
    policy = RetryPolicy(max_attempts=5, non_retryable=(LookupError,))
    assert not policy.retries(1, KeyError("k"))
    assert policy.retries(1, ValueError("v"))
    assert policy.retries(1, None)
    assert RetryPolicy(non_retryable=KeyError).non_retryable == (KeyError,)


def test_default_policy():
    policy = RetryPolicy()
    assert policy.max_attempts == 3
    assert policy.backoff == Backoff(0.1, 10.0, jitter=0.5)
    assert policy.non_retryable == ()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_attempts": 0}, "between 1 and 1000"),
        ({"max_attempts": 1001}, "between 1 and 1000"),
        ({"max_attempts": 2.0}, "must be an int"),
        ({"max_attempts": True}, "must be an int"),
        ({"backoff": 1.0}, "must be a Backoff"),
        ({"non_retryable": (KeyError, "x")}, "Exception subclasses"),
        ({"non_retryable": (BaseException,)}, "Exception subclasses"),
        ({"non_retryable": "KeyError"}, "tuple of exception classes"),
    ],
)
def test_bad_retry_policies_raise_config_error(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        RetryPolicy(**kwargs)


def test_spread_is_reproducible_and_spread_out():
    assert spread("123/1") == spread("123/1")
    values = [spread(f"{n}/1") for n in range(1000)]
    assert all(0 <= value < 1 for value in values)
    # Roughly uniform: every tenth of [0, 1) gets a fair share.
    for tenth in range(10):
        share = sum(tenth / 10 <= value < (tenth + 1) / 10 for value in values)
        assert 60 < share < 140, (tenth, share)
