"""Metrics and health endpoints (`trio_cluster._operations._metrics`)."""

from __future__ import annotations

import logging
import socket
import struct
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial

import pytest
import trio
import trio.lowlevel

import trio_cluster as tc
from trio_cluster._operations._metrics import (
    MAX_HEAD,
    render_metrics,
    serve_metrics,
)

from ..helpers import Echo, Ping, config, http_get

LOG = "trio_cluster.metrics"


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


# ----------------------------------------------------------------------
# Bad clients: each one ends its own connection, never the server


def reset(sock: trio.socket.SocketType) -> None:
    """Close ``sock`` with a TCP reset (SO_LINGER 0), not a FIN."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


async def raw_exchange(port: int, data: bytes) -> bytes:
    """Send ``data`` on a raw connection and read until the server closes."""
    with trio.fail_after(10):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            await stream.send_all(data)
            answer = b""
            while chunk := await stream.receive_some(65536):
                answer += chunk
    return answer


async def still_serving(runner: tc.Runner, port: int) -> None:
    """Health and metrics answer, and an entity call succeeds."""
    assert (await http_get(port, "/healthz")) == (200, "ok\n")
    status, body = await http_get(port, "/metrics")
    assert status == 200
    assert "trio_cluster_shards" in body
    assert await runner.client(Echo)("still").ping(Ping("x")) == "x"


async def test_a_reset_mid_request_ends_only_its_connection(caplog):
    with trio.fail_after(20), caplog.at_level(logging.DEBUG, logger=LOG):
        async with metrics_served() as (runner, port):
            for _ in range(10):
                sock = trio.socket.socket()
                await sock.connect(("127.0.0.1", port))
                await sock.send(b"GET /metr")
                await trio.sleep(0.01)  # the server is reading now
                reset(sock)
            # and one reset once the whole request is in (mid-response)
            sock = trio.socket.socket()
            await sock.connect(("127.0.0.1", port))
            await sock.send(b"GET /metrics HTTP/1.1\r\n\r\n")
            reset(sock)
            await trio.sleep(0.2)
            await still_serving(runner, port)
    assert not [r for r in caplog.records if r.name == LOG and r.exc_info]


async def test_garbage_and_oversized_requests_get_4xx():
    with trio.fail_after(20):
        async with metrics_served() as (runner, port):
            answer = await raw_exchange(port, b"\x00\xff\xfe garbage\r\n\r\n")
            assert answer.startswith(b"HTTP/1.1 400 ")
            answer = await raw_exchange(port, b"\r\n\r\n")
            assert answer.startswith(b"HTTP/1.1 400 ")
            # one byte past the bound, without the blank line that ends a head
            big = b"GET /metrics HTTP/1.1\r\nX-Big: "
            big += b"a" * (MAX_HEAD + 1 - len(big))
            answer = await raw_exchange(port, big)
            assert answer.startswith(b"HTTP/1.1 431 ")
            # and much more than that, reset by the client after
            sock = trio.socket.socket()
            await sock.connect(("127.0.0.1", port))
            with trio.move_on_after(1):
                await sock.send(big * 8)
            reset(sock)
            await still_serving(runner, port)


async def test_a_silent_client_is_dropped_after_the_request_timeout():
    with trio.fail_after(20):
        async with (
            tc.open_runner(entities=[Echo], config=config()) as runner,
            trio.open_nursery() as nursery,
        ):
            port = await nursery.start(
                partial(serve_metrics, request_timeout=0.3), runner, "127.0.0.1", 0
            )
            start = trio.current_time()
            answer = await raw_exchange(port, b"GET /healthz HTTP/1.1\r\n")
            assert answer.startswith(b"HTTP/1.1 408 ")
            assert await raw_exchange(port, b"") == b""  # says nothing at all
            assert trio.current_time() - start < 5
            await still_serving(runner, port)
            nursery.cancel_scope.cancel()


async def test_each_metric_familys_samples_follow_its_type_line(autojump_clock):
    # The text format wants a family's samples right behind its `# TYPE`
    # line; the transport's families once sat between the latency
    # histogram's header and its samples.
    from trio_cluster.transport import MemoryNetwork, MemoryTransport

    async with tc.open_runner(
        entities=[Echo],
        config=config(runner_address=tc.RunnerAddress("127.0.0.1", 7000)),
        transport=MemoryTransport(MemoryNetwork()),
    ) as runner:
        await runner.client(Echo)("e").ping(Ping("x"))
        stats = runner.statistics()
        assert stats.transport is not None
        text = render_metrics(stats)
    family = None
    seen: set[str] = set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            family = line.split()[2]
            assert family not in seen, family
            seen.add(family)
        elif not line.startswith("#"):
            assert family is not None
            sample = line.split("{")[0].split()[0]
            assert sample == family or sample.startswith(
                (f"{family}_bucket", f"{family}_sum", f"{family}_count")
            ), (line, family)
    assert "trio_cluster_transport_connections" in seen
    assert "trio_cluster_call_latency_seconds" in seen


async def test_metrics_report_each_subscriptions_lag_and_skipped_events():
    from trio_cluster.abc import CursorAdvance, EventRecord

    with trio.fail_after(20):
        async with metrics_served() as (runner, port):
            status, body = await http_get(port, "/metrics")
            assert "trio_cluster_subscription_lag" not in body.split("# TYPE")[-1]
            await runner.wait_shards_acquired()
            log = runner.event_storage
            await log.publish([EventRecord("t", 1, None, b"x", 0.0)] * 3)
            shard, epoch = next(iter(runner.served_shards().items()))
            await log.advance_cursor(
                CursorAdvance("s", "t", 1, None, 1, shard, epoch, 1)
            )
            status, body = await http_get(port, "/metrics")
    assert status == 200
    labels = 'partition="1",subscription="s",topic="t"'
    assert f"trio_cluster_subscription_lag{{{labels}}} 2" in body
    assert f"trio_cluster_subscription_skipped_total{{{labels}}} 1" in body


async def test_extra_metrics_are_appended_to_metrics():
    with trio.fail_after(20):
        async with (
            tc.open_runner(entities=[Echo], config=config()) as runner,
            trio.open_nursery() as nursery,
        ):
            port = await nursery.start(
                partial(
                    serve_metrics,
                    extra_metrics=[lambda: "part_a_total 1\n", lambda: "part_b 2\n"],
                ),
                runner,
                "127.0.0.1",
                0,
            )
            status, body = await http_get(port, "/metrics")
            assert status == 200
            assert "trio_cluster_shards" in body
            assert body.endswith("part_a_total 1\npart_b 2\n")
            nursery.cancel_scope.cancel()


async def test_async_extra_metrics_are_awaited_and_left_out_when_they_fail(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from trio_cluster._operations import _metrics

    monkeypatch.setattr(_metrics, "LAG_TIMEOUT", 0.2)

    async def counted() -> str:
        await trio.lowlevel.checkpoint()
        return "read_from_storage 3\n"

    async def failing() -> str:
        await trio.lowlevel.checkpoint()
        raise tc.PersistenceError("the database is down")

    async def hanging() -> str:
        await trio.sleep_forever()
        raise AssertionError("unreachable")

    with trio.fail_after(20):
        async with (
            tc.open_runner(entities=[Echo], config=config()) as runner,
            trio.open_nursery() as nursery,
        ):
            port = await nursery.start(
                partial(
                    serve_metrics,
                    extra_metrics=[counted, failing, hanging, lambda: "sync 1\n"],
                ),
                runner,
                "127.0.0.1",
                0,
            )
            with caplog.at_level("INFO", logger="trio_cluster.metrics"):
                status, body = await http_get(port, "/metrics")
            nursery.cancel_scope.cancel()
    assert status == 200
    assert body.endswith("read_from_storage 3\nsync 1\n")
    assert "the database is down" in caplog.text
    assert "no answer in 0.2 s" in caplog.text
