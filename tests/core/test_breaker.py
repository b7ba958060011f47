"""`CircuitBreaker` (sans-IO)."""

from __future__ import annotations

import pytest

from trio_cluster import ConfigError
from trio_cluster._core._breaker import BreakerPolicy, BreakerState, CircuitBreaker


def test_it_opens_after_threshold_consecutive_failures() -> None:
    breaker = CircuitBreaker(BreakerPolicy(threshold=3, cool_down=10))
    for now in (0.0, 1.0):
        assert breaker.admit(now) == 0
        breaker.failed(now)
    assert breaker.state(1.5) is BreakerState.CLOSED
    breaker.succeeded()  # a success resets the count
    for now in (2.0, 3.0, 4.0):
        assert breaker.admit(now) == 0
        breaker.failed(now)
    assert breaker.failures == 3
    assert breaker.state(5.0) is BreakerState.OPEN
    assert breaker.admit(5.0) == pytest.approx(9.0)


def test_half_open_admits_one_probe_that_decides() -> None:
    breaker = CircuitBreaker(BreakerPolicy(threshold=1, cool_down=10, probe_wait=2))
    breaker.failed(0.0)
    assert breaker.state(10.0) is BreakerState.HALF_OPEN
    assert breaker.admit(10.0) == 0  # the probe
    assert breaker.admit(10.5) == 2  # the others wait
    breaker.succeeded()
    assert breaker.state(11.0) is BreakerState.CLOSED
    assert breaker.admit(11.0) == 0


def test_an_abandoned_probe_lets_the_next_call_probe() -> None:
    breaker = CircuitBreaker(BreakerPolicy(threshold=1, cool_down=10, probe_wait=2))
    breaker.failed(0.0)
    assert breaker.admit(10.0) == 0
    assert breaker.admit(10.0) == 2
    breaker.abandoned()
    assert breaker.admit(10.5) == 0  # a new probe
    breaker.succeeded()
    assert breaker.state(11.0) is BreakerState.CLOSED


def test_a_failed_probe_doubles_the_cool_down_up_to_the_maximum() -> None:
    policy = BreakerPolicy(threshold=1, cool_down=10, max_cool_down=30)
    breaker = CircuitBreaker(policy)
    breaker.failed(0.0)
    opened = 10.0
    for cool_down in (20, 30, 30):
        assert breaker.admit(opened) == 0
        breaker.failed(opened)
        assert breaker.admit(opened) == cool_down
        opened += cool_down
    assert breaker.admit(opened) == 0
    breaker.succeeded()
    breaker.failed(100.0)
    assert breaker.admit(100.0) == 10  # back to the first cool-down


def test_failures_while_open_do_not_extend_it() -> None:
    breaker = CircuitBreaker(BreakerPolicy(threshold=1, cool_down=10))
    breaker.failed(0.0)
    breaker.failed(5.0)  # a call admitted before it opened
    assert breaker.admit(5.0) == 5


@pytest.mark.parametrize(
    "options",
    [
        {"threshold": 0},
        {"threshold": True},
        {"cool_down": 0},
        {"cool_down": float("inf")},
        {"probe_wait": -1},
        {"cool_down": 100, "max_cool_down": 10},
    ],
)
def test_invalid_policies_are_config_errors(options: dict[str, object]) -> None:
    with pytest.raises(ConfigError):
        BreakerPolicy(**options)  # type: ignore[arg-type]
