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
2 s of warm-up then 10 s measured:

* ``quiet``: nothing else;
* ``flood``: one more client (`benchmarks._flooder`, from its own address)
  writes 10,000 call frames a second, and connects again at once whenever
  it is closed or refused.

Figures per window: the others' p50/p99 latency, calls skipped (a socket's
previous call still unanswered at its next turn) and errors, the server's
CPU, and the flooder's connects, refusals and closes; then the medians and
``flood_p99_over_quiet`` (target <= 1.10).
"""

from __future__ import annotations

import argparse
import json
import sys
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
FLOODER_ADDRESS = "127.0.0.99"
WARMUP_S, DURATION_S = 2.0, 10.0


async def _serve() -> None:
    async with (
        tc.open_runner(entities=[Counter]) as runner,
        trio.open_nursery() as nursery,
    ):
        server = await nursery.start(serve_gateway, runner, GATEWAY, "127.0.0.1", 0)
        await serve_commands({}, {"gateway_port": server.port})
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


async def _flooder(port: int, results: list[dict[str, Any]]) -> None:
    args = {
        "host": "127.0.0.1",
        "port": port,
        "path": "/ws",
        "src": FLOODER_ADDRESS,
        "duration_s": WARMUP_S + DURATION_S + 0.5,
        "frames_per_s": 10_000,
        "operation": "Counter.increment",
        "msg": {"amount": 1},
    }
    done = await trio.run_process(
        [sys.executable, "-m", "benchmarks._flooder", json.dumps(args)],
        capture_stdout=True,
    )
    results.append(json.loads(done.stdout))


async def _window(
    clients: list[Worker], server_pid: int, port: int, *, flood: bool
) -> dict[str, Any]:
    answers: list[dict[str, Any]] = [{} for _ in clients]
    flooded: list[dict[str, Any]] = []
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
        )

    async with trio.open_nursery() as nursery:
        if flood:
            nursery.start_soon(_flooder, port, flooded)
        for i in range(len(clients)):
            nursery.start_soon(paced, i)
    cpu = window.report()
    server_cpu = cpu_seconds(server_pid) - server_cpu
    latencies = [value for answer in answers for value in answer["latencies"]]
    return {
        "p50_us": round(percentile(latencies, 50) * 1e6, 1),
        "p99_us": round(percentile(latencies, 99) * 1e6, 1),
        "calls": len(latencies),
        "skipped": sum(answer["skipped"] for answer in answers),
        "errors": sum(answer["errors"] for answer in answers),
        "unanswered": sum(answer["unanswered"] for answer in answers),
        "sockets_up": sum(answer["sockets"] for answer in answers),
        "server_cpu_pct": round(100 * server_cpu / cpu["wall_s"], 1),
        "cpu": cpu,
        "flooder": flooded[0] if flooded else None,
    }


async def run(*, rounds: int, sockets: int) -> None:
    load_start = load_average()
    async with trio.open_nursery() as nursery:
        server = Worker(
            [sys.executable, "-m", "benchmarks.gateway_flood", "serve"],
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
            for round_ in range(1, rounds + 1):
                for mode in ("quiet", "flood"):
                    progress(f"flood: round {round_}, {mode}")
                    result = await _window(
                        clients, server.pid, port, flood=mode == "flood"
                    )
                    windows[mode].append(result)
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
                loadavg_start=load_start,
                loadavg_end=load_average(),
            )
            for client in clients:
                await client.call("close")
        finally:
            for client in clients:
                await client.aclose()
            await server.aclose()


def main(rounds: int = 3, sockets: int = 1000) -> None:
    trio.run(partial(run, rounds=rounds, sockets=sockets))


def _cli() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gateway_flood")
    parser.add_argument(
        "command", nargs="?", choices=["bench", "serve"], default="bench"
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--sockets", type=int, default=1000)
    args = parser.parse_args()
    if args.command == "serve":
        trio.run(_serve)
    else:
        main(args.rounds, args.sockets)


if __name__ == "__main__":
    _cli()
