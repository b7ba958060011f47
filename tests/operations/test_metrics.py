"""Operations: metrics and health endpoints, structured logs, the cluster demo."""

from __future__ import annotations

import json
import logging

import attrs
import pytest
import trio

import trio_cluster as tc
from trio_cluster._cli._demo_cluster import run_cluster_demo
from trio_cluster._cli._main import main
from trio_cluster._operations._metrics import render_metrics, serve_metrics
from trio_cluster.logs import ContextFilter, JsonFormatter

from .helpers import config


@attrs.frozen
class Ping:
    text: str


class Echo(tc.Entity):
    type_name = "ops.Echo"

    @tc.rpc
    async def ping(self, msg: Ping) -> str:
        logging.getLogger("trio_cluster.test").warning("pinged with %s", msg.text)
        return msg.text


async def http_get(port: int, path: str, method: str = "GET") -> tuple[int, str]:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(f"{method} {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        data = b""
        while chunk := await stream.receive_some(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body.decode()


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


async def test_metrics_and_health_endpoints_over_http():
    with trio.fail_after(20):
        async with (
            tc.open_runner(entities=[Echo], config=config()) as runner,
            trio.open_nursery() as nursery,
        ):
            port = await nursery.start(serve_metrics, runner, "127.0.0.1", 0)
            assert (await http_get(port, "/healthz")) == (200, "ok\n")
            await runner.wait_shards_acquired()
            assert (await http_get(port, "/readyz")) == (200, "ready\n")
            status, body = await http_get(port, "/metrics")
            assert status == 200
            assert "trio_cluster_shards" in body
            assert (await http_get(port, "/nope"))[0] == 404
            assert (await http_get(port, "/metrics", method="POST"))[0] == 405
            nursery.cancel_scope.cancel()


async def test_readiness_is_503_while_shards_are_missing():
    with trio.fail_after(20):
        async with (
            tc.open_runner(entities=[Echo], config=config()) as runner,
            trio.open_nursery() as nursery,
        ):
            port = await nursery.start(serve_metrics, runner, "127.0.0.1", 0)
            await runner.wait_shards_acquired()
            runner._sharding.hosts.clear()  # as if every lease lapsed
            status, body = await http_get(port, "/readyz")
            assert status == 503
            assert "serving 0 of 8 shards" in body
            nursery.cancel_scope.cancel()


async def test_log_records_carry_runner_shard_and_entity(autojump_clock, caplog):
    context = ContextFilter()
    caplog.handler.addFilter(context)
    try:
        with caplog.at_level(logging.WARNING, logger="trio_cluster.test"):
            async with tc.open_runner(entities=[Echo], config=config()) as runner:
                await runner.client(Echo)("alice").ping(Ping("hi"))
                address = runner.client(Echo).address_of("alice")
    finally:
        caplog.handler.removeFilter(context)
    [record] = [r for r in caplog.records if r.name == "trio_cluster.test"]
    assert record.runner == str(runner.address)
    assert record.entity == str(address)
    assert record.shard == str(address.shard)
    document = json.loads(JsonFormatter().format(record))
    assert document["message"] == "pinged with hi"
    assert document["level"] == "WARNING"
    assert document["entity"] == str(address)
    assert document["runner"] == str(runner.address)


def test_records_outside_a_runner_get_empty_context():
    record = logging.LogRecord(
        "trio_cluster.x", logging.INFO, __file__, 1, "m", (), None
    )
    assert ContextFilter().filter(record)
    fields = record.__dict__
    context = (fields["runner"], fields["shard"], fields["entity"])
    assert context == ("", "", "")
    document = json.loads(JsonFormatter().format(record))
    assert "runner" not in document
    record.shard = "default:3"
    assert ContextFilter().filter(record)
    assert record.__dict__["shard"] == "default:3"  # explicit extra= wins


def test_json_formatter_includes_the_exception():
    try:
        raise ValueError("boom")
    except ValueError:
        import sys

        record = logging.LogRecord(
            "trio_cluster.x", logging.ERROR, __file__, 1, "failed", (), sys.exc_info()
        )
    document = json.loads(JsonFormatter().format(record))
    assert "ValueError: boom" in document["exception"]


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


def test_demo_command_with_runners(capsys):
    assert main(["demo", "--runners", "2"]) == 0
    out = capsys.readouterr().out
    assert "2 runners" in out
    assert "failover" in out
