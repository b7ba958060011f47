"""W7: fan-out of one topic to 10,000 subscribers over 3 runners.

``python -m benchmarks w7 [--quick] [--subs N] [--rates 1,10,100]``
starts 3 runner processes (WebSocket transport, PostgreSQL storage under a
fresh table prefix, dropped at the end; each hosts `Topic` and serves a
gateway whose service ``bench.publish`` publishes its message on topic
``fanout-0``), then lean client processes (`benchmarks._lean_client`, 2,500
sockets each, each from its own loopback source address) whose sockets
subscribe to ``fanout-0``, spread round robin over the 3 gateways. A
publisher process (one socket on gateway 0) calls ``bench.publish`` at
each rate for 10 s (drift-corrected, not waiting for the answers), each
message carrying its sequence number and send time (CLOCK_MONOTONIC, one
clock for every process of the machine). The shape of the peer's
``w7.mjs`` (`../shared/peer-bench/gateway-socketio`), whose default rate
(100/s) is the saturated phase here.

Figures per rate (``rate`` field):

* ``last_delivery_p50`` / ``_p99``: per publication, the arrival of its
  last delivery (of the N subscribers) minus its send time;
* ``deliveries_per_s_per_runner``: per runner, its subscribers'
  deliveries ÷ (its last delivery - the first send), the mean (and each);
* ``server_cpu_us_per_delivery``: each runner's CPU over the window ÷ its
  deliveries (mean, and each);
* ``envelopes_per_runner_per_publication``: the publications each
  gateway received from the topic's stream ÷ publications (must be 1);
* ``delivered_fraction``, ``subscriber_disconnects``, ``machine_load``.
"""

from __future__ import annotations

import argparse
import math
import os
import resource
import statistics
import sys
import uuid
from functools import partial
from typing import Any

import attrs
import trio

import trio_cluster as tc
from trio_cluster.gateway import (
    Gateway,
    GatewayConfig,
    Service,
    Topic,
    publish,
    serve_gateway,
)
from trio_cluster.storage import PostgresStorage
from trio_cluster.transport import WebSocketTransport

from ._common import bench_dsn, drop_tables, emit, percentile, progress
from ._workers import (
    CpuWindow,
    Worker,
    cpu_seconds,
    lean_client_command,
    load_average,
    serve_commands,
    source_address,
)

TOPIC = "fanout-0"
RUNNERS = 3


@attrs.frozen
class Pub:
    seq: int
    ts: float
    pad: str = ""


class Publisher(Service):
    """``bench.publish``: publish the message on the benchmark's topic."""

    name = "bench"

    def __init__(self, runner: tc.Runner) -> None:
        self.runner = runner

    @tc.rpc
    async def publish(self, msg: Pub) -> int:
        position = await publish(
            self.runner, TOPIC, {"seq": msg.seq, "ts": msg.ts, "pad": msg.pad}
        )
        return position.offset


# ----------------------------------------------------------------------
# A runner process


async def _serve(dsn: str, prefix: str) -> None:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    config = tc.ShardingConfig(runner_address=tc.RunnerAddress("127.0.0.1", 0))
    async with (
        trio.open_nursery() as nursery,
        tc.open_runner(
            entities=[Topic],
            config=config,
            storage=PostgresStorage(dsn, table_prefix=prefix),
            transport=WebSocketTransport(),
        ) as runner,
    ):
        gateway = Gateway(
            topics=lambda name: name == TOPIC,
            services=[Publisher(runner)],
            config=GatewayConfig(
                connect_rate=None,
                message_rate=None,
                max_connections=20_000,
                max_pending_upgrades=1_000,
                max_concurrent_requests=1_024,
                ping_interval=25.0,
                ping_timeout=20.0,
            ),
        )
        server = await nursery.start(serve_gateway, runner, gateway, "127.0.0.1", 0)
        await runner.wait_shards_acquired()

        async def stats() -> dict[str, Any]:
            await trio.lowlevel.checkpoint()
            snapshot = server.statistics()
            return {
                "sockets": snapshot.connections,
                # (absent before the gateway counted them: `compare` runs
                # this script against older commits too)
                "publications": getattr(snapshot, "publications", 0),
                "closed": snapshot.closed,
            }

        async def settle() -> dict[str, Any]:
            await runner.wait_shards_acquired()
            return {}

        await serve_commands({"stats": stats, "settle": settle}, {"url": server.url})
        nursery.cancel_scope.cancel()


# ----------------------------------------------------------------------
# The orchestrator


async def _phase(
    rate: float,
    duration: float,
    runners: list[Worker],
    clients: list[Worker],
    publisher: Worker,
    subscribers: int,
    first_seq: int,
) -> None:
    count = max(1, round(rate * duration))
    for client in clients:
        await client.call("fan_arm", maxseq=first_seq + count, servers=RUNNERS)
    before = [await runner.call("stats") for runner in runners]
    pids = [runner.pid for runner in runners]
    window = CpuWindow([*pids, *(c.pid for c in clients), publisher.pid])
    cpu0 = [cpu_seconds(pid) for pid in pids]
    progress(f"W7 rate {rate}/s: {count} publications to {subscribers} subscribers")
    sent = await publisher.call(
        "publish",
        operation="bench.publish",
        rate=rate,
        count=count,
        first_seq=first_seq,
    )
    expected = sent["sent"] * subscribers
    delivered = 0
    with trio.move_on_after(max(60.0, 10 * duration)):
        while True:
            delivered = 0
            for client in clients:
                delivered += (await client.call("fan_progress"))["delivered"]
            if delivered >= expected:
                break
            await trio.sleep(0.25)
    cpu = window.report()
    cpu1 = [cpu_seconds(pid) for pid in pids]
    after = [await runner.call("stats") for runner in runners]
    reports = [await client.call("fan_report") for client in clients]
    stats = [await client.call("stats") for client in clients]
    ts = sent["ts"]
    latencies = []
    incomplete = 0
    for i in range(len(ts)):
        seq = first_seq + i
        received = sum(report["count"][seq] for report in reports)
        if received < subscribers:
            incomplete += 1
            continue
        last = max(report["last"][seq] for report in reports)
        latencies.append(last - ts[i])
    first = ts[0]
    per_runner = []
    for k in range(RUNNERS):
        deliveries = sum(report["server_count"][k] for report in reports)
        last = max(report["server_last"][k] for report in reports)
        seconds = max(last - first, 1e-9)
        busy = cpu1[k] - cpu0[k]
        per_runner.append(
            {
                "runner": k,
                "deliveries": deliveries,
                "seconds": round(seconds, 3),
                "per_s": round(deliveries / seconds),
                "cpu_s": round(busy, 3),
                "cpu_us_per_delivery": round(busy / max(deliveries, 1) * 1e6, 2),
                "envelopes": after[k]["publications"] - before[k]["publications"],
            }
        )
    common = {
        "n": subscribers,
        "runners": RUNNERS,
        "rate": rate,
        "duration_s": duration,
        "messages": sent["sent"],
    }
    if latencies:
        emit(
            "W7",
            "last_delivery_p50",
            percentile(latencies, 50) * 1e3,
            "ms",
            complete_messages=len(latencies),
            **common,
        )
        emit(
            "W7",
            "last_delivery_p99",
            percentile(latencies, 99) * 1e3,
            "ms",
            max_ms=round(max(latencies) * 1e3, 3),
            **common,
        )
    emit(
        "W7",
        "deliveries_per_s_per_runner",
        statistics.fmean(r["per_s"] for r in per_runner),
        "deliveries/s",
        offered_per_runner=round(rate * subscribers / RUNNERS),
        per_runner=per_runner,
        **common,
    )
    emit(
        "W7",
        "server_cpu_us_per_delivery",
        statistics.fmean(r["cpu_us_per_delivery"] for r in per_runner),
        "us",
        per_runner=[r["cpu_us_per_delivery"] for r in per_runner],
        **common,
    )
    emit(
        "W7",
        "envelopes_per_runner_per_publication",
        statistics.fmean(r["envelopes"] for r in per_runner) / sent["sent"],
        "envelopes",
        per_runner=[round(r["envelopes"] / sent["sent"], 3) for r in per_runner],
        **common,
    )
    emit(
        "W7",
        "delivered_fraction",
        delivered / expected,
        "fraction",
        incomplete_messages=incomplete,
        publish_errors=sent["errors"],
        **common,
    )
    reasons: dict[str, int] = {}
    for each in stats:
        for key, value in each["reasons"].items():
            reasons[key] = reasons.get(key, 0) + value
    emit(
        "W7",
        "subscriber_disconnects",
        sum(each["disconnects"] for each in stats),
        "sockets",
        reasons=reasons,
        **common,
    )
    emit(
        "W7",
        "machine_load",
        cpu["other_cpu_pct"],
        "% of one core used by other processes during publish+drain",
        window=cpu,
        **common,
    )


async def run(*, quick: bool, subscribers: int, rates: list[float]) -> None:
    dsn = bench_dsn()
    prefix = f"w7_{uuid.uuid4().hex[:8]}"
    duration = 3.0 if quick else 10.0
    load_start = load_average()
    try:
        async with trio.open_nursery() as nursery:
            runners = []
            for i in range(RUNNERS):
                runner = Worker(
                    [
                        sys.executable,
                        "-m",
                        "benchmarks.w7_fanout",
                        "serve",
                        "--dsn",
                        dsn,
                        "--prefix",
                        prefix,
                    ],
                    name=f"runner {i}",
                )
                await runner.start(nursery)
                runners.append(runner)
            for runner in runners:
                await runner.call("settle")
            await trio.sleep(2.0)
            urls = [runner.ready["url"] for runner in runners]
            progress(f"W7 runners {[r.pid for r in runners]} at {urls}")
            per_proc = 2500
            procs = math.ceil(subscribers / per_proc)
            clients = [
                Worker(lean_client_command(), name=f"subscribers {i}")
                for i in range(procs)
            ]
            publisher = Worker(lean_client_command(), name="publisher")
            for client in [*clients, publisher]:
                await client.start(nursery)
            shares = [
                subscribers // procs + (1 if i < subscribers % procs else 0)
                for i in range(procs)
            ]
            ok = 0
            for i, client in enumerate(clients):
                answer = await client.call(
                    "connect",
                    url=urls,
                    n=shares[i],
                    src=source_address(i),
                    index_base=sum(shares[:i]),
                    topics=1,
                    topic_prefix="fanout-",
                )
                ok += answer["ok"]
                if answer["failed"]:
                    progress(f"W7 subscribers {i}: {answer}")
            await publisher.call("connect", url=urls[0], n=1, src=source_address(procs))
            sockets = [(await runner.call("stats"))["sockets"] for runner in runners]
            progress(f"W7 {ok} subscribers; sockets per runner {sockets}")
            await trio.sleep(2.0)
            first_seq = 0
            for rate in rates:
                await _phase(rate, duration, runners, clients, publisher, ok, first_seq)
                first_seq += max(1, round(rate * duration))
            emit(
                "W7",
                "load_average",
                load_average()[0],
                "load",
                loadavg_start=load_start,
                loadavg_end=load_average(),
            )
            for client in [*clients, publisher]:
                await client.call("close")
                await client.aclose()
            for runner in runners:
                await runner.aclose()
    finally:
        drop_tables(dsn, prefix)


def main(quick: bool = False, subscribers: int | None = None, rates: str = "") -> None:
    chosen = [float(rate) for rate in rates.split(",")] if rates else [1.0, 10.0, 100.0]
    trio.run(
        partial(
            run,
            quick=quick,
            subscribers=subscribers or (1000 if quick else 10_000),
            rates=chosen,
        )
    )


def _cli() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.w7_fanout")
    parser.add_argument("command", choices=["bench", "serve"])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--subs", type=int, default=None)
    parser.add_argument("--rates", default="")
    parser.add_argument("--dsn", default=os.environ.get("TRIO_CLUSTER_BENCH_DSN"))
    parser.add_argument("--prefix", default="")
    args = parser.parse_args()
    if args.command == "serve":
        trio.run(_serve, args.dsn or bench_dsn(), args.prefix)
    else:
        main(quick=args.quick, subscribers=args.subs, rates=args.rates)


if __name__ == "__main__":
    _cli()
