"""Metrics and health endpoints (`trio_cluster._operations._metrics`)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import trio

import trio_cluster as tc
from trio_cluster._operations._metrics import render_metrics, serve_metrics

from ..helpers import Echo, Ping, config, http_get


async def test_metrics_render_gauges_counters_and_latency_histograms(autojump_clock):
    async with tc.open_runner(entities=[Echo], config=config()) as runner:
        for n in range(3):
            await runner.client(Echo)(f"e{n}").ping(Ping("x"))
        text = render_metrics(runner.statistics())
    runner_label = f'runner="{runner.address}"'
    assert f"trio_cluster_shards{{{runner_label}}} 8" in text
    assert f'trio_cluster_entities_by_type{{{runner_label},type="ops.Echo"}} 3' in text
    assert f"trio_cluster_messages_handled_total{{{runner_label}}} 3" in text
    assert "# TYPE trio_cluster_call_latency_seconds histogram" in text
    count = (
        f'trio_cluster_call_latency_seconds_count{{kind="volatile",{runner_label}}} 3'
    )
    assert count in text
    inf = f'trio_cluster_call_latency_seconds_bucket{{kind="volatile",le="+Inf",{runner_label}}} 3'
    assert inf in text
    assert "trio_cluster_failovers_total" in text


@asynccontextmanager
async def metrics_served() -> AsyncIterator[tuple[tc.Runner, int]]:
    """A runner of `Echo` and `serve_metrics` for it on a free port:
    ``(runner, port)``."""
    async with (
        tc.open_runner(entities=[Echo], config=config()) as runner,
        trio.open_nursery() as nursery,
    ):
        port = await nursery.start(serve_metrics, runner, "127.0.0.1", 0)
        yield runner, port
        nursery.cancel_scope.cancel()


async def test_metrics_and_health_endpoints_over_http():
    with trio.fail_after(20):
        async with metrics_served() as (runner, port):
            assert (await http_get(port, "/healthz")) == (200, "ok\n")
            await runner.wait_shards_acquired()
            assert (await http_get(port, "/readyz")) == (200, "ready\n")
            status, body = await http_get(port, "/metrics")
            assert status == 200
            assert "trio_cluster_shards" in body
            assert (await http_get(port, "/nope"))[0] == 404
            assert (await http_get(port, "/metrics", method="POST"))[0] == 405


async def test_readiness_is_503_while_shards_are_missing():
    with trio.fail_after(20):
        async with metrics_served() as (runner, port):
            await runner.wait_shards_acquired()
            runner._parts.sharding.table.hosts.clear()  # as if every lease lapsed
            status, body = await http_get(port, "/readyz")
            assert status == 503
            assert "serving 0 of 8 shards" in body
