"""W8: RPC to a volatile entity through the realtime gateway, next to the bare
trio-websocket echo in the same run.

``python -m benchmarks w8 [--quick]`` starts a server process (a runner on
memory storage hosting ``Counter``, its gateway exposing ``increment``, and
a bare trio-websocket echo server), then, in this process:

* ``floor_ws_echo_*``: sequential round trips of a small message to the
  bare echo server: the floor of any call over a WebSocket;
* ``sequential_*``: sequential gateway calls from one `GatewayClient`
  (msgpack), and the ratio of their p50 to the floor's (target ≤ 1.5);
* ``clients_100_*``: 100 clients (one socket each) calling at once.

Every figure is one JSON line on stdout (the shape of `benchmarks._common.emit`).
The clients run in this one process: its CPU bounds the 100-client figure
as much as the server's does (the peer's figures were measured the same way).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
from functools import partial
from typing import TYPE_CHECKING

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
    progress,
    sequential,
    start_ready_process,
    summary,
)

if TYPE_CHECKING:
    from trio_cluster.testing import ChildProcess

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
        ready = {"event": "ready", "gateway_port": server.port, "echo_port": echo.port}
        print(json.dumps(ready), flush=True)
        stdin = trio.lowlevel.FdStream(sys.stdin.fileno())
        while await stdin.receive_some(4096):
            pass
        nursery.cancel_scope.cancel()


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of process ``pid`` so far (Linux ``/proc``)."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


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


async def run(*, quick: bool) -> None:
    async with trio.open_nursery() as nursery:
        progress("W8 starting the gateway server (subprocess)")
        server: ChildProcess
        server, ready = await start_ready_process(
            [sys.executable, "-m", "benchmarks.w8_gateway", "serve"],
            nursery,
            name="the W8 server",
            stdin=subprocess.PIPE,
        )
        url = f"ws://127.0.0.1:{ready['gateway_port']}/ws"
        try:
            count = 1000 if quick else 5000
            progress(f"W8 floor: {count} bare trio-websocket round trips")
            floor = await _floor(int(ready["echo_port"]), count)
            progress(f"W8 sequential: {count} gateway calls")
            assert server.process is not None
            pid = server.process.pid
            await _sequential(url, count, floor, pid)
            progress("W8 100 clients")
            await _many(url, 5000 if quick else 30000, 100, pid)
        finally:
            with trio.CancelScope(shield=True):
                assert server.process is not None
                assert server.process.stdin is not None
                await server.process.stdin.aclose()
                with trio.move_on_after(20):
                    await server.process.wait()


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
