"""W6: idle sockets on one runner's gateway.

``python -m benchmarks w6 [--quick] [--n N]`` starts a server process (a
runner on memory storage hosting `Topic`, its gateway with topics, heartbeats
at the peer's settings: a ping after 25 s of silence, 20 s to answer) and
lean client processes (`benchmarks._lean_client`, ``--per-proc`` sockets each,
each process from its own loopback source address). N sockets connect, at
most 100 handshakes in flight per client process, each subscribes to one
of 1,000 topics and waits for the answer; then 5 s to settle and
``--idle-s`` (30) idle with heartbeats on. The shape of the peer's
``w6.mjs`` (`../shared/peer-bench/gateway-socketio`).

N is capped to what the server's descriptor limit allows (soft limit -
descriptors open - 16), as the peer's script does.
``python -m benchmarks.w6_idle bench --gc-freeze`` has the server call
``gc.freeze()`` before the idle window: what the sockets cost without
Python's full collections passing over them (an option for the operator
of a process holding that many sockets, not something the library does).

Figures:

* ``rss_per_socket``: (server RSS after N sockets and the idle window -
  RSS of the empty server), both after ``gc.collect()``, ÷ N;
* ``connect_rate`` (bounded by the clients; see ``cpu``) and
  ``server_cpu_per_connect`` (upgrade, welcome, subscribe and its answer);
* ``idle_cpu`` (server CPU over the idle window, % of one core) and
  ``idle_cpu_per_10k_sockets``; ``idle_gc_cpu``: the part of it spent in
  Python's cyclic garbage collector (timed by ``gc.callbacks``);
  ``idle_disconnects``; ``machine_load`` (CPU of *other* processes in the
  windows).
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import resource
import sys
import time
from functools import partial
from typing import Any

import trio

import trio_cluster as tc
from trio_cluster.gateway import Gateway, GatewayConfig, Topic, serve_gateway

from ._common import emit, progress
from ._workers import (
    CpuWindow,
    Worker,
    cpu_seconds,
    lean_client_command,
    load_average,
    open_fds,
    rss_bytes,
    serve_commands,
    source_address,
)

TOPICS = 1000


def _gateway(n: int) -> Gateway:
    return Gateway(
        topics=lambda name: name.startswith("room-"),
        config=GatewayConfig(
            ping_interval=25.0,
            ping_timeout=20.0,
            connect_rate=None,
            max_connections=max(n, 1),
            max_pending_upgrades=min(1000, max(n, 1)),
        ),
    )


# ----------------------------------------------------------------------
# The server process


class _GcClock:
    """CPU seconds the process spent in the cyclic garbage collector."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self._started = 0.0
        gc.callbacks.append(self._callback)

    def _callback(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._started = time.process_time()
        else:
            self.seconds += time.process_time() - self._started


async def _serve(n: int) -> None:
    gc_clock = _GcClock()
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    async with (
        tc.open_runner(entities=[Topic]) as runner,
        trio.open_nursery() as nursery,
    ):
        server = await nursery.start(serve_gateway, runner, _gateway(n), "127.0.0.1", 0)

        async def collect() -> dict[str, Any]:
            for _ in range(3):
                gc.collect()
            await trio.lowlevel.checkpoint()
            pid = os.getpid()
            return {
                "rss": rss_bytes(pid),
                "fds": open_fds(pid),
                "sockets": len(server.connections()),
            }

        async def stats() -> dict[str, Any]:
            await trio.lowlevel.checkpoint()
            return {
                "sockets": len(server.connections()),
                "closed": server.statistics().closed,
                "gc_s": gc_clock.seconds,
                "gc_objects": len(gc.get_objects()),
                "gc_collections": [g["collections"] for g in gc.get_stats()],
            }

        async def freeze() -> dict[str, Any]:
            await trio.lowlevel.checkpoint()
            gc.freeze()
            return {"frozen": gc.get_freeze_count()}

        await serve_commands(
            {"gc": collect, "stats": stats, "freeze": freeze},
            {"url": server.url, "nofile": resource.getrlimit(resource.RLIMIT_NOFILE)},
        )
        nursery.cancel_scope.cancel()


# ----------------------------------------------------------------------
# The orchestrator


async def run(
    *, quick: bool, n: int, per_proc: int, idle_s: float, gc_freeze: bool = False
) -> None:
    settle_s = 5.0
    load_start = load_average()
    async with trio.open_nursery() as nursery:
        server = Worker(
            [sys.executable, "-m", "benchmarks.w6_idle", "serve", "--n", str(n)],
            name="the W6 server",
        )
        ready = await server.start(nursery)
        base = await server.call("gc")
        nofile = ready["nofile"][0]
        headroom = nofile - base["fds"] - 16
        extra: dict[str, Any] = {}
        if n > headroom:
            extra = {
                "n_requested": n,
                "capped_by": f"RLIMIT_NOFILE {nofile}; the server holds"
                f" {base['fds']} fds",
            }
            n = headroom
        progress(
            f"W6 server pid {server.pid} at {ready['url']}: rss"
            f" {base['rss'] / 2**20:.1f} MiB, {base['fds']} fds; {n} sockets"
        )
        procs = math.ceil(n / per_proc)
        clients = [
            Worker(lean_client_command(), name=f"client {i}") for i in range(procs)
        ]
        for client in clients:
            await client.start(nursery)
        pids = [server.pid, *(client.pid for client in clients)]
        shares = [n // procs + (1 if i < n % procs else 0) for i in range(procs)]
        bases = [sum(shares[:i]) for i in range(procs)]

        window = CpuWindow(pids)
        server_cpu = cpu_seconds(server.pid)
        answers: list[dict[str, Any]] = [{} for _ in clients]

        async def connect(i: int) -> None:
            answers[i] = await clients[i].call(
                "connect",
                url=ready["url"],
                n=shares[i],
                src=source_address(i),
                index_base=bases[i],
                topics=TOPICS,
                topic_prefix="room-",
                concurrency=100,
            )

        async with trio.open_nursery() as connecting:
            for i in range(procs):
                connecting.start_soon(connect, i)
        connect_cpu = window.report()
        connect_server_cpu = cpu_seconds(server.pid) - server_cpu
        ok = sum(answer["ok"] for answer in answers)
        failed = sum(answer["failed"] for answer in answers)
        errors: dict[str, int] = {}
        for answer in answers:
            for key, value in answer["errors"].items():
                errors[key] = errors.get(key, 0) + value
        seen = await server.call("stats")
        progress(
            f"W6 connected {ok}/{n} in {connect_cpu['wall_s']} s ({failed} failed"
            f" {errors}); the server sees {seen['sockets']}"
        )
        if ok == 0:
            raise RuntimeError("no socket connected")

        await trio.sleep(settle_s)
        if gc_freeze:
            frozen = await server.call("freeze")
            progress(
                f"W6 gc.freeze(): {frozen['frozen']} objects left out of collections"
            )
        before = [await client.call("stats") for client in clients]
        gc_before = await server.call("stats")
        window = CpuWindow(pids)
        server_cpu = cpu_seconds(server.pid)
        await trio.sleep(idle_s)
        idle_server = cpu_seconds(server.pid) - server_cpu
        idle_cpu = window.report()
        gc_after = await server.call("stats")
        after = [await client.call("stats") for client in clients]
        memory = await server.call("gc")
        progress(
            f"W6 after idle: rss {memory['rss'] / 2**20:.1f} MiB,"
            f" {memory['sockets']} sockets, {memory['fds']} fds"
        )
        common: dict[str, Any] = {"n": ok}
        if gc_freeze:
            common["gc"] = "frozen after connect"
        emit(
            "W6",
            "rss_per_socket",
            (memory["rss"] - base["rss"]) / ok,
            "bytes",
            rss_baseline=base["rss"],
            rss_after=memory["rss"],
            **common,
            **extra,
        )
        emit(
            "W6",
            "connect_rate",
            ok / connect_cpu["wall_s"],
            "sockets/s",
            failed=failed,
            errors=errors,
            client_procs=procs,
            server_cpu_pct=round(100 * connect_server_cpu / connect_cpu["wall_s"], 1),
            cpu=connect_cpu,
            **common,
        )
        emit(
            "W6",
            "server_cpu_per_connect",
            connect_server_cpu / ok * 1e6,
            "us",
            **common,
        )
        idle_pct = 100 * idle_server / idle_cpu["wall_s"]
        client_cpu = sum(
            a["cpu_s"] - b["cpu_s"] for a, b in zip(after, before, strict=True)
        )
        emit(
            "W6",
            "idle_cpu",
            idle_pct,
            "% of one core",
            seconds=idle_s,
            clients_cpu_pct=round(100 * client_cpu / idle_cpu["wall_s"], 2),
            pings_answered=sum(
                a["pings"] - b["pings"] for a, b in zip(after, before, strict=True)
            ),
            cpu=idle_cpu,
            **common,
        )
        emit(
            "W6",
            "idle_cpu_per_10k_sockets",
            idle_pct * 10_000 / ok,
            "% of one core",
            **common,
        )
        emit(
            "W6",
            "idle_gc_cpu",
            100 * (gc_after["gc_s"] - gc_before["gc_s"]) / idle_cpu["wall_s"],
            "% of one core",
            note="CPU time in the cyclic GC during the idle window (part of idle_cpu)",
            gc_tracked_objects=gc_after["gc_objects"],
            gc_collections_by_generation=[
                after - before
                for before, after in zip(
                    gc_before["gc_collections"], gc_after["gc_collections"], strict=True
                )
            ],
            **common,
        )
        reasons: dict[str, int] = {}
        for answer in after:
            for key, value in answer["reasons"].items():
                reasons[key] = reasons.get(key, 0) + value
        emit(
            "W6",
            "idle_disconnects",
            sum(
                a["disconnects"] - b["disconnects"]
                for a, b in zip(after, before, strict=True)
            ),
            "sockets",
            still_connected=sum(answer["sockets"] for answer in after),
            reasons=reasons,
            **common,
        )
        emit(
            "W6",
            "machine_load",
            idle_cpu["other_cpu_pct"],
            "% of one core used by other processes during the idle window",
            connect_phase=connect_cpu,
            idle_window=idle_cpu,
            loadavg_start=load_start,
            loadavg_end=load_average(),
            quick=quick,
        )
        for client in clients:
            await client.call("close")
            await client.aclose()
        await server.aclose()


def main(
    quick: bool = False,
    n: int | None = None,
    gc_freeze: bool = False,
    idle_s: float | None = None,
) -> None:
    if idle_s is None:
        idle_s = 5.0 if quick else 30.0
    trio.run(
        partial(
            run,
            quick=quick,
            n=n or (2000 if quick else 20_000),
            per_proc=4000,
            idle_s=idle_s,
            gc_freeze=gc_freeze,
        )
    )


def _cli() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.w6_idle")
    parser.add_argument("command", choices=["bench", "serve"])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--n", type=int, default=None)
    parser.add_argument(
        "--idle-s",
        type=float,
        default=None,
        help="the idle window's length in seconds (30; 5 with --quick)",
    )
    parser.add_argument(
        "--gc-freeze",
        action="store_true",
        help="the server calls gc.freeze() before the idle window (its figures"
        ' say "gc": "frozen after connect")',
    )
    args = parser.parse_args()
    if args.command == "serve":
        trio.run(_serve, args.n or 20_000)
    else:
        main(quick=args.quick, n=args.n, gc_freeze=args.gc_freeze, idle_s=args.idle_s)


if __name__ == "__main__":
    _cli()
