"""Fixed-bucket latency histograms (sans-IO).

`Histogram` counts observations into cumulative-friendly buckets with fixed
upper bounds, like a Prometheus histogram: recording is one binary search
and two additions, so it can sit on every call. The caller measures time.
"""

from __future__ import annotations

from bisect import bisect_left
from itertools import pairwise
from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:
    from collections.abc import Sequence

__all__ = ["LATENCY_BUCKETS", "Histogram"]

LATENCY_BUCKETS: Final[tuple[float, ...]] = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)
"""Upper bounds in seconds, from 100 µs to 10 s."""


class Histogram:
    """Counts of observations per bucket, their sum and their number."""

    __slots__ = ("bounds", "count", "counts", "total")

    def __init__(self, bounds: Sequence[float] = LATENCY_BUCKETS) -> None:
        if not bounds or any(b <= a for a, b in pairwise(bounds)):
            raise ValueError("bucket bounds must be a non-empty increasing sequence")
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)
        """Per bucket; the last one counts values above every bound."""
        self.total = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        """Count one observation (a value equal to a bound goes in its bucket)."""
        self.counts[bisect_left(self.bounds, value)] += 1
        self.total += value
        self.count += 1

    def cumulative(self) -> list[tuple[float, int]]:
        """``(upper bound, observations ≤ bound)`` pairs, ending with
        ``(inf, count)``: the Prometheus ``_bucket`` series."""
        pairs: list[tuple[float, int]] = []
        running = 0
        for bound, count in zip((*self.bounds, float("inf")), self.counts, strict=True):
            running += count
            pairs.append((bound, running))
        return pairs
