"""A flooding client against 1,000 others on one gateway (issue target: it
raises their p99 by at most 10 %).

``python -m benchmarks.gateway_flood [--rounds 3] [--sockets 1000]`` starts
a server process (a runner on memory storage hosting ``Counter``, its
gateway exposing ``increment`` with the **default** limits: 10 upgrades per
minute per IP address then a 5-minute block, 100 frames/s per socket with
a burst of 200) and 2 lean client processes (`benchmarks._lean_client`)
holding ``--sockets`` sockets, 4 per loopback source address (so that the
connect limit does not refuse them). Each round measures two windows of
the others calling at 1 call/s per socket, evenly spread (an open loop),
2 s of warm-up then 10 s measured, quiet first in odd rounds and flood
first in even ones:

* ``quiet``: nothing else;
* ``flood``: one more client (`benchmarks._flooder`, from its own address,
  a new one each round unless ``--one-address``: every flood window is
  then a flood's first minute, its 10 connections spending their bursts)
  writes 10,000 call frames a second, and connects again 1 s after it is
  closed or refused (``--reconnect-after 0``: at once, a connect flood).

Figures per window: the others' p50/p99 latency, calls skipped (a socket's
previous call still unanswered at its next turn) and errors, the server's
CPU, and the flooder's connects, refusals and closes; then the medians,
``flood_p99_over_quiet`` (target <= 1.10: the median of the flood windows'
p99s over the quiet ones') and ``flood_p99_over_quiet_pooled`` (the p99 of
all the flood windows' calls together over the quiet ones': steadier than
a median of a few windows). For a stall's cause, each window
also lists the others' calls over ``--slow-ms`` (10; sent at, latency:
CLOCK_MONOTONIC), the flooder's connect attempts (same clock) and the
server's task steps over ``--step-ms`` (5; wall time: on a loaded machine
that includes time the process was not running); with ``--slow-ms`` below
the p99, ``slowest_near_flood`` counts the others' 1 % slowest calls sent
within 50 ms after a flooder's connect attempt (by chance: about 5 % of
them).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from functools import partial
from typing import Any

import trio

import trio_cluster as tc
from trio_cluster.gateway import Gateway, expose, serve_gateway

from ._common import Counter, emit, percentile, progress
from ._workers import (
    CpuWindow,
    Worker,
    cpu_seconds,
    lean_client_command,
    load_average,
    median_or_nan,
    serve_commands,
)

GATEWAY = Gateway(entities=[expose(Counter, "increment")])
"""The default limits: what a flooding client meets."""

PROCS = 2
PER_ADDRESS = 4


def _flooder_address(round_: int) -> str:
    """The flooder's source address in a round: a new one per round, so
    that every flood window is a flood's first minute (its connections and
    their bursts); round 0: the one of ``--one-address``."""
    return f"127.0.0.{100 + round_}"


WARMUP_S, DURATION_S = 2.0, 10.0
KEPT = 20_000
"""Slow calls and long steps listed at most per window."""
NEAR_S = 0.05
"""A call sent this soon after a flooder's connect attempt is "near" it."""


class _LongSteps(trio.abc.Instrument):
    """Task steps over ``threshold`` seconds in the server (what holds the
    others up)."""

    def __init__(self, threshold: float) -> None:
        self.threshold = threshold
        self.started = 0.0
        self.long: list[tuple[float, float, str]] = []

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        self.started = time.perf_counter()

    def after_task_step(self, task: trio.lowlevel.Task) -> None:
        took = time.perf_counter() - self.started
        if took > self.threshold and len(self.long) < KEPT:
            self.long.append((round(time.monotonic(), 5), round(took, 6), task.name))


async def _serve(step_s: float) -> None:
    steps = _LongSteps(step_s)
    trio.lowlevel.add_instrument(steps)

    async def long_steps() -> dict[str, Any]:
        found, steps.long = steps.long, []
        return {"long_steps": found}

    async with (
        tc.open_runner(entities=[Counter]) as runner,
        trio.open_nursery() as nursery,
    ):
        server = await nursery.start(serve_gateway, runner, GATEWAY, "127.0.0.1", 0)
        await serve_commands({"long_steps": long_steps}, {"gateway_port": server.port})
        nursery.cancel_scope.cancel()


def _address(n: int) -> str:
    """The source address of the others' n-th group of `PER_ADDRESS`."""
    return f"127.0.{1 + n // 250}.{1 + n % 250}"


async def _connect(clients: list[Worker], url: str, sockets: int) -> None:
    groups = sockets // PER_ADDRESS
    for n in range(groups):
        client = clients[n % len(clients)]
        answer = await client.call(
            "connect",
            url=url,
            n=PER_ADDRESS,
            src=_address(n),
            index_base=n * PER_ADDRESS,
        )
        if answer["ok"] != PER_ADDRESS:
            raise RuntimeError(f"lean clients: {answer}")


def _near_flood(
    latencies: list[float],
    slow: list[tuple[float, float]],
    flooded: list[dict[str, Any]],
) -> int | None:
    """Of the others' 1 % slowest calls, how many were sent within `NEAR_S`
    after one of the flooder's connect attempts (None: no flooder, or not
    all of those calls are listed: lower ``--slow-ms``)."""
    if not flooded or not latencies:
        return None
    top = max(1, len(latencies) // 100)
    slowest = sorted(slow, key=lambda item: item[1], reverse=True)[:top]
    if len(slowest) < top:
        return None
    attempts = flooded[0]["attempts_at"]
    return sum(
        1
        for sent_at, _ in slowest
        if any(0.0 <= sent_at - at <= NEAR_S for at in attempts)
    )


async def _flooder(
    port: int, reconnect_after: float, source: str, results: list[dict[str, Any]]
) -> None:
    args = {
        "host": "127.0.0.1",
        "port": port,
        "path": "/ws",
        "src": source,
        "duration_s": WARMUP_S + DURATION_S + 0.5,
        "frames_per_s": 10_000,
        "operation": "Counter.increment",
        "msg": {"amount": 1},
        "reconnect_after_s": reconnect_after,
    }
    done = await trio.run_process(
        [sys.executable, "-m", "benchmarks._flooder", json.dumps(args)],
        capture_stdout=True,
    )
    results.append(json.loads(done.stdout))


async def _window(
    clients: list[Worker],
    server: Worker,
    port: int,
    *,
    flood: float | None,
    source: str,
    slow_s: float,
) -> tuple[dict[str, Any], list[float]]:
    """One window: its figures and the others' latencies; ``flood``: the
    flooder's reconnect pause (None: none), ``source`` its address."""
    answers: list[dict[str, Any]] = [{} for _ in clients]
    flooded: list[dict[str, Any]] = []
    server_pid = server.pid
    await server.call("long_steps")  # from now on
    window = CpuWindow([server_pid, *(client.pid for client in clients)])
    server_cpu = cpu_seconds(server_pid)

    async def paced(i: int) -> None:
        answers[i] = await clients[i].call(
            "paced",
            operation="Counter.increment",
            msg={"amount": 1},
            key_prefix="counter-",
            rate=1.0,
            warmup_s=WARMUP_S,
            duration_s=DURATION_S,
            slow_s=slow_s,
        )

    async with trio.open_nursery() as nursery:
        if flood is not None:
            nursery.start_soon(_flooder, port, flood, source, flooded)
        for i in range(len(clients)):
            nursery.start_soon(paced, i)
    cpu = window.report()
    server_cpu = cpu_seconds(server_pid) - server_cpu
    long_steps = (await server.call("long_steps"))["long_steps"]
    latencies = [value for answer in answers for value in answer["latencies"]]
    slow = sorted(item for answer in answers for item in answer["slow"])
    figures = {
        "p50_us": round(percentile(latencies, 50) * 1e6, 1),
        "p99_us": round(percentile(latencies, 99) * 1e6, 1),
        "p999_us": round(percentile(latencies, 99.9) * 1e6, 1),
        "max_us": round(max(latencies, default=0.0) * 1e6, 1),
        "over_10ms": sum(1 for value in latencies if value > 0.01),
        "calls": len(latencies),
        "skipped": sum(answer["skipped"] for answer in answers),
        "errors": sum(answer["errors"] for answer in answers),
        "unanswered": sum(answer["unanswered"] for answer in answers),
        "sockets_up": sum(answer["sockets"] for answer in answers),
        "slow": slow[:KEPT],
        "slowest_near_flood": _near_flood(latencies, slow, flooded),
        "server_cpu_pct": round(100 * server_cpu / cpu["wall_s"], 1),
        "cpu": cpu,
        "flooder": flooded[0] if flooded else None,
        "server_long_steps": long_steps[:KEPT],
    }
    return figures, latencies


async def run(
    *,
    rounds: int,
    sockets: int,
    reconnect_after: float,
    one_address: bool,
    slow_ms: float,
    step_ms: float,
) -> None:
    load_start = load_average()
    async with trio.open_nursery() as nursery:
        server = Worker(
            [
                sys.executable,
                "-m",
                "benchmarks.gateway_flood",
                "serve",
                f"--step-ms={step_ms}",
            ],
            name="the flood server",
        )
        ready = await server.start(nursery)
        port = int(ready["gateway_port"])
        url = f"ws://127.0.0.1:{port}/ws"
        clients = [
            Worker(lean_client_command(), name=f"client {i}") for i in range(PROCS)
        ]
        try:
            for client in clients:
                await client.start(nursery)
            progress(
                f"flood: {sockets} sockets from {sockets // PER_ADDRESS} addresses"
            )
            await _connect(clients, url, sockets)
            windows: dict[str, list[dict[str, Any]]] = {"quiet": [], "flood": []}
            pooled: dict[str, list[float]] = {"quiet": [], "flood": []}
            for round_ in range(1, rounds + 1):
                # Quiet first in odd rounds, flood first in even ones: a
                # drift of the machine's load over the run falls on both.
                order = ("quiet", "flood") if round_ % 2 else ("flood", "quiet")
                for mode in order:
                    progress(f"flood: round {round_}, {mode}")
                    result, latencies = await _window(
                        clients,
                        server,
                        port,
                        flood=reconnect_after if mode == "flood" else None,
                        source=_flooder_address(0 if one_address else round_),
                        slow_s=slow_ms / 1000,
                    )
                    windows[mode].append(result)
                    pooled[mode].extend(latencies)
                    emit(
                        "FLOOD",
                        f"{mode}_window",
                        result["p99_us"],
                        "us p99",
                        round=round_,
                        **result,
                    )
            medians = {
                mode: {
                    key: median_or_nan([w[key] for w in results])
                    for key in ("p50_us", "p99_us", "server_cpu_pct")
                }
                for mode, results in windows.items()
            }
            for mode, values in medians.items():
                for key, value in values.items():
                    emit("FLOOD", f"{mode}_{key}", value, "median")
            emit(
                "FLOOD",
                "flood_p99_over_quiet",
                medians["flood"]["p99_us"] / medians["quiet"]["p99_us"],
                "ratio",
                per_round=[
                    round(f["p99_us"] / q["p99_us"], 3)
                    for q, f in zip(windows["quiet"], windows["flood"], strict=True)
                ],
                reconnect_after_s=reconnect_after,
                one_address=one_address,
                slowest_near_flood=[w["slowest_near_flood"] for w in windows["flood"]],
                loadavg_start=load_start,
                loadavg_end=load_average(),
            )
            p99s = {mode: percentile(values, 99) for mode, values in pooled.items()}
            emit(
                "FLOOD",
                "flood_p99_over_quiet_pooled",
                p99s["flood"] / p99s["quiet"],
                "ratio",
                quiet_p99_us=round(p99s["quiet"] * 1e6, 1),
                flood_p99_us=round(p99s["flood"] * 1e6, 1),
                calls={mode: len(values) for mode, values in pooled.items()},
            )
            for client in clients:
                await client.call("close")
        finally:
            for client in clients:
                await client.aclose()
            await server.aclose()


def main(
    rounds: int = 3,
    sockets: int = 1000,
    reconnect_after: float = 1.0,
    one_address: bool = False,
    slow_ms: float = 10.0,
    step_ms: float = 5.0,
) -> None:
    trio.run(
        partial(
            run,
            rounds=rounds,
            sockets=sockets,
            reconnect_after=reconnect_after,
            one_address=one_address,
            slow_ms=slow_ms,
            step_ms=step_ms,
        )
    )


def _cli() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gateway_flood")
    parser.add_argument(
        "command", nargs="?", choices=["bench", "serve"], default="bench"
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--sockets", type=int, default=1000)
    parser.add_argument("--reconnect-after", type=float, default=1.0)
    parser.add_argument(
        "--one-address",
        action="store_true",
        help="the flooder keeps its address (later rounds: it is blocked)",
    )
    parser.add_argument(
        "--slow-ms",
        type=float,
        default=10.0,
        help="list the others' calls slower than this (default 10)",
    )
    parser.add_argument(
        "--step-ms",
        type=float,
        default=5.0,
        help="list the server's task steps longer than this (default 5)",
    )
    args = parser.parse_args()
    if args.command == "serve":
        trio.run(_serve, args.step_ms / 1000)
    else:
        main(
            args.rounds,
            args.sockets,
            args.reconnect_after,
            args.one_address,
            args.slow_ms,
            args.step_ms,
        )


if __name__ == "__main__":
    _cli()
