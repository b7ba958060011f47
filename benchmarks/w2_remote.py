"""W2: volatile RPC between two runner processes over the WebSocket transport.

The benchmark process starts a *server* runner in a subprocess
(``python -m benchmarks.w2_remote serve --dsn ... --prefix ...``) that hosts
the ``Counter`` entities, then opens a *client-only* caller runner in this
process (``shard_groups=()``: it serves no shard), so every call goes over
the WebSocket connection to the server. Both runners share a PostgreSQL storage
(``TRIO_CLUSTER_BENCH_DSN``, else 127.0.0.1:5432 database ``test``) under a
fresh table prefix, dropped at the end: membership and shard locks are real,
only the calls are measured.

Figures: sequential calls (round-robin over the 1,000 ids, after a warm-up
that activates them all) and calls from 100 concurrent callers, each with
msg/s and caller-side p50/p99. Then the same again (``mixed_*`` figures) with
the caller's runner hosting ``Counter`` too, as BENCHMARKS.md describes W2:
about half the ids are then served locally. ``--quick`` runs fewer calls.

Before those, ``floor_ws_echo_*``: sequential round trips to a bare
trio-websocket echo server in the server process, the floor any call over
this library pays on this machine.

``python -m benchmarks.w2_remote serve`` prints ``{"event": "ready",
"address": "host:port", "echo_port": port}`` on stdout once it serves every
shard (read with `trio_cluster.testing.ChildProcess`), and exits gracefully
when its stdin closes.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import uuid
from functools import partial
from typing import TYPE_CHECKING

import trio
import trio_websocket

import trio_cluster as tc
from trio_cluster.storage import PostgresStorage
from trio_cluster.testing import ChildProcess
from trio_cluster.transport import WebSocketTransport

from ._common import (
    Counter,
    bench_dsn,
    concurrent,
    drop_tables,
    emit,
    emit_phase,
    ids,
    progress,
    round_robin,
    sequential,
    start_ready_process,
    summary,
)

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

CALLERS = 100
LOCALHOST = tc.RunnerAddress("127.0.0.1", 0)


def _config(groups: tuple[str, ...]) -> tc.ShardingConfig:
    # Messages are attrs classes that are known to encode: skip the local
    # round trip through the codec (it is never local here anyway).
    return tc.ShardingConfig(
        shard_groups=groups, runner_address=LOCALHOST, serialize_local_calls=False
    )


# ----------------------------------------------------------------------
# The server process


async def _echo(request: trio_websocket.WebSocketRequest) -> None:
    ws = await request.accept()
    with contextlib.suppress(trio_websocket.ConnectionClosed):
        while True:
            await ws.send_message(await ws.get_message())


@contextlib.asynccontextmanager
async def serving(dsn: str, prefix: str) -> AsyncIterator[trio.lowlevel.FdStream]:
    """W2's server runner, with a bare trio-websocket echo server beside it
    (the transport's floor): announces both on stdout (one JSON line), then
    yields stdin, where the caller's commands arrive; the caller closes it
    at the end."""
    storage = PostgresStorage(dsn, table_prefix=prefix)
    async with (
        trio.open_nursery() as nursery,
        tc.open_runner(
            entities=[Counter],
            config=_config(("default",)),
            storage=storage,
            transport=WebSocketTransport(),
        ) as runner,
    ):
        echo = await nursery.start(
            trio_websocket.serve_websocket, _echo, "127.0.0.1", 0, None
        )
        await runner.wait_shards_acquired()
        ready = {
            "event": "ready",
            "address": str(runner.address),
            "echo_port": echo.port,
        }
        print(json.dumps(ready), flush=True)
        stdin = trio.lowlevel.FdStream(os.dup(sys.stdin.fileno()))
        async with stdin:
            yield stdin
        nursery.cancel_scope.cancel()


async def _serve(dsn: str, prefix: str) -> None:
    async with serving(dsn, prefix) as stdin:
        while await stdin.receive_some(4096):
            pass


# ----------------------------------------------------------------------
# The caller (benchmark) process


async def _start_server(
    dsn: str, prefix: str, nursery: trio.Nursery
) -> tuple[ChildProcess, tc.RunnerAddress, int]:
    command = [sys.executable, "-m", "benchmarks.w2_remote", "serve"]
    command += ["--dsn", dsn, "--prefix", prefix]
    process, ready = await start_ready_process(
        command, nursery, name="the W2 server", stdin=subprocess.PIPE
    )
    return process, tc.RunnerAddress.parse(ready["address"]), int(ready["echo_port"])


async def _measure_floor(port: int, *, quick: bool) -> None:
    """Sequential round trips of a 60-byte message to a bare trio-websocket
    echo server in the other process: what any call over this library pays
    before trio_cluster does anything."""
    count = 1000 if quick else 5000
    message = b"x" * 60
    async with trio_websocket.open_websocket(
        "127.0.0.1", port, "/", use_ssl=False
    ) as ws:

        async def echo(_: int) -> object:
            await ws.send_message(message)
            return await ws.get_message()

        progress(f"W2 floor: {count} bare trio-websocket round trips")
        await sequential(echo, 200)
        rate, latencies = await sequential(echo, count)
    stats = summary(latencies)
    emit("W2", "floor_ws_echo_msgs_per_s", rate, "msg/s", n=count)
    emit("W2", "floor_ws_echo_p50", stats["p50_us"], "us")
    emit("W2", "floor_ws_echo_p99", stats["p99_us"], "us")


async def _stop_server(server: ChildProcess) -> None:
    assert server.process is not None
    assert server.process.stdin is not None
    await server.process.stdin.aclose()
    with trio.move_on_after(20):
        await server.process.wait()
    server.kill_leftover()  # a hung server


async def _measure(
    runner: tc.Runner, *, quick: bool, label: str, **extra: object
) -> None:
    """Warm up (activate the 1,000 ids), then the sequential and the
    100-caller phases, emitting ``<label>sequential_*`` and
    ``<label>concurrent_*`` figures."""
    sequential_calls = 1000 if quick else 5000
    concurrent_calls = 4000 if quick else 20000
    names = ids()
    call = round_robin(runner, Counter, names)

    name = "mixed: " if label else "pure remote: "
    progress(f"W2 {name}warm-up: activating {len(names)} entities")
    await concurrent(call, len(names), CALLERS)

    progress(f"W2 {name}sequential: {sequential_calls} calls")
    rate, latencies = await sequential(call, sequential_calls)
    emit_phase("W2", f"{label}sequential", rate, latencies, n=sequential_calls, **extra)

    progress(f"W2 {name}concurrent: {concurrent_calls} calls, {CALLERS} callers")
    rate, latencies = await concurrent(call, concurrent_calls, CALLERS)
    emit_phase(
        "W2",
        f"{label}concurrent",
        rate,
        latencies,
        {"callers": CALLERS},
        n=concurrent_calls,
        **extra,
    )


def caller_runner(
    dsn: str, prefix: str, groups: tuple[str, ...]
) -> contextlib.AbstractAsyncContextManager[tc.Runner]:
    """The caller's runner of W2 (serving ``groups``: none, all remote; or
    ``("default",)``, mixed) beside the server's, on its storage."""
    return tc.open_runner(
        entities=[Counter],
        config=_config(groups),
        storage=PostgresStorage(dsn, table_prefix=prefix),
        transport=WebSocketTransport(),
    )


async def _wait_split(runner: tc.Runner, server: tc.RunnerAddress) -> float:
    """Wait until the shards are split between ``runner`` and the server and
    ``runner`` serves all of its own; return the fraction of the ids it
    serves."""
    client = runner.client(Counter)
    with trio.fail_after(60):
        while True:
            await runner.wait_shards_acquired()
            owners = runner.assignment()
            if server in owners.values() and runner.address in owners.values():
                break
            await trio.sleep(0.1)
    local = sum(
        owners.get(client.address_of(name).shard) == runner.address for name in ids()
    )
    return local / len(ids())


async def run(dsn: str, prefix: str, *, quick: bool) -> None:
    extra = {"storage": "postgres", "transport": "websocket"}
    async with trio.open_nursery() as nursery:
        progress("W2 starting the server runner (subprocess)")
        process, server, echo_port = await _start_server(dsn, prefix, nursery)
        progress(f"W2 server at {server}")
        try:
            await _measure_floor(echo_port, quick=quick)
            # 1. Pure remote: a client-only caller, every call goes to B.
            async with caller_runner(dsn, prefix, ()) as runner:
                await _measure(runner, quick=quick, label="", **extra)
                assert runner.statistics().entities == 0
                assert runner.statistics().remote_calls >= 1000
            # 2. Mixed, as in BENCHMARKS.md: the caller's runner hosts
            # Counter too, so about half the ids are local.
            async with caller_runner(dsn, prefix, ("default",)) as runner:
                local = await _wait_split(runner, server)
                progress(f"W2 mixed: {local:.0%} of the ids are local")
                await _measure(
                    runner, quick=quick, label="mixed_", local_fraction=local, **extra
                )
        finally:
            with trio.CancelScope(shield=True):
                await _stop_server(process)


def main(quick: bool = False) -> None:
    dsn = bench_dsn()
    prefix = f"w2_{uuid.uuid4().hex[:12]}"
    try:
        trio.run(partial(run, dsn, prefix, quick=quick))
    finally:
        drop_tables(dsn, prefix)


def _cli() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.w2_remote")
    sub = parser.add_subparsers(dest="command", required=True)
    bench = sub.add_parser("bench", help="run W2 (as `python -m benchmarks w2`)")
    bench.add_argument("--quick", action="store_true")
    serve = sub.add_parser("serve", help="the server runner (started by bench)")
    serve.add_argument("--dsn", required=True)
    serve.add_argument("--prefix", required=True)
    args = parser.parse_args()
    if args.command == "serve":
        trio.run(_serve, args.dsn, args.prefix)
    else:
        main(quick=args.quick)


if __name__ == "__main__":
    _cli()
