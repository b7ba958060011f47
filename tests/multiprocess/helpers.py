"""Real runner processes for the multi-process tests (test support).

* `RunnerProcess`: one ``python -m trio_cluster run
  tests.multiprocess.entities:ENTITIES`` process on 127.0.0.1, on the test's
  PostgreSQL table prefix, a `trio_cluster.testing.ChildProcess`: it waits
  for the ``ready`` line with a deadline and can be killed (SIGKILL), frozen
  (SIGSTOP), resumed (SIGCONT) or stopped gracefully (SIGTERM, then the
  ``stopped`` line). Its stderr (the runner's log) goes to a file the test
  can read.
* `MultiCluster`: the processes of one test, its client-only runner (in the
  test process, hosting nothing), SQL on its tables and ``trio-cluster
  status``. Its ``aclose`` kills whatever is still running.

The load the tests put on a cluster lives in `tests.multiprocess.loads`.

Real time is used throughout (these tests run real processes); every wait is
bounded by a deadline.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio

import trio_cluster as tc
from trio_cluster.storage import PostgresStorage
from trio_cluster.testing import ChildProcess
from trio_cluster.transport import WebSocketTransport

from ..helpers import http_get as http_get
from .entities import ENTITIES

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Iterable, Mapping, Sequence

    from tests.pg_fixture import PgAdmin
    from trio_cluster.abc import Tracer

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


class RunnerProcess(ChildProcess):
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
        args: Sequence[str] = (),
        target: str = TARGET,
    ) -> None:
        command = [
            sys.executable,
            "-m",
            "trio_cluster",
            "run",
            target,
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
            command += ["--metrics", "127.0.0.1:0"]
        command += args
        super().__init__(
            command,
            name=f"runner {name}",
            env=runner_env(env),
            cwd=REPO,
            log_path=log_dir / f"{name}.log",
        )
        self.short_name = name

    def __repr__(self) -> str:
        ready = self.event("ready")
        address = None if ready is None else ready["address"]
        return f"<RunnerProcess {self.short_name} {address} pid={self.pid}>"

    @property
    def address(self) -> str:
        """The runner's address (from its ``ready`` line)."""
        ready = self.event("ready")
        assert ready is not None, f"{self.name} was never ready"
        address: str = ready["address"]
        return address

    @property
    def metrics_port(self) -> int | None:
        """The port of ``--metrics`` (from its ``ready`` line)."""
        ready = self.event("ready")
        return None if ready is None else ready.get("metrics_port")

    async def start(self, nursery: trio.Nursery) -> None:
        """Start the process (not waiting for it to be ready)."""
        await nursery.start(self.run)

    async def wait_ready(self, seconds: float = START_DEADLINE) -> str:
        """Wait for the ``ready`` line; return the runner's address.

        Raises:
            AssertionError: the process exited, or the deadline passed first.
        """
        await self.wait_event("ready", seconds=seconds)
        return self.address

    async def wait_stopped(self, seconds: float = 30.0) -> None:
        """Wait for the ``stopped`` line and a zero exit status."""
        await self.wait_event("stopped", seconds=seconds)
        returncode = await self.wait_exit(seconds)
        if returncode != 0:
            raise self.failure("stopped with a non-zero exit status")


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
        args: Sequence[str] = (),
        target: str = TARGET,
    ) -> RunnerProcess:
        """Start a runner process (call `RunnerProcess.wait_ready` next);
        ``args`` are more options of ``trio-cluster run``, ``target`` what
        it runs (its ``module:ATTRIBUTE``)."""
        process = RunnerProcess(
            name,
            dsn=self.dsn,
            prefix=self.prefix,
            log_dir=self.log_dir,
            env=env,
            metrics=metrics,
            log_format=log_format,
            args=args,
            target=target,
        )
        self.processes.append(process)
        await process.start(self.nursery)
        return process

    async def start(
        self,
        *names: str,
        env: Mapping[str, str] = {},
        args: Sequence[str] = (),
        target: str = TARGET,
    ) -> list[RunnerProcess]:
        """Start runners at once and wait until every one is ready."""
        processes = [
            await self.spawn(name, env=env, args=args, target=target) for name in names
        ]
        for process in processes:
            await process.wait_ready()
        return processes

    @asynccontextmanager
    async def client(
        self,
        transport: WebSocketTransport | None = None,
        *,
        tracer: Tracer | None = None,
        entities: Sequence[type[tc.Entity]] = ENTITIES,
        **overrides: Any,
    ) -> AsyncIterator[tc.Runner]:
        """A client-only runner in this process (hosts no shard), on
        ``transport`` (default: a plain `WebSocketTransport`), with
        ``tracer`` if given, knowing ``entities`` (the runners' classes)."""
        config = tc.ShardingConfig(
            shard_groups=(),
            runner_address=tc.RunnerAddress("127.0.0.1", 0),
            shards_per_group=SHARDS,
            **overrides,
        )
        async with tc.open_runner(
            entities=entities,
            config=config,
            storage=PostgresStorage(self.dsn, table_prefix=self.prefix),
            transport=transport if transport is not None else WebSocketTransport(),
            tracer=tracer,
        ) as runner:
            yield runner

    async def sql(
        self, query: str, params: Iterable[Any] = ()
    ) -> list[tuple[Any, ...]]:
        """Run SQL on the test's schema (in a thread); ``{p}`` is the prefix."""
        return await trio.to_thread.run_sync(
            self.admin.execute, query.format(p=self.prefix), list(params)
        )

    async def command(self, *args: str) -> tuple[int, str, str]:
        """``trio-cluster ARGS --dsn ... --prefix ... --json`` on this
        cluster: its exit status, stdout and stderr."""
        done = await trio.run_process(
            [
                sys.executable,
                "-m",
                "trio_cluster",
                *args,
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
        return done.returncode, done.stdout.decode(), done.stderr.decode()

    async def status(self) -> dict[str, Any]:
        """``trio-cluster status --json`` of this cluster."""
        code, out, err = await self.command("status")
        assert code == 0, err
        data: dict[str, Any] = json.loads(out)
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
