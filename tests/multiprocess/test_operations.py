"""Operating runner processes: ``trio-cluster status`` against a running
cluster, the ``--metrics`` endpoints, JSON logs and graceful SIGTERM."""

from __future__ import annotations

import json
import re
from collections import Counter

import pytest
import trio

from .helpers import SHARDS, MultiCluster, http_get

pytestmark = [pytest.mark.postgres, pytest.mark.multiprocess, pytest.mark.slow]


def metric(text: str, name: str, runner: str) -> float:
    match = re.search(
        rf'^{name}{{runner="{re.escape(runner)}"}} (\S+)$', text, re.MULTILINE
    )
    assert match, f"{name} for {runner} not in:\n{text}"
    return float(match.group(1))


async def test_status_metrics_and_json_logs_of_runner_processes(
    cluster: MultiCluster,
) -> None:
    a = await cluster.spawn(
        "a",
        metrics=True,
        log_format="json",
        env={"TRIO_CLUSTER_LOG_LEVEL": "INFO"},
    )
    b = await cluster.spawn("b")
    await a.wait_ready()
    await b.wait_ready()
    assert a.metrics_port is not None

    # Both ready: the shards are split and every one has an owner.
    status = await cluster.status()
    live = {r["address"]: r for r in status["runners"] if r["live"]}
    assert set(live) == {a.address, b.address}
    owners = Counter(shard["owner"] for shard in status["shards"])
    assert sum(owners.values()) == SHARDS
    assert set(owners) == {a.address, b.address}
    assert all(shard["epoch"] >= 1 for shard in status["shards"])
    assert {address: r["shards"] for address, r in live.items()} == dict(owners)
    assert status["totals"]["owned_shards"] == SHARDS
    assert status["totals"]["backlog"] == 0

    code, body = await http_get(a.metrics_port, "/metrics")
    assert code == 200
    assert metric(body, "trio_cluster_shards", a.address) == owners[a.address]
    assert metric(body, "trio_cluster_shards_assigned", a.address) == owners[a.address]
    assert metric(body, "trio_cluster_runners", a.address) == 2
    assert metric(body, "trio_cluster_failovers_total", a.address) == 0
    assert "# TYPE trio_cluster_call_latency_seconds histogram" in body
    assert await http_get(a.metrics_port, "/readyz") == (200, "ready\n")
    assert await http_get(a.metrics_port, "/healthz") == (200, "ok\n")
    assert (await http_get(a.metrics_port, "/nothing"))[0] == 404

    # B leaves gracefully: A takes every shard and says so.
    b.terminate()
    await b.wait_stopped()
    for _ in range(200):
        code, body = await http_get(a.metrics_port, "/metrics")
        if metric(body, "trio_cluster_shards", a.address) == SHARDS:
            break
        await trio.sleep(0.05)
    assert metric(body, "trio_cluster_shards", a.address) == SHARDS
    assert await http_get(a.metrics_port, "/readyz") == (200, "ready\n")
    status = await cluster.status()
    assert [r["address"] for r in status["runners"] if r["live"]] == [a.address]
    assert {shard["owner"] for shard in status["shards"]} == {a.address}

    a.terminate()
    await a.wait_stopped()
    records = [json.loads(line) for line in a.log_text().splitlines() if line.strip()]
    assert any(
        r["logger"] == "trio_cluster.cli" and "SIGTERM" in r["message"] for r in records
    ), records
    assert all({"time", "level", "logger", "message"} <= set(r) for r in records)
    status = await cluster.status()
    assert status["totals"]["live_runners"] == 0
