"""`RetrySchedule` and `parse_retry_after` (sans-IO)."""

from __future__ import annotations

import pytest

from trio_cluster import ConfigError
from trio_cluster._core._schedule import SVIX_DELAYS, RetrySchedule, parse_retry_after

NOW = 1_800_000_000.0


def test_the_default_is_svix_s_schedule() -> None:
    schedule = RetrySchedule(jitter=0)
    assert schedule.delays == SVIX_DELAYS
    assert list(SVIX_DELAYS) == [0, 5, 300, 1800, 7200, 18000, 36000, 36000]
    assert schedule.attempts == 8
    assert [schedule.next_delay(n) for n in range(1, 9)] == [
        5,
        300,
        1800,
        7200,
        18000,
        36000,
        36000,
        None,
    ]


def test_jitter_shortens_by_up_to_its_fraction() -> None:
    schedule = RetrySchedule((0, 100), jitter=0.1)
    assert schedule.next_delay(1, random_unit=0.0) == 100
    assert schedule.next_delay(1, random_unit=0.5) == pytest.approx(95)
    assert schedule.next_delay(1, random_unit=0.999) == pytest.approx(90.01)


def test_retry_after_pushes_later_never_earlier_and_is_capped() -> None:
    schedule = RetrySchedule((0, 100), jitter=0, max_retry_after=1000)
    assert schedule.next_delay(1, retry_after=10) == 100
    assert schedule.next_delay(1, retry_after=500) == 500
    assert schedule.next_delay(1, retry_after=10**9) == 1000
    assert schedule.next_delay(2, retry_after=500) is None


def test_bad_arguments_are_refused() -> None:
    schedule = RetrySchedule()
    with pytest.raises(ValueError, match="attempt"):
        schedule.next_delay(0)
    with pytest.raises(ValueError, match="random_unit"):
        schedule.next_delay(1, random_unit=1.0)


@pytest.mark.parametrize(
    "options",
    [
        {"delays": ()},
        {"delays": (0, -1)},
        {"delays": (0, float("inf"))},
        {"delays": (0, True)},
        {"delays": "0,5"},
        {"delays": (0,) * 101},
        {"jitter": 1.5},
        {"jitter": True},
        {"max_retry_after": -1},
        {"max_retry_after": float("nan")},
    ],
)
def test_invalid_schedules_are_config_errors(options: dict[str, object]) -> None:
    with pytest.raises(ConfigError):
        RetrySchedule(**options)  # type: ignore[arg-type]


def test_retry_after_seconds_and_dates() -> None:
    assert parse_retry_after("120", NOW) == 120
    assert parse_retry_after(" 7 ", NOW) == 7
    assert parse_retry_after(None, NOW) is None
    assert parse_retry_after("soon", NOW) is None
    assert parse_retry_after("-5", NOW) is None
    date = "Fri, 15 Jan 2027 08:01:40 GMT"  # NOW + 100 s
    assert parse_retry_after(date, NOW) == pytest.approx(100)
    assert parse_retry_after(date, NOW + 1000) == 0
    assert parse_retry_after("Fri, 15 Jan 2027 08:01:40", NOW) == pytest.approx(100)
