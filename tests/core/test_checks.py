"""Tests of the configuration-number checks (``_core/_checks.py``)."""

from __future__ import annotations

import datetime as dt
import math
from typing import TYPE_CHECKING

import pytest

from trio_cluster import ConfigError
from trio_cluster._core._checks import (
    ARGUMENT,
    CONFIG,
    aware_time,
    count,
    integer,
    is_integer,
    is_number,
    non_negative_seconds,
    positive_count,
    positive_number,
    positive_seconds,
    timestamp,
)

if TYPE_CHECKING:
    from collections.abc import Callable


@pytest.mark.parametrize(
    ("value", "number", "whole"),
    [
        (1, True, True),
        (1.5, True, False),
        (math.nan, True, False),
        (True, False, False),
        (False, False, False),
        ("1", False, False),
        (None, False, False),
    ],
)
def test_numbers_exclude_bools(value: object, number: bool, whole: bool) -> None:
    assert is_number(value) is number
    assert is_integer(value) is whole


def test_seconds_are_returned_as_floats() -> None:
    assert positive_seconds("t", 2) == 2.0
    assert isinstance(positive_seconds("t", 2), float)
    assert non_negative_seconds("t", 0) == 0.0
    assert positive_number("w", 3) == 3
    assert timestamp("now", 5) == 5.0


@pytest.mark.parametrize(
    ("check", "value", "message"),
    [
        (
            positive_seconds,
            "5",
            "t must be a number, got '5': give a number of seconds",
        ),
        (positive_seconds, True, "t must be a number, got True"),
        (positive_seconds, 0, "t must be a positive, finite number of seconds, got 0"),
        (positive_seconds, -1.0, "positive, finite number of seconds"),
        (positive_seconds, math.inf, "positive, finite number of seconds, got inf"),
        (positive_seconds, math.nan, "positive, finite number of seconds, got nan"),
        (non_negative_seconds, -0.5, "t must be a finite number of seconds >= 0"),
        (non_negative_seconds, math.inf, "t must be a finite number of seconds >= 0"),
        (positive_number, 0, "t must be a positive, finite number, got 0"),
        (positive_number, None, "t must be a number, got None"),
        (positive_count, 0, "t must be an integer >= 1, got 0"),
        (positive_count, 1.5, "t must be an integer >= 1, got 1.5"),
        (positive_count, True, "t must be an integer >= 1, got True"),
        (count, -1, "t must be an integer >= 0, got -1"),
        (integer, 1.0, "t must be an int, got 1.0"),
        (timestamp, "now", r"t must be a float \(seconds since the epoch\)"),
        (timestamp, math.inf, "t must be finite, got inf"),
    ],
)
def test_config_errors_name_the_option(
    check: Callable[..., object], value: object, message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        check("t", value)


def test_argument_errors_are_the_builtins() -> None:
    with pytest.raises(TypeError, match="lease must be a number") as wrong_type:
        positive_seconds("lease", "1", errors=ARGUMENT)
    assert not isinstance(wrong_type.value, ConfigError)
    with pytest.raises(ValueError, match="positive, finite") as wrong_value:
        positive_seconds("lease", 0, errors=ARGUMENT)
    assert not isinstance(wrong_value.value, ConfigError)
    with pytest.raises(TypeError, match="limit must be an integer >= 0"):
        count("limit", 1.5, errors=ARGUMENT)
    with pytest.raises(TypeError, match="request id must be an int"):
        integer("request id", False, errors=ARGUMENT)
    assert (ConfigError, ConfigError) == CONFIG


def test_count_with_a_minimum_and_a_unit() -> None:
    assert count("size", 2048, minimum=1024, unit="bytes") == 2048
    with pytest.raises(ConfigError, match="size must be an integer of at least 1024"):
        count("size", 1023, minimum=1024, unit="bytes")
    with pytest.raises(ConfigError, match="at least 1024 bytes, got 'big'"):
        count("size", "big", minimum=1024, unit="bytes")


def test_aware_time() -> None:
    now = dt.datetime(2027, 1, 15, tzinfo=dt.UTC)
    assert aware_time("at", now) is now
    with pytest.raises(
        ConfigError, match="at must be an aware datetime, got the naive"
    ):
        aware_time("at", now.replace(tzinfo=None))
    with pytest.raises(TypeError, match=r"at must be an aware datetime, got 1\.0"):
        aware_time("at", 1.0, errors=ARGUMENT)
