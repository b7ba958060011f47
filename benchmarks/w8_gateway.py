"""W8: RPC to a volatile entity through the realtime gateway, next to the bare
trio-websocket echo in the same run.

``python -m benchmarks w8 [--quick]`` starts a server process (a runner on
memory storage hosting ``Counter``, its gateway exposing ``increment``, and
a bare trio-websocket echo server), then:

* ``floor_ws_echo_*``: sequential round trips of a small message to the
  bare echo server, from this process: the floor of any call over a
  WebSocket;
* ``sequential_*``: sequential gateway calls from one `GatewayClient`
  (msgpack) in this process, and the ratio of their p50 to the floor's
  (target ≤ 1.5);
* ``rpc_*``: the peer's shape (``w8.mjs``): 100 sockets in 2 lean client
  processes (`benchmarks._lean_client`), each calling in a closed loop
  (one call in flight per socket) for 1 s of warm-up then 10 s measured:
  req/s, p50/p99, server CPU per call, and whether each counter's values
  came back consecutive; then ``lean_seq_*``: 5,000 calls one after
  another on one of those sockets;
* ``clients_100_*``: 100 `GatewayClient` sockets in this process calling
  at once (the product's client: this process's CPU bounds it).

Every figure is one JSON line on stdout (the shape of `benchmarks._common.emit`);
the windows carry ``cpu`` (`benchmarks._workers.CpuWindow`: this benchmark's
processes against *other* processes, the machine being shared).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from functools import partial
from typing import Any

import trio
import trio_websocket

import trio_cluster as tc
from trio_cluster.gateway import (
    ClientConfig,
    Gateway,
    GatewayConfig,
    expose,
    open_gateway_client,
    serve_gateway,
)

from ._common import (
    Counter,
    Increment,
    concurrent,
    emit,
    emit_phase,
    percentile,
    progress,
    sequential,
    summary,
)
from ._workers import (
    CpuWindow,
    Worker,
    cpu_seconds,
    lean_client_command,
    load_average,
    serve_commands,
    source_address,
)

GATEWAY = Gateway(
    entities=[expose(Counter, "increment")],
    # A benchmark's clients are not abusive: no rate limits in the way.
    config=GatewayConfig(
        connect_rate=None, message_rate=None, max_concurrent_requests=1024
    ),
)


async def _echo(request: trio_websocket.WebSocketRequest) -> None:
    ws = await request.accept()
    with contextlib.suppress(trio_websocket.ConnectionClosed):
        while True:
            await ws.send_message(await ws.get_message())


async def _serve() -> None:
    async with (
        tc.open_runner(entities=[Counter]) as runner,
        trio.open_nursery() as nursery,
    ):
        echo = await nursery.start(
            trio_websocket.serve_websocket, _echo, "127.0.0.1", 0, None
        )
        server = await nursery.start(serve_gateway, runner, GATEWAY, "127.0.0.1", 0)
        ready = {"gateway_port": server.port, "echo_port": echo.port}
        await serve_commands({}, ready)
        nursery.cancel_scope.cancel()


_cpu_seconds = cpu_seconds


async def _floor(port: int, count: int) -> float:
    message = b"x" * 60
    async with trio_websocket.open_websocket(
        "127.0.0.1", port, "/", use_ssl=False
    ) as ws:

        async def echo(_: int) -> object:
            await ws.send_message(message)
            return await ws.get_message()

        await sequential(echo, 200)
        rate, latencies = await sequential(echo, count)
    emit_phase("W8", "floor_ws_echo", rate, latencies, n=count)
    return summary(latencies)["p50_us"]


async def _sequential(url: str, count: int, floor_p50: float, pid: int) -> None:
    async with open_gateway_client(url) as client:
        counter = client.entities(Counter)("sequential")
        one = Increment(1)

        async def call(_: int) -> object:
            return await counter.increment(one)

        await sequential(call, 200)
        before = _cpu_seconds(pid)
        rate, latencies = await sequential(call, count)
        server_cpu = (_cpu_seconds(pid) - before) / count
    emit_phase("W8", "sequential", rate, latencies, n=count)
    emit("W8", "sequential_server_cpu_per_call", server_cpu * 1e6, "us")
    p50 = summary(latencies)["p50_us"]
    emit("W8", "sequential_p50_over_floor", p50 / floor_p50, "ratio")


async def _many(url: str, count: int, clients: int, pid: int | None = None) -> None:
    config = ClientConfig()
    async with contextlib.AsyncExitStack() as stack:
        handles = []
        for i in range(clients):
            client = await stack.enter_async_context(
                open_gateway_client(url, config=config)
            )
            await client.wait_connected()
            handles.append(client.entities(Counter)(f"counter-{i}"))
        one = Increment(1)

        async def call(i: int) -> object:
            return await handles[i % clients].increment(one)

        await concurrent(call, clients * 10, clients)
        before = None if pid is None else _cpu_seconds(pid)
        rate, latencies = await concurrent(call, count, clients)
        after = None if pid is None else _cpu_seconds(pid)
    emit_phase("W8", f"clients_{clients}", rate, latencies, n=count)
    if before is not None and after is not None:
        per_call = (after - before) / count * 1e6
        emit("W8", f"clients_{clients}_server_cpu_per_call", per_call, "us")


async def _lean(
    url: str, server_pid: int, nursery: trio.Nursery, *, quick: bool
) -> None:
    """The peer's shape: 100 sockets in 2 lean client processes, a closed
    loop per socket, then sequential calls on one socket."""
    procs, sockets = 2, 100
    clients = [Worker(lean_client_command(), name=f"client {i}") for i in range(procs)]
    for client in clients:
        await client.start(nursery)
    shares = [
        sockets // procs + (1 if i < sockets % procs else 0) for i in range(procs)
    ]
    for i, client in enumerate(clients):
        answer = await client.call(
            "connect", url=url, n=shares[i], src=source_address(i), index_base=i * 1000
        )
        if answer["ok"] != shares[i]:
            raise RuntimeError(f"lean clients: {answer}")
    warmup, duration = (0.5, 3.0) if quick else (1.0, 10.0)
    window = CpuWindow([server_pid, *(client.pid for client in clients)])
    server_cpu = cpu_seconds(server_pid)
    answers: list[dict[str, Any]] = [{} for _ in clients]

    async def loop(i: int) -> None:
        answers[i] = await clients[i].call(
            "rpc",
            operation="Counter.increment",
            msg={"amount": 1},
            key_prefix="counter-",
            warmup_s=warmup,
            duration_s=duration,
        )

    async with trio.open_nursery() as calling:
        for i in range(procs):
            calling.start_soon(loop, i)
    cpu = window.report()
    server_cpu = cpu_seconds(server_pid) - server_cpu
    calls = sum(answer["calls"] for answer in answers)
    latencies = [value for answer in answers for value in answer["latencies"]]
    wrong = sum(answer["wrong"] + answer["errors"] for answer in answers)
    # The server's CPU covers the warm-up too: per call, scaled the same.
    per_call = server_cpu / (calls * (warmup + duration) / duration)
    common = {"clients": sockets, "client_procs": procs, "duration_s": duration}
    emit(
        "W8", "rpc_req_per_s", calls / duration, "req/s", counter_errors=wrong, **common
    )
    emit("W8", "rpc_p50", percentile(latencies, 50) * 1e6, "us", **common)
    emit("W8", "rpc_p99", percentile(latencies, 99) * 1e6, "us", **common)
    emit(
        "W8",
        "rpc_server_cpu_per_call",
        per_call * 1e6,
        "us",
        server_cpu_pct=round(100 * server_cpu / cpu["wall_s"], 1),
        cpu=cpu,
        **common,
    )
    count = 1000 if quick else 5000
    await clients[0].call(
        "rpc",
        operation="Counter.increment",
        msg={"amount": 1},
        key_prefix="counter-",
        warmup_s=0,
        duration_s=0,
        sockets=1,
        count=200,
    )
    window = CpuWindow([server_pid, clients[0].pid])
    server_cpu = cpu_seconds(server_pid)
    answer = await clients[0].call(
        "rpc",
        operation="Counter.increment",
        msg={"amount": 1},
        key_prefix="counter-",
        warmup_s=0,
        duration_s=0,
        sockets=1,
        count=count,
    )
    cpu = window.report()
    server_cpu = cpu_seconds(server_pid) - server_cpu
    latencies = answer["latencies"]
    emit("W8", "lean_seq_p50", percentile(latencies, 50) * 1e6, "us", n=count)
    emit("W8", "lean_seq_p99", percentile(latencies, 99) * 1e6, "us", n=count)
    emit(
        "W8",
        "lean_seq_server_cpu_per_call",
        server_cpu / count * 1e6,
        "us",
        n=count,
        cpu=cpu,
    )
    for client in clients:
        await client.call("close")
        await client.aclose()


async def run(*, quick: bool) -> None:
    load_start = load_average()
    async with trio.open_nursery() as nursery:
        progress("W8 starting the gateway server (subprocess)")
        server = Worker(
            [sys.executable, "-m", "benchmarks.w8_gateway", "serve"],
            name="the W8 server",
        )
        ready = await server.start(nursery)
        url = f"ws://127.0.0.1:{ready['gateway_port']}/ws"
        try:
            count = 1000 if quick else 5000
            progress(f"W8 floor: {count} bare trio-websocket round trips")
            floor = await _floor(int(ready["echo_port"]), count)
            progress(f"W8 sequential: {count} gateway calls")
            pid = server.pid
            await _sequential(url, count, floor, pid)
            progress(f"W8 100 sockets in 2 lean client processes (server pid {pid})")
            await _lean(url, pid, nursery, quick=quick)
            progress("W8 100 GatewayClients in this process")
            await _many(url, 5000 if quick else 30000, 100, pid)
            emit(
                "W8",
                "load_average",
                load_average()[0],
                "load",
                loadavg_start=load_start,
                loadavg_end=load_average(),
            )
        finally:
            await server.aclose()


def main(quick: bool = False) -> None:
    trio.run(partial(run, quick=quick))


def _cli() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.w8_gateway")
    parser.add_argument("command", choices=["bench", "serve"])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    if args.command == "serve":
        trio.run(_serve)
    else:
        main(quick=args.quick)


if __name__ == "__main__":
    _cli()
