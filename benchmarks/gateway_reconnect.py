"""A mass reconnect through the realtime gateway: N clients lose their
runner (SIGKILL) at once and resume on the others (issue 14: "10,000
clients reconnecting at once are all recovered within 5 s").

``python -m benchmarks reconnect [--quick]`` starts three runner processes
on PostgreSQL serving the gateway of ``benchmarks.gateway_reconnect:APP``,
and a publisher process (a client-only runner) that publishes on one topic
every second. N light clients (`benchmarks._storm_client`: lean epoll
processes of ``--per-process`` sockets each, 2,500 by default, msgpack,
hand-written frames: a delivery costs them a few microseconds) subscribe
through the gateway of a runner that does not host the topic. That runner
is killed; each client reconnects, after a random delay of up to 100 ms
(the Trio client's first retry), to one of the two others (half to each)
and resubscribes from the last offset it saw.

Figures (JSON lines): ``connected`` (seconds to connect and subscribe the N
clients), ``upgraded_p50/max`` (from the kill to each client's new socket
upgraded), ``resubscribed_p50/p99/max`` (from the kill to each client's
resubscribe answer), ``recovered_all`` (from the kill until every client
has every publication accepted before it and the first accepted after
it), ``lost`` and ``duplicated`` (publications, over all clients: both
should be 0 unless the topic's runner lost its shard: then ``epochs`` is
over 1 and ``not_recovered`` counts the resubscribes told so),
``failed_attempts`` (reconnect attempts refused or broken, retried with
backoff), ``refused_subscribes`` (answered with an error, sent again),
``resubscribed`` (clients that did within 120 s), and the CPU the two
surviving runners (``servers_cpu_per_client``) and the client processes
(``clients_cpu_per_client``) spent from the kill to the recovery, per
client; ``other_cpu_pct``: the CPU other processes used meanwhile (% of one
core: the machine is shared), ``load_average`` before the kill.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import uuid
from functools import partial
from typing import TYPE_CHECKING, Any

import trio

import trio_cluster as tc
from trio_cluster.gateway import Gateway, GatewayConfig, Topic, publish
from trio_cluster.storage import PostgresStorage
from trio_cluster.transport import WebSocketTransport

from ._common import REPO, bench_dsn, drop_tables, emit, progress, start_ready_process
from ._workers import CpuWindow, Worker, load_average, source_address

if TYPE_CHECKING:
    from trio_cluster.testing import ChildProcess

TOPIC = "room:reconnect"
APP = {
    "entities": [],
    "gateway": Gateway(
        topics=lambda name: name.startswith("room:"),
        # The benchmark's clients all come from 127.0.0.1: no connect rate.
        config=GatewayConfig(connect_rate=None, max_connections=20_000),
    ),
}
"""What the runners serve (``trio-cluster run benchmarks.gateway_reconnect:APP``)."""


async def _start_runner(
    dsn: str, prefix: str, name: str, nursery: trio.Nursery
) -> tuple[ChildProcess, dict[str, Any]]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRIO_CLUSTER_")}
    path = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join([*path, str(REPO)])
    command = [
        sys.executable,
        "-m",
        "trio_cluster",
        "run",
        "benchmarks.gateway_reconnect:APP",
    ]
    command += ["--dsn", dsn, "--prefix", prefix, "--listen", "127.0.0.1:0"]
    command += ["--gateway", "127.0.0.1:0"]
    return await start_ready_process(command, nursery, name=f"runner {name}", env=env)


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return math.inf
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def _publish(dsn: str, prefix: str) -> None:
    """The publisher process: ``ready`` with the topic's owner, then publish
    0, 1, 2... every second, printing each one accepted (with its wall
    time)."""
    config = tc.ShardingConfig(
        shard_groups=(), runner_address=tc.RunnerAddress("127.0.0.1", 0)
    )
    async with tc.open_runner(
        entities=[Topic],
        config=config,
        storage=PostgresStorage(dsn, table_prefix=prefix),
        transport=WebSocketTransport(),
    ) as runner:
        owner = runner.owner_of(runner.client(Topic)(TOPIC).address)
        wall = tc.TrioWallClock()  # the same time as the benchmark process's
        print(json.dumps({"event": "ready", "owner": str(owner)}), flush=True)
        number = 0
        while True:
            try:
                await publish(runner, TOPIC, number)
            except tc.ClusterError:
                pass
            else:
                line = {"event": "published", "n": number, "at": wall.now()}
                print(json.dumps(line), flush=True)
            number += 1
            await trio.sleep(1.0)


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRIO_CLUSTER_")}
    path = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join([*path, str(REPO)])
    return env


def _published(
    publisher: ChildProcess, *, since: float, before: float
) -> tuple[list[int], list[int]]:
    """The numbers published from the wall time ``since`` (every client
    subscribed) to ``before`` (the kill), and after."""
    done = [e for e in publisher.events if e["event"] == "published"]
    return (
        [e["n"] for e in done if since <= e["at"] < before],
        [e["n"] for e in done if e["at"] >= before],
    )


async def _measure(dsn: str, prefix: str, clients: int, per_process: int) -> None:
    wall = tc.TrioWallClock()  # the same time as the publisher's
    async with trio.open_nursery() as nursery:
        runners = [await _start_runner(dsn, prefix, n, nursery) for n in "abc"]
        command = [sys.executable, "-m", "benchmarks.gateway_reconnect", "publish"]
        publisher, ready = await start_ready_process(
            [*command, "--dsn", dsn, "--prefix", prefix],
            nursery,
            name="the publisher",
            env=_env(),
        )
        # The victim does not host the topic (its history would go with it).
        victim, *others = sorted(
            runners, key=lambda r: r[1]["address"] == ready["owner"]
        )
        url = f"ws://127.0.0.1:{victim[1]['gateway_port']}/ws"
        other_urls = [f"ws://127.0.0.1:{r[1]['gateway_port']}/ws" for r in others]
        procs = math.ceil(clients / per_process)
        shares = [
            clients // procs + (1 if i < clients % procs else 0) for i in range(procs)
        ]
        workers = [
            Worker(
                [sys.executable, "-m", "benchmarks._storm_client"], name=f"clients {i}"
            )
            for i in range(procs)
        ]
        for worker in workers:
            await worker.start(nursery)
        progress(
            f"reconnect: {clients} clients in {procs} processes subscribe"
            " through one runner"
        )
        started = trio.current_time()
        async with trio.open_nursery() as connecting:
            for i, worker in enumerate(workers):
                connecting.start_soon(
                    partial(
                        worker.call,
                        "storm",
                        url=url,
                        others=other_urls,
                        n=shares[i],
                        src=source_address(i),
                        topic=TOPIC,
                        index_base=sum(shares[:i]),
                    )
                )
        connected = trio.current_time() - started
        emit("reconnect", "connected", connected, "s", clients=clients)
        since = wall.now()
        await trio.sleep(3.0)
        progress("reconnect: SIGKILL of their runner")
        pids = [r[0].pid for r in others]
        server_pids = [pid for pid in pids if pid is not None]
        client_pids = [worker.pid for worker in workers]
        cpu = CpuWindow([*server_pids, *client_pids])
        load = load_average()
        victim[0].kill()
        killed_at, killed_wall = time.monotonic(), wall.now()
        with trio.move_on_after(120):
            while True:
                await trio.sleep(0.2)
                before, after = _published(publisher, since=since, before=killed_wall)
                if not after:
                    continue
                wanted = [*before, after[0]]
                waiting = 0
                for worker in workers:
                    waiting += (await worker.call("waiting", wanted=wanted))["waiting"]
                if not waiting:
                    break
        window = cpu.report()
        before, after = _published(publisher, since=since, before=killed_wall)
        wanted = [*before, *after[:1]]
        reports = [await worker.call("report", wanted=wanted) for worker in workers]
        resubscribed = [t - killed_at for r in reports for t in r["resubscribed"]]
        upgraded = [t - killed_at for r in reports for t in r["upgraded"]]
        recovered = max(r["recovered"] for r in reports)

        def total(key: str) -> int:
            return sum(int(r[key]) for r in reports)

        figures: list[tuple[str, float, str]] = [
            ("upgraded_p50", _percentile(upgraded, 0.5), "s"),
            ("upgraded_max", max(upgraded, default=math.inf), "s"),
            ("resubscribed_p50", _percentile(resubscribed, 0.5), "s"),
            ("resubscribed_p99", _percentile(resubscribed, 0.99), "s"),
            ("resubscribed_max", max(resubscribed, default=math.inf), "s"),
            ("resubscribed", len(resubscribed), "clients"),
            ("recovered_all", recovered - killed_at, "s"),
            ("lost", total("lost"), "publications"),
            ("duplicated", total("duplicated"), "publications"),
            ("failed_attempts", total("failed"), "attempts"),
            ("not_recovered", total("not_recovered"), "resubscribes"),
            ("epochs", len({e for r in reports for e in r["epochs"]}), "epochs"),
            ("refused_subscribes", total("refused"), "subscribes"),
        ]
        server_cpu = window["cpu_s"][: len(server_pids)]
        client_cpu = window["cpu_s"][len(server_pids) :]
        figures += [
            ("servers_cpu_per_client", sum(server_cpu) / clients * 1e3, "ms"),
            ("clients_cpu_per_client", sum(client_cpu) / clients * 1e3, "ms"),
            ("window", window["wall_s"], "s"),
            ("other_cpu_pct", window["other_cpu_pct"], "%"),
            ("load_average", load[0], "load"),
        ]
        for figure, value, unit in figures:
            emit("reconnect", figure, value, unit, clients=clients)
        for worker in workers:
            await worker.aclose()
        for process in (*(r[0] for r in runners), publisher):
            process.kill_leftover()
        nursery.cancel_scope.cancel()


async def run(
    *, quick: bool, clients: int | None = None, per_process: int = 2500
) -> None:
    dsn = bench_dsn()
    count = clients or (1000 if quick else 10_000)
    prefix = f"rc_{uuid.uuid4().hex[:12]}"
    try:
        await _measure(dsn, prefix, count, per_process)
    finally:
        drop_tables(dsn, prefix)


def main(
    quick: bool = False, clients: int | None = None, per_process: int = 2500
) -> None:
    trio.run(partial(run, quick=quick, clients=clients, per_process=per_process))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gateway_reconnect")
    parser.add_argument("command", choices=["bench", "publish"], nargs="?")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--clients", type=int, default=None)
    parser.add_argument(
        "--per-process", type=int, default=2500, help="clients per client process"
    )
    parser.add_argument("--dsn")
    parser.add_argument("--prefix")
    args = parser.parse_args()
    if args.command == "publish":
        trio.run(_publish, args.dsn, args.prefix)
    else:
        main(quick=args.quick, clients=args.clients, per_process=args.per_process)
