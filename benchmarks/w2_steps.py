"""W2's remote call, counted: Trio task steps and CPU time per call on both
sides (and optionally a cProfile of each side), next to the bare
trio-websocket echo's.

``python -m benchmarks.w2_steps [--calls N] [--concurrent-calls M]
[--profile DIR]`` starts the W2 server runner in a subprocess (``serve``,
the same runner as `benchmarks.w2_remote` with a Trio instrument counting
task steps), then, in this process, measures ``N`` sequential echo round
trips, ``N`` sequential all-remote calls and ``M`` calls from 100 callers,
on each side: steps and CPU time (``os.times()``) divided by the number of
calls, and the tasks that ran, by name. With ``--profile``, each side's
cProfile of each phase is written to ``DIR`` (``echo-client.prof``,
``call-server.prof``, ``concurrent-client.prof``...) and summarised on
stderr.

The server is driven through its stdin, one command per line: ``mark NAME``
(print ``{"event": NAME, ...}`` with the steps since the last mark),
``profile`` (start profiling) and ``dump PATH`` (stop and write it).
"""

from __future__ import annotations

import argparse
import collections
import cProfile
import json
import os
import pstats
import subprocess
import sys
import uuid
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio
import trio_websocket

import trio_cluster as tc

from ._common import (
    Counter,
    bench_dsn,
    concurrent,
    drop_tables,
    ids,
    progress,
    round_robin,
    sequential,
    start_ready_process,
)
from .w2_remote import _wait_split, caller_runner, serving

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from trio_cluster.testing import ChildProcess


class StepCounter(trio.abc.Instrument):
    """Counts task steps, by task name, since the last `take`."""

    def __init__(self) -> None:
        self.steps: collections.Counter[str] = collections.Counter()
        self.cpu = os.times()

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        self.steps[task.name.rsplit(".", 1)[-1]] += 1

    def take(self) -> dict[str, Any]:
        steps, self.steps = self.steps, collections.Counter()
        cpu, self.cpu = self.cpu, os.times()
        return {
            "steps": sum(steps.values()),
            "user": self.cpu.user - cpu.user,
            "system": self.cpu.system - cpu.system,
            "by_task": dict(steps.most_common()),
        }


async def _serve(dsn: str, prefix: str) -> None:
    counter = StepCounter()
    trio.lowlevel.add_instrument(counter)
    profile: cProfile.Profile | None = None
    async with serving(dsn, prefix) as stdin:
        buffer = b""
        while chunk := await stdin.receive_some(4096):
            buffer += chunk
            *lines, buffer = buffer.split(b"\n")
            for line in lines:
                command, _, argument = line.decode().partition(" ")
                if command == "mark":
                    record = {"event": argument, **counter.take()}
                    print(json.dumps(record), flush=True)
                elif command == "profile":
                    profile = cProfile.Profile()
                    profile.enable()
                elif command == "dump" and profile is not None:
                    profile.disable()
                    profile.dump_stats(argument)
                    print(json.dumps({"event": "dumped"}), flush=True)


def _report(
    name: str, calls: int, client: dict[str, Any], server: dict[str, Any]
) -> None:
    for side, counts in (("client", client), ("server", server)):
        per_call = counts["steps"] / calls
        tasks = ", ".join(
            f"{task} {steps / calls:.2f}"
            for task, steps in counts["by_task"].items()
            if steps / calls >= 0.05
        )
        user = counts["user"] / calls * 1e6
        system = counts["system"] / calls * 1e6
        print(
            f"{name} {side}: {per_call:.2f} steps/call, CPU/call {user:.1f} us user"
            f" + {system:.1f} us system ({tasks})",
            file=sys.stderr,
        )


def _summarise(path: str, title: str) -> None:
    print(f"--- {title}: top functions by own time", file=sys.stderr)
    stats = pstats.Stats(path, stream=sys.stderr)
    print(f"{stats.total_calls} function calls", file=sys.stderr)  # type: ignore[attr-defined]
    stats.sort_stats("tottime").print_stats(12)


async def _profile(
    directory: Path,
    name: str,
    control: trio.abc.SendStream,
    server: ChildProcess,
    call: Callable[[int], Awaitable[object]],
    calls: int,
    callers: int = 1,
) -> None:
    """cProfile ``calls`` calls (sequential, or from ``callers`` tasks) on
    both sides; write ``DIR/NAME-client.prof`` and
    ``DIR/NAME-server.prof``."""
    server_path = str(directory / f"{name}-server.prof")
    client_path = str(directory / f"{name}-client.prof")
    await control.send_all(b"profile\n")
    await trio.sleep(0.1)
    profile = cProfile.Profile()
    profile.enable()
    if callers == 1:
        await sequential(call, calls)
    else:
        await concurrent(call, calls, callers)
    profile.disable()
    profile.dump_stats(client_path)
    await control.send_all(f"dump {server_path}\n".encode())
    await server.wait_event("dumped", seconds=10)
    _summarise(client_path, f"{name}: client (caller) side")
    _summarise(server_path, f"{name}: server (owner) side")


async def _measure_concurrent(
    name: str,
    runner: tc.Runner,
    call: Callable[[int], Awaitable[object]],
    calls: int,
    mark: Callable[[], Awaitable[dict[str, Any]]],
    counter: StepCounter,
) -> None:
    """``calls`` calls from 100 callers: steps and CPU time per call on
    both sides, and the frames the caller's endpoint sent and received."""
    before = runner.statistics().transport
    await mark()
    counter.take()
    rate, _ = await concurrent(call, calls, 100)
    client_steps = counter.take()
    _report(name, calls, client_steps, await mark())
    after = runner.statistics().transport
    assert before is not None
    assert after is not None
    print(
        f"{name}: {rate:.0f} calls/s, client frames sent"
        f" {after.frames_sent - before.frames_sent} received"
        f" {after.frames_received - before.frames_received} for"
        f" {after.envelopes_sent - before.envelopes_sent} requests",
        file=sys.stderr,
    )


async def _mixed(
    dsn: str,
    prefix: str,
    ready: dict[str, Any],
    mark: Callable[[], Awaitable[dict[str, Any]]],
    counter: StepCounter,
    calls: int,
    profile_dir: Path | None,
    control: trio.abc.SendStream,
    server: ChildProcess,
) -> None:
    """W2's mixed phase: the caller's runner hosts ``Counter`` too (about
    half the ids local); 100 callers, steps and CPU time on both sides."""
    async with caller_runner(dsn, prefix, ("default",)) as runner:
        local = await _wait_split(runner, tc.RunnerAddress.parse(ready["address"]))
        progress(f"mixed: {local:.0%} of the ids are local")
        call = round_robin(runner, Counter, ids())
        await concurrent(call, 1000, 100)
        await concurrent(call, calls // 2, 100)
        await _measure_concurrent(
            "mixed 100 callers", runner, call, calls, mark, counter
        )
        if profile_dir is not None:
            await _profile(profile_dir, "mixed", control, server, call, calls, 100)


async def run(
    dsn: str,
    prefix: str,
    calls: int,
    concurrent_calls: int,
    profile_dir: Path | None,
    *,
    mixed: bool = False,
) -> None:
    counter = StepCounter()
    trio.lowlevel.add_instrument(counter)
    async with trio.open_nursery() as nursery:
        command = [sys.executable, "-m", "benchmarks.w2_steps", "serve"]
        command += ["--dsn", dsn, "--prefix", prefix]
        server, ready = await start_ready_process(
            command, nursery, name="the W2 server", stdin=subprocess.PIPE
        )
        assert server.process is not None
        assert server.process.stdin is not None
        control = server.process.stdin
        marks = 0

        async def mark() -> dict[str, Any]:
            nonlocal marks
            marks += 1
            await control.send_all(f"mark m{marks}\n".encode())
            return await server.wait_event(f"m{marks}", seconds=10)

        port = int(ready["echo_port"])
        async with trio_websocket.open_websocket(
            "127.0.0.1", port, "/", use_ssl=False
        ) as ws:
            message = b"x" * 60

            async def echo(_: int) -> object:
                await ws.send_message(message)
                return await ws.get_message()

            await sequential(echo, 200)
            await mark()
            counter.take()
            await sequential(echo, calls)
            client_steps = counter.take()
            _report("echo", calls, client_steps, await mark())
            if profile_dir is not None:
                await _profile(profile_dir, "echo", control, server, echo, calls)

        async with caller_runner(dsn, prefix, ()) as runner:
            call = round_robin(runner, Counter, ids())
            progress("warm-up")
            await concurrent(call, 1000, 100)
            await sequential(call, 500)
            await mark()
            counter.take()
            _, latencies = await sequential(call, calls)
            client_steps = counter.take()
            _report("remote call", calls, client_steps, await mark())
            latencies.sort()
            print(
                f"remote call p50 {latencies[len(latencies) // 2] * 1e6:.0f} us",
                file=sys.stderr,
            )
            if profile_dir is not None:
                await _profile(profile_dir, "call", control, server, call, calls)
            await _measure_concurrent(
                "100 callers", runner, call, concurrent_calls, mark, counter
            )
            if profile_dir is not None:
                await _profile(
                    profile_dir,
                    "concurrent",
                    control,
                    server,
                    call,
                    concurrent_calls,
                    100,
                )
        if mixed:
            await _mixed(
                dsn,
                prefix,
                ready,
                mark,
                counter,
                concurrent_calls,
                profile_dir,
                control,
                server,
            )
        await control.aclose()
        await server.wait_exit(20)


def _cli() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.w2_steps")
    parser.add_argument("command", nargs="?", default="bench")
    parser.add_argument("--dsn")
    parser.add_argument("--prefix")
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--concurrent-calls", type=int, default=10000)
    parser.add_argument("--profile", metavar="DIR")
    parser.add_argument(
        "--mixed", action="store_true", help="then the mixed phase (100 callers)"
    )
    args = parser.parse_args()
    if args.command == "serve":
        trio.run(_serve, args.dsn, args.prefix)
        return
    dsn = bench_dsn()
    prefix = f"w2s_{uuid.uuid4().hex[:12]}"
    profile = None
    if args.profile is not None:
        profile = Path(args.profile).resolve()
        profile.mkdir(parents=True, exist_ok=True)
    try:
        trio.run(
            partial(
                run,
                dsn,
                prefix,
                args.calls,
                args.concurrent_calls,
                profile,
                mixed=args.mixed,
            )
        )
    finally:
        drop_tables(dsn, prefix)


if __name__ == "__main__":
    _cli()
