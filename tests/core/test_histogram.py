from __future__ import annotations

import math

import pytest

from trio_cluster._core._histogram import LATENCY_BUCKETS, Histogram


def test_observations_land_in_their_buckets() -> None:
    histogram = Histogram((0.1, 1.0))
    for value in (0.05, 0.1, 0.5, 1.0, 3.0):
        histogram.observe(value)
    assert histogram.counts == [2, 2, 1]
    assert histogram.count == 5
    assert histogram.total == pytest.approx(4.65)
    assert histogram.cumulative() == [(0.1, 2), (1.0, 4), (math.inf, 5)]


def test_default_buckets_span_100_microseconds_to_10_seconds() -> None:
    histogram = Histogram()
    assert histogram.bounds == LATENCY_BUCKETS
    assert histogram.cumulative()[-1] == (math.inf, 0)


@pytest.mark.parametrize("bounds", [(), (1.0, 1.0), (2.0, 1.0)])
def test_bounds_must_increase(bounds: tuple[float, ...]) -> None:
    with pytest.raises(ValueError, match="increasing"):
        Histogram(bounds)
