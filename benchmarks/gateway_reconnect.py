"""A mass reconnect through the realtime gateway: N clients lose their
runner (SIGKILL) at once and resume on the others (issue 14: "10,000
clients reconnecting at once are all recovered within 5 s").

``python -m benchmarks reconnect [--quick]`` starts three runner processes
on PostgreSQL serving the gateway of ``benchmarks.gateway_reconnect:APP``,
and a publisher process (a client-only runner) that publishes on one topic
every second. N light clients in this process (a bare trio-websocket socket each,
msgpack: the server's side of a client, with little of the Trio client's
own cost) subscribe through the gateway of a runner that does not host the
topic. That runner is killed; each client reconnects, after a random delay
of up to 100 ms (the Trio client's first retry), to one of the two others
(half to each) and resubscribes from the last offset it saw.

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
surviving runners (``servers_cpu_per_client``) and this process
(``clients_cpu_per_client``) spent from the kill to the recovery, per
client. The clients share this process, and the machine's cores with the runners:
at 10,000 clients this process's CPU (every client decodes its frames in
Python) bounds the figures as much as the runners' do.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import uuid
from functools import partial
from typing import TYPE_CHECKING, Any

import msgpack
import trio
import trio_websocket

import trio_cluster as tc
from trio_cluster.gateway import Gateway, GatewayConfig, Topic, publish
from trio_cluster.storage import PostgresStorage
from trio_cluster.transport import WebSocketTransport

from ._common import REPO, bench_dsn, drop_tables, emit, progress, start_ready_process
from .w8_gateway import _cpu_seconds

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

CLOSED = (
    trio_websocket.ConnectionClosed,
    trio_websocket.HandshakeError,
    OSError,
    trio.BrokenResourceError,
    trio.ClosedResourceError,
)


class Light:
    """One light client: subscribe, keep the publications, resume."""

    def __init__(self, ports: tuple[int, int]) -> None:
        self.ports = ports
        self.position: tuple[str, int] | None = None
        self.seen: set[tuple[str, int]] = set()
        self.data: dict[Any, float] = {}
        """Publications' data, and when each arrived."""
        self.duplicates = 0
        self.sockets = 0
        self.subscribed_at: list[float] = []
        self.failed = 0
        self.refused = 0
        self.not_recovered = 0
        """Resubscribes answered ``recovered: false`` (the topic's epoch
        changed: its runner lost its shard, say)."""
        """Subscribes answered with an error (sent again)."""
        self.subscribed = trio.Event()
        self.welcomes: list[float] = []

    async def run(self) -> None:
        port = self.ports[0]
        failures = 0
        while True:
            answered = len(self.subscribed_at)
            try:
                await self._serve(port)
            except* CLOSED:
                pass
            port = self.ports[1]
            if len(self.subscribed_at) == answered:  # no subscribe answered
                failures += 1
                self.failed += 1
            else:
                failures = 0
            await trio.sleep(random.random() * 0.1 * 2 ** min(failures, 6))

    async def _serve(self, port: int) -> None:
        async with trio_websocket.open_websocket(
            "127.0.0.1",
            port,
            "/ws",
            use_ssl=False,
            subprotocols=["trio_cluster.msgpack.v1"],
            connect_timeout=10,
        ) as ws:
            self.sockets += 1
            self.welcomes.append(trio.current_time())  # upgraded
            await ws.send_message(msgpack.packb(self._subscribe_frame()))
            while True:
                message = msgpack.unpackb(await ws.get_message())
                for item in message if isinstance(message, list) else [message]:
                    await self._received(ws, item)

    def _subscribe_frame(self) -> dict[str, Any]:
        frame: dict[str, Any] = {"t": "subscribe", "id": self.sockets, "topic": TOPIC}
        if self.position is not None:
            frame["since"] = {"epoch": self.position[0], "offset": self.position[1]}
        return frame

    async def _received(
        self, ws: trio_websocket.WebSocketConnection, item: Any
    ) -> None:
        kind = item.get("t")
        if kind == "pub":
            key = (item["epoch"], item["offset"])
            if key in self.seen:
                self.duplicates += 1
                return
            self.seen.add(key)
            self.data[item["data"]] = trio.current_time()
            self.position = key
        elif kind == "reply" and item.get("id") == self.sockets:
            value = item["v"]
            if len(self.subscribed_at) >= 1 and not value.get("recovered"):
                self.not_recovered += 1
            if self.position is None:
                self.position = (value["epoch"], value["offset"])
            self.subscribed_at.append(trio.current_time())
            self.subscribed.set()
        elif kind == "ping":
            await ws.send_message(msgpack.packb({"t": "pong"}))
        elif kind == "error" and item.get("id") == self.sockets:
            # Refused (the topic unavailable a moment): subscribe again.
            self.refused += 1
            await trio.sleep(0.5)
            await ws.send_message(msgpack.packb(self._subscribe_frame()))


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


async def _connect_all(lights: list[Light], crowd: trio.Nursery) -> None:
    for n, light in enumerate(lights):
        crowd.start_soon(light.run)
        if n % 100 == 99:  # in waves of 100
            await light.subscribed.wait()
    for light in lights:
        await light.subscribed.wait()


async def _measure(dsn: str, prefix: str, clients: int) -> None:
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
        ports = [int(r[1]["gateway_port"]) for r in others]
        lights = [
            Light((int(victim[1]["gateway_port"]), ports[n % 2]))
            for n in range(clients)
        ]
        progress(f"reconnect: {clients} clients subscribe through one runner")
        started = trio.current_time()
        async with trio.open_nursery() as crowd:
            await _connect_all(lights, crowd)
            connected = trio.current_time() - started
            emit("reconnect", "connected", connected, "s", clients=clients)
            since = wall.now()
            await trio.sleep(3.0)
            progress("reconnect: SIGKILL of their runner")
            pids = [r[0].pid for r in others] + [os.getpid()]
            cpu_before = [_cpu_seconds(pid) for pid in pids if pid is not None]
            victim[0].kill()
            killed_at, killed_wall = trio.current_time(), wall.now()
            waiting = list(lights)
            with trio.move_on_after(120):
                while waiting:
                    await trio.sleep(0.1)
                    before, after = _published(
                        publisher, since=since, before=killed_wall
                    )
                    wanted = {*before, *after[:1]}
                    waiting = [
                        light
                        for light in waiting
                        if len(light.subscribed_at) < 2
                        or not after
                        or not wanted <= light.data.keys()
                    ]
            cpu = [
                _cpu_seconds(pid) - start
                for pid, start in zip(pids, cpu_before, strict=True)
                if pid is not None
            ]
            crowd.cancel_scope.cancel()
        before, after = _published(publisher, since=since, before=killed_wall)
        wanted = {*before, *after[:1]}
        now = trio.current_time()
        recovered = max(max(light.data.get(n, now) for n in wanted) for light in lights)
        resubscribed = [
            light.subscribed_at[1] - killed_at
            for light in lights
            if len(light.subscribed_at) >= 2
        ]
        upgraded = [
            light.welcomes[1] - killed_at for light in lights if len(light.welcomes) > 1
        ]
        figures: list[tuple[str, float, str]] = [
            ("upgraded_p50", _percentile(upgraded, 0.5), "s"),
            ("upgraded_max", max(upgraded, default=math.inf), "s"),
            ("resubscribed_p50", _percentile(resubscribed, 0.5), "s"),
            ("resubscribed_p99", _percentile(resubscribed, 0.99), "s"),
            ("resubscribed_max", max(resubscribed, default=math.inf), "s"),
            ("resubscribed", len(resubscribed), "clients"),
            ("recovered_all", recovered - killed_at, "s"),
            (
                "lost",
                sum(len(wanted - light.data.keys()) for light in lights),
                "publications",
            ),
            ("duplicated", sum(light.duplicates for light in lights), "publications"),
            ("failed_attempts", sum(light.failed for light in lights), "attempts"),
            (
                "not_recovered",
                sum(light.not_recovered for light in lights),
                "resubscribes",
            ),
            (
                "epochs",
                len({epoch for light in lights for epoch, _ in light.seen}),
                "epochs",
            ),
            (
                "refused_subscribes",
                sum(light.refused for light in lights),
                "subscribes",
            ),
        ]
        figures += [
            ("servers_cpu_per_client", sum(cpu[:-1]) / clients * 1e3, "ms"),
            ("clients_cpu_per_client", cpu[-1] / clients * 1e3, "ms"),
        ]
        for figure, value, unit in figures:
            emit("reconnect", figure, value, unit, clients=clients)
        for process in (*(r[0] for r in runners), publisher):
            process.kill_leftover()
        nursery.cancel_scope.cancel()


async def run(*, quick: bool, clients: int | None = None) -> None:
    dsn = bench_dsn()
    count = clients or (1000 if quick else 10_000)
    prefix = f"rc_{uuid.uuid4().hex[:12]}"
    try:
        await _measure(dsn, prefix, count)
    finally:
        drop_tables(dsn, prefix)


def main(quick: bool = False, clients: int | None = None) -> None:
    trio.run(partial(run, quick=quick, clients=clients))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gateway_reconnect")
    parser.add_argument("command", choices=["bench", "publish"], nargs="?")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--clients", type=int, default=None)
    parser.add_argument("--dsn")
    parser.add_argument("--prefix")
    args = parser.parse_args()
    if args.command == "publish":
        trio.run(_publish, args.dsn, args.prefix)
    else:
        main(quick=args.quick, clients=args.clients)
