"""Helper processes driven by JSON-line commands, and CPU accounting from
``/proc`` (Linux), for the gateway benchmarks W6-W8.

A `Worker` is a child process that prints ``{"event": "ready", ...}`` on
stdout, then answers each command line ``{"id": n, "op": ..., ...}`` written
to its stdin with a line ``{"re": n, ...}`` (``"error"`` if it failed). The
lean client (`benchmarks._lean_client`) and the gateway servers of W6-W8
(`serve_commands`) are such processes.

`CpuWindow` measures, over a window, each process's CPU and how much of the
machine the benchmark's processes used against *other* processes (the
machine is shared): the same split as the peer's ``cpuReport``.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import trio

from ._common import READY_DEADLINE, REPO, child_env, progress

_CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process ``pid`` so far."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK


def rss_bytes(pid: int) -> int:
    """Resident set size of process ``pid``."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _machine() -> tuple[int, int]:
    """(busy, total) jiffies of all cores."""
    with open("/proc/stat") as stat:
        fields = [int(value) for value in stat.readline().split()[1:9]]
    idle = fields[3] + fields[4]
    total = sum(fields)
    return total - idle, total


def load_average() -> list[float]:
    with open("/proc/loadavg") as loadavg:
        return [float(value) for value in loadavg.read().split()[:3]]


class CpuWindow:
    """CPU of ``pids`` (and this process) over a window, against the
    machine's."""

    def __init__(self, pids: Sequence[int]) -> None:
        self.pids = list(pids)
        self.start = self._sample()

    def _sample(self) -> tuple[float, list[float], float, tuple[int, int]]:
        usage = os.times()
        return (
            time.monotonic(),
            [cpu_seconds(pid) for pid in self.pids],
            usage.user + usage.system,
            _machine(),
        )

    def report(self) -> dict[str, Any]:
        """``wall_s``, ``cpu_s`` per pid, and ``bench_cpu_pct``,
        ``other_cpu_pct``, ``machine_busy_pct`` (% of one core, but the
        last: % of all cores)."""
        t0, procs0, self0, (busy0, total0) = self.start
        t1, procs1, self1, (busy1, total1) = self._sample()
        wall = t1 - t0
        per_pid = [after - before for before, after in zip(procs0, procs1, strict=True)]
        ours = sum(per_pid) + self1 - self0
        machine = (busy1 - busy0) / _CLK_TCK
        return {
            "wall_s": round(wall, 3),
            "cpu_s": [round(value, 3) for value in per_pid],
            "machine_busy_pct": round(
                100 * (busy1 - busy0) / max(1, total1 - total0), 1
            ),
            "bench_cpu_pct": round(100 * ours / wall, 1),
            "other_cpu_pct": round(100 * max(0.0, machine - ours) / wall, 1),
        }


class Worker:
    """A command-driven child process (see the module docstring), importing
    what this process imports (`child_env`)."""

    def __init__(self, command: Sequence[str], *, name: str) -> None:
        self.command = list(command)
        self.name = name
        self.process: trio.Process | None = None
        self.ready: dict[str, Any] = {}
        self._next = 0
        self._waiting: dict[int, trio.MemorySendChannel[dict[str, Any]]] = {}
        self._ready = trio.Event()
        self._exited = False

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    async def start(self, nursery: trio.Nursery) -> dict[str, Any]:
        """Start the process (its stderr is ours) and wait for ``ready``."""
        self.process = await trio.lowlevel.open_process(
            self.command,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            cwd=REPO,
            env=child_env(),
        )
        nursery.start_soon(self._read)
        with trio.move_on_after(READY_DEADLINE):
            await self._ready.wait()
        if not self._ready.is_set():
            raise RuntimeError(f"{self.name} did not get ready")
        return self.ready

    async def _read(self) -> None:
        assert self.process is not None
        assert self.process.stdout is not None
        buffer = b""
        try:
            while chunk := await self.process.stdout.receive_some(1 << 20):
                buffer += chunk
                *lines, buffer = buffer.split(b"\n")
                for line in lines:
                    self._line(line)
        finally:
            self._exited = True
            for channel in self._waiting.values():
                channel.close()
            self._ready.set()

    def _line(self, line: bytes) -> None:
        try:
            message = json.loads(line)
        except ValueError:
            sys.stderr.write(line.decode(errors="replace") + "\n")
            return
        if not isinstance(message, dict):
            return
        if message.get("event") == "ready":
            self.ready = message
            self._ready.set()
        elif "re" in message:
            channel = self._waiting.pop(message["re"], None)
            if channel is not None:
                channel.send_nowait(message)

    async def call(self, op: str, **args: Any) -> dict[str, Any]:
        """Send command ``op`` and wait for its answer.

        Raises:
            RuntimeError: the command failed, or the process exited.
        """
        assert self.process is not None
        assert self.process.stdin is not None
        self._next += 1
        request = self._next
        send, receive = trio.open_memory_channel[dict[str, Any]](1)
        self._waiting[request] = send
        line = json.dumps({"id": request, "op": op, **args}) + "\n"
        await self.process.stdin.send_all(line.encode())
        try:
            answer = await receive.receive()
        except trio.EndOfChannel:
            raise RuntimeError(f"{self.name} exited during {op!r}") from None
        if "error" in answer:
            raise RuntimeError(f"{self.name}: {op}: {answer['error']}")
        return answer

    async def aclose(self, seconds: float = 20.0) -> None:
        """Close its stdin (it exits), wait at most ``seconds``, then kill."""
        process = self.process
        if process is None:
            return
        with trio.CancelScope(shield=True):
            if process.stdin is not None:
                with contextlib.suppress(
                    trio.BrokenResourceError, trio.ClosedResourceError
                ):
                    await process.stdin.aclose()
            with trio.move_on_after(seconds):
                await process.wait()
            if process.returncode is None:
                progress(f"{self.name} did not exit: killed")
                process.kill()
                await process.wait()


async def serve_commands(
    handlers: dict[str, Callable[..., Awaitable[dict[str, Any]]]],
    ready: dict[str, Any],
) -> None:
    """The child side of `Worker`, for a Trio process: print ``ready``, then
    run each command line as a task calling ``handlers[op](**args)``, and
    print its answer; return when stdin closes."""
    print(json.dumps({"event": "ready", "pid": os.getpid(), **ready}), flush=True)
    stdin = trio.lowlevel.FdStream(os.dup(sys.stdin.fileno()))

    async def run(request: dict[str, Any]) -> None:
        re = request.pop("id")
        handler = handlers[request.pop("op")]
        try:
            answer = await handler(**request)
        except Exception as exc:  # reported to the orchestrator
            answer = {"error": repr(exc)}
        print(json.dumps({"re": re, **answer}), flush=True)

    async with stdin, trio.open_nursery() as nursery:
        buffer = b""
        while chunk := await stdin.receive_some(65536):
            buffer += chunk
            *lines, buffer = buffer.split(b"\n")
            for line in lines:
                if line.strip():
                    nursery.start_soon(run, json.loads(line))
        nursery.cancel_scope.cancel()


def source_address(i: int) -> str:
    """The loopback source address of client process ``i`` (127.0.0.2...):
    each has its own ephemeral ports."""
    return f"127.0.0.{2 + i % 32}"


def lean_client_command() -> list[str]:
    return [sys.executable, "-m", "benchmarks._lean_client"]


def median_or_nan(values: Sequence[float]) -> float:
    ordered = sorted(values)
    if not ordered:
        return math.nan
    return ordered[len(ordered) // 2]
