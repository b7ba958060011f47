"""Real runner processes for the multi-process tests (test support).

* `RunnerProcess`: one ``python -m trio_cluster run
  tests.multiprocess.entities:ENTITIES`` process on 127.0.0.1, on the test's
  PostgreSQL table prefix: it waits for the ``ready`` line with a deadline and
  can be killed (SIGKILL), frozen (SIGSTOP), resumed (SIGCONT) or stopped
  gracefully (SIGTERM, then the ``stopped`` line). Its stderr (the runner's
  log) goes to a file the test can read.
* `MultiCluster`: the processes of one test, its client-only runner (in the
  test process, hosting nothing), SQL on its tables and ``trio-cluster
  status``. Its ``aclose`` kills whatever is still running.

The load the tests put on a cluster lives in `tests.multiprocess.loads`.

Real time is used throughout (these tests run real processes); every wait is
bounded by a deadline.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio

import trio_cluster as tc
from trio_cluster.storage import postgres
from trio_cluster.transport import WebSocketTransport

from .entities import ENTITIES

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Iterable, Mapping

    from tests.pg_fixture import PgAdmin

log = logging.getLogger("tests.multiprocess")
"""Measured figures are logged here (``--log-cli-level=INFO`` shows them)."""

REPO = Path(__file__).resolve().parents[2]
TARGET = "tests.multiprocess.entities:ENTITIES"
SHARDS = 30
"""Shards per group in these tests (few, so that start-up is fast)."""
START_DEADLINE = 30.0
"""Longest wait for a runner's ``ready`` line (the machine is shared)."""
FAST_LEASES = {
    "TRIO_CLUSTER_LEASE_DURATION": "1.5",
    "TRIO_CLUSTER_LEASE_REFRESH_INTERVAL": "0.5",
}
"""Short leases, for the tests whose takeover waits for a lease to lapse."""


def runner_env(extra: Mapping[str, str] = {}) -> dict[str, str]:
    """This process's environment without its ``TRIO_CLUSTER_*`` variables,
    plus the repository on ``PYTHONPATH``, the tests' shard count and
    ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRIO_CLUSTER_")}
    env["PYTHONPATH"] = os.pathsep.join(
        [str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]
    )
    env["TRIO_CLUSTER_SHARDS_PER_GROUP"] = str(SHARDS)
    env.update(extra)
    return env


class RunnerProcess:
    """One runner process (see the module docstring)."""

    def __init__(
        self,
        name: str,
        *,
        dsn: str,
        prefix: str,
        log_dir: Path,
        env: Mapping[str, str] = {},
        metrics: bool = False,
        log_format: str = "text",
    ) -> None:
        self.name = name
        self.command = [
            sys.executable,
            "-m",
            "trio_cluster",
            "run",
            TARGET,
            "--dsn",
            dsn,
            "--listen",
            "127.0.0.1:0",
            "--prefix",
            prefix,
            "--log-format",
            log_format,
        ]
        if metrics:
            self.command += ["--metrics", "127.0.0.1:0"]
        self.env = runner_env(env)
        self.log_path = log_dir / f"{name}.log"
        self.process: trio.Process | None = None
        self.events: list[dict[str, Any]] = []
        self._address: str | None = None
        self.metrics_port: int | None = None
        self._ready = trio.Event()
        self._stopped = trio.Event()
        self._eof = trio.Event()

    def __repr__(self) -> str:
        return f"<RunnerProcess {self.name} {self._address} pid={self.pid}>"

    @property
    def address(self) -> str:
        """The runner's address (from its ``ready`` line)."""
        assert self._address is not None, f"{self.name} was never ready"
        return self._address

    @property
    def pid(self) -> int | None:
        return None if self.process is None else self.process.pid

    async def start(self, nursery: trio.Nursery) -> None:
        """Start the process (not waiting for it to be ready)."""
        with self.log_path.open("ab") as log:
            self.process = await trio.lowlevel.open_process(
                self.command,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=log,
                env=self.env,
                cwd=REPO,
            )
        nursery.start_soon(self._read_stdout)

    async def _read_stdout(self) -> None:
        assert self.process is not None
        assert self.process.stdout is not None
        buffer = b""
        try:
            while chunk := await self.process.stdout.receive_some(65536):
                buffer += chunk
                *lines, buffer = buffer.split(b"\n")
                for line in lines:
                    self._on_line(line.decode(errors="replace"))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            self._eof.set()

    def _on_line(self, line: str) -> None:
        try:
            event = json.loads(line)
        except ValueError:
            return
        self.events.append(event)
        if event.get("event") == "ready":
            self._address = event["address"]
            self.metrics_port = event.get("metrics_port")
            self._ready.set()
        elif event.get("event") == "stopped":
            self._stopped.set()

    def log_text(self) -> str:
        """The runner's stderr so far."""
        return self.log_path.read_text(errors="replace")

    def _failure(self, what: str) -> AssertionError:
        returncode = None if self.process is None else self.process.returncode
        tail = self.log_text()[-3000:]
        return AssertionError(
            f"runner {self.name} {what} (exit status {returncode}); its log ends:\n{tail}"
        )

    async def _wait_for(self, event: trio.Event, seconds: float, what: str) -> None:
        with trio.move_on_after(seconds):
            async with trio.open_nursery() as nursery:

                async def watch_eof() -> None:
                    await self._eof.wait()
                    nursery.cancel_scope.cancel()

                nursery.start_soon(watch_eof)
                await event.wait()
                nursery.cancel_scope.cancel()
        if not event.is_set():
            raise self._failure(what)

    async def wait_ready(self, seconds: float = START_DEADLINE) -> str:
        """Wait for the ``ready`` line; return the runner's address.

        Raises:
            AssertionError: the process exited, or the deadline passed first.
        """
        await self._wait_for(self._ready, seconds, f"was not ready within {seconds} s")
        return self.address

    def signal(self, signum: signal.Signals) -> None:
        assert self.process is not None
        self.process.send_signal(signum)

    def kill(self) -> None:
        """SIGKILL (``kill -9``)."""
        self.signal(signal.SIGKILL)

    def freeze(self) -> None:
        """SIGSTOP."""
        self.signal(signal.SIGSTOP)

    def resume(self) -> None:
        """SIGCONT."""
        self.signal(signal.SIGCONT)

    def terminate(self) -> None:
        """SIGTERM: the runner shuts down gracefully."""
        self.signal(signal.SIGTERM)

    async def wait_stopped(self, seconds: float = 30.0) -> None:
        """Wait for the ``stopped`` line and a zero exit status."""
        await self._wait_for(
            self._stopped, seconds, f"did not print 'stopped' within {seconds} s"
        )
        returncode = await self.wait_exit(seconds)
        if returncode != 0:
            raise self._failure("stopped with a non-zero exit status")

    async def wait_exit(self, seconds: float = 30.0) -> int:
        assert self.process is not None
        with trio.move_on_after(seconds):
            return await self.process.wait()
        raise self._failure(f"did not exit within {seconds} s")

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def kill_leftover(self) -> None:
        """SIGCONT then SIGKILL, if the process still runs (no waiting)."""
        if self.running:
            assert self.process is not None
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(signal.SIGCONT)
                self.process.send_signal(signal.SIGKILL)


class MultiCluster:
    """The runner processes, client runner and tables of one test."""

    def __init__(
        self,
        *,
        dsn: str,
        prefix: str,
        log_dir: Path,
        nursery: trio.Nursery,
        admin: PgAdmin,
    ) -> None:
        self.dsn = dsn
        self.prefix = prefix
        self.log_dir = log_dir
        self.nursery = nursery
        self.admin = admin
        self.processes: list[RunnerProcess] = []

    async def spawn(
        self,
        name: str,
        *,
        env: Mapping[str, str] = {},
        metrics: bool = False,
        log_format: str = "text",
    ) -> RunnerProcess:
        """Start a runner process (call `RunnerProcess.wait_ready` next)."""
        process = RunnerProcess(
            name,
            dsn=self.dsn,
            prefix=self.prefix,
            log_dir=self.log_dir,
            env=env,
            metrics=metrics,
            log_format=log_format,
        )
        self.processes.append(process)
        await process.start(self.nursery)
        return process

    async def start(
        self, *names: str, env: Mapping[str, str] = {}
    ) -> list[RunnerProcess]:
        """Start runners at once and wait until every one is ready."""
        processes = [await self.spawn(name, env=env) for name in names]
        for process in processes:
            await process.wait_ready()
        return processes

    @asynccontextmanager
    async def client(self, **overrides: Any) -> AsyncIterator[tc.Runner]:
        """A client-only runner in this process (hosts no shard)."""
        config = tc.ShardingConfig(
            shard_groups=(),
            runner_address=tc.RunnerAddress("127.0.0.1", 0),
            shards_per_group=SHARDS,
            **overrides,
        )
        async with tc.open_runner(
            entities=ENTITIES,
            config=config,
            storage=postgres(self.dsn, table_prefix=self.prefix),
            transport=WebSocketTransport(),
        ) as runner:
            yield runner

    async def sql(
        self, query: str, params: Iterable[Any] = ()
    ) -> list[tuple[Any, ...]]:
        """Run SQL on the test's schema (in a thread); ``{p}`` is the prefix."""
        return await trio.to_thread.run_sync(
            self.admin.execute, query.format(p=self.prefix), list(params)
        )

    async def status(self) -> dict[str, Any]:
        """``trio-cluster status --json`` of this cluster."""
        done = await trio.run_process(
            [
                sys.executable,
                "-m",
                "trio_cluster",
                "status",
                "--dsn",
                self.dsn,
                "--prefix",
                self.prefix,
                "--json",
            ],
            capture_stdout=True,
            capture_stderr=True,
            env=runner_env(),
            cwd=REPO,
            check=False,
        )
        assert done.returncode == 0, done.stderr.decode()
        data: dict[str, Any] = json.loads(done.stdout)
        return data

    async def aclose(self) -> None:
        """Kill every process still running and wait for them (shielded)."""
        with trio.CancelScope(shield=True):
            for process in self.processes:
                process.kill_leftover()
            with trio.move_on_after(10):
                for process in self.processes:
                    if process.process is not None:
                        await process.process.wait()

    def kill_leftovers(self) -> None:
        for process in self.processes:
            process.kill_leftover()


async def http_get(port: int, path: str) -> tuple[int, str]:
    """GET ``path`` on 127.0.0.1:``port``; (status code, body)."""
    with trio.fail_after(10):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            await stream.send_all(
                f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode()
            )
            response = b""
            while chunk := await stream.receive_some(65536):
                response += chunk
    head, _, body = response.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    return status, body.decode()
