"""The cluster demo (`trio_cluster._cli._demo_cluster`): failover within a
second."""

from __future__ import annotations

import pytest

from trio_cluster._cli._demo_cluster import run_cluster_demo


async def test_cluster_demo_fails_over_within_a_second(autojump_clock):
    lines: list[str] = []
    result = await run_cluster_demo(3, lines.append)
    assert result.moved > 0
    assert result.failover_seconds < 1.0
    text = "\n".join(lines)
    assert f"Kill {result.killed}" in text
    assert "failover: every moved entity answered within" in text


async def test_cluster_demo_needs_two_runners():
    with pytest.raises(ValueError, match="at least 2"):
        await run_cluster_demo(1)
