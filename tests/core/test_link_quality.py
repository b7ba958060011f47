"""`LinkQuality`: a moving average of round trips, judged good, fair or
poor (unknown before any)."""

from __future__ import annotations

import pytest

from trio_cluster import ConfigError
from trio_cluster._core._link_quality import LinkQuality


def test_the_average_moves_by_a_fifth_of_each_round_trip() -> None:
    link = LinkQuality()
    assert (link.quality, link.average, link.last, link.samples) == (
        "unknown",
        None,
        None,
        0,
    )
    assert link.observe(0.1) == "good"
    assert link.average == pytest.approx(0.1)
    assert link.observe(2.1) == "fair"  # 0.1 + (2.1 - 0.1) / 5
    assert link.average == pytest.approx(0.5)
    assert link.last == 2.1
    for _ in range(3):
        link.observe(2.1)
    assert link.quality == "poor"
    assert link.observe(-1.0) == "poor"  # clocks: a negative one counts as 0
    assert link.last == 0.0
    assert link.samples == 6


def test_thresholds_and_weight_are_checked() -> None:
    link = LinkQuality(weight=1.0, fair_above=0.5, poor_above=0.5)
    assert link.observe(0.5) == "good"
    assert link.observe(0.6) == "poor"
    for bad in ({"weight": 0.0}, {"weight": 1.5}):
        with pytest.raises(ConfigError, match="weight"):
            LinkQuality(**bad)
    for bad in ({"fair_above": 0.0}, {"fair_above": 2.0, "poor_above": 1.0}):
        with pytest.raises(ConfigError, match="thresholds"):
            LinkQuality(**bad)
