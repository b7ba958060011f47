"""One simulated runner: a "process" running `open_runner` (test support, Trio).

A `SimulatedRunner` is a runner's machine: its number, address, wall clock
skew and fault state survive restarts. Each run (an `Incarnation`) is a task
of the cluster holding a cancel scope, the *process*: the runner and every
task started "on" it (`SimulatedRunner.start_soon`) live inside it.

* Stopping it gracefully cancels the process: `open_runner` then shuts down
  as it would on SIGTERM (handlers finish, locks are released).
* Killing it first kills its storage session (locks free now, every further
  call fails) and its network endpoint (peers see the connections drop),
  aborts the runner (`Runner.abort`: every handler cancelled now, no
  graceful stop), and only then cancels the process: nothing of a graceful
  stop leaks out, as with SIGKILL.

A run that fails to *start* (storage down) is retried with a backoff, as a
supervisor would restart a crashing process; a failure after it started is
a bug and ends the simulation.
"""

from __future__ import annotations

import contextlib
import weakref
from typing import TYPE_CHECKING, Any

import attrs
import trio

from trio_cluster import (
    PersistenceError,
    RunnerAddress,
    RunnerUnavailableError,
    TrioWallClock,
    open_runner,
)
from trio_cluster._core._retry import Backoff
from trio_cluster.transport import MemoryTransport

from ._invariants import Incarnation
from ._io import HoldingTransport, RunnerFaults

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Mapping, Sequence

    import cattrs

    from trio_cluster import (
        Broadcast,
        Cron,
        Entity,
        Runner,
        ShardId,
        ShardingConfig,
        Singleton,
    )
    from trio_cluster.abc import Storage
    from trio_cluster.storage import MemoryStorage
    from trio_cluster.transport import MemoryNetwork

    from ._trace import SimulationTrace

__all__ = ["SIMULATION_EPOCH", "SimulatedRunner", "serve_simulated_runner"]

SIMULATION_EPOCH = 1_767_225_600.0
"""Wall time (2026-01-01T00:00:00Z) of virtual time 0 in every simulation."""

PORT = 7000
"""Every simulated runner listens on ``r<i>:7000``."""

_START_BACKOFF = Backoff(0.1, 2.0)
"""How long a run that failed to start waits before it tries again."""


class SimulatedRunner:
    """One runner of a simulated cluster (see the module docstring)."""

    def __init__(
        self,
        index: int,
        *,
        base_config: ShardingConfig,
        entities: Sequence[type[Entity]],
        singletons: Sequence[Singleton],
        crons: Sequence[Cron],
        broadcasts: Sequence[Broadcast],
        converter: cattrs.Converter | None,
        storage: Storage,
        network: MemoryNetwork,
        trace: SimulationTrace | None,
        runner_tasks: Sequence[
            Callable[[SimulatedRunner, Runner], Awaitable[object]]
        ] = (),
    ) -> None:
        self.index = index
        self.runner_tasks = tuple(runner_tasks)
        """Started on its process each time it is up, with it and its runner."""
        self.name = f"r{index}"
        self.address = RunnerAddress(self.name, PORT)
        self.config = attrs.evolve(base_config, runner_address=self.address)
        self.faults = RunnerFaults(self.name)
        self.transport = HoldingTransport(MemoryTransport(network), self.faults, trace)
        self.skew = 0.0
        self.clock: TrioWallClock | None = None
        """The wall clock of the current run."""
        self.runner: Runner | None = None
        """The running `Runner`, None while down or starting."""
        self.incarnation: Incarnation | None = None
        """The current run (None before the first)."""
        self.runs = 0
        self._open_args: dict[str, Any] = {
            "entities": entities,
            "singletons": singletons,
            "crons": crons,
            "broadcasts": broadcasts,
            "converter": converter,
            "storage": storage,
        }
        self._up = trio.Event()
        self._stopped = trio.Event()
        self._stopped.set()
        self.stopping = False
        """Whether the current run was told to stop gracefully (`stop`)."""
        self._process = trio.CancelScope()
        self._tasks: trio.Nursery | None = None
        self._ended: weakref.WeakSet[Runner] = weakref.WeakSet()
        """The runners of its past runs."""

    def __repr__(self) -> str:
        state = "up" if self.up else "down"
        return f"<SimulatedRunner {self.incarnation or self.name} {state}>"

    @property
    def up(self) -> bool:
        """Whether the current run is up: started, and neither killed nor
        stopping (a run is down from the instant `kill` or `stop` begins, not
        once its tasks are gone)."""
        return (
            self.runner is not None
            and self.incarnation is not None
            and not self.incarnation.dead
            and not self.stopping
        )

    @property
    def down(self) -> bool:
        """Whether there is no run: none yet, the current one killed, or its
        tasks gone after a graceful stop."""
        return (
            self.incarnation is None or self.incarnation.dead or self._stopped.is_set()
        )

    def run_of(self, runner: Runner) -> Incarnation | None:
        """The run of this runner that ``runner`` is, if it is one."""
        if self.runner is runner:
            return self.incarnation
        starting = (
            self.runner is None
            and self.incarnation is not None
            and not self.incarnation.dead
            and not self._stopped.is_set()
        )
        if starting and runner.address == self.address and runner not in self._ended:
            # NOTE: `open_runner` has not returned it yet, but it already
            # serves the shards of its first poll and runs their handlers
            # (its listener heard them): it is the run that is starting.
            return self.incarnation
        return None

    def new_incarnation(self) -> Incarnation:
        self.runs += 1
        label = self.name if self.runs == 1 else f"{self.name}#{self.runs}"
        self.incarnation = Incarnation(label)
        self.stopping = False
        self._up = trio.Event()
        self._stopped = trio.Event()
        self._process = trio.CancelScope()
        return self.incarnation

    async def wait_up(self) -> None:
        """Wait until the current run is up and serving."""
        await self._up.wait()

    async def wait_stopped(self) -> None:
        """Wait until the current run's tasks are gone."""
        await self._stopped.wait()

    def start_soon(
        self, async_fn: Callable[..., Awaitable[object]], *args: Any
    ) -> None:
        """Run a task in this runner's process (it dies with the runner).

        Raises:
            RuntimeError: the runner is down.
        """
        if self._tasks is None or not self.up:
            raise RuntimeError(f"runner {self.name} is down")
        self._tasks.start_soon(async_fn, *args)

    def set_skew(self, seconds: float) -> None:
        self.skew = seconds
        if self.clock is not None:
            self.clock.skew = seconds

    def served(self) -> Mapping[ShardId, int]:
        """The shards the current run serves, with their epochs: the
        runner's own view once it is up (`Runner.served_shards`), what its
        listener heard before that (while it starts)."""
        if self.runner is not None:
            return self.runner.served_shards()
        return {} if self.incarnation is None else dict(self.incarnation.serving)

    def stop(self) -> None:
        """Stop gracefully (cancel the process; `open_runner` shuts down)."""
        self.stopping = True
        self._process.cancel()

    async def kill(self, storage: MemoryStorage, network: MemoryNetwork) -> None:
        """Kill the current run as with SIGKILL (see the module docstring)."""
        incarnation = self.incarnation
        assert incarnation is not None
        incarnation.dead = True
        while self.faults.frozen:
            self.faults.thaw(drop=True)
        with contextlib.suppress(KeyError):  # no session yet: still starting
            storage.kill_session(str(self.address))
        if self.address in network.addresses():
            network.kill(self.address)
        if self.runner is not None:
            self.runner.abort()
        # NOTE: a run still starting has no `Runner` to abort yet: its system
        # scope is not shielded yet, so cancelling the process cuts it at
        # once; if `open_runner` returns it meanwhile, `_run` aborts it.
        self._process.cancel()
        await self._stopped.wait()


async def serve_simulated_runner(
    handle: SimulatedRunner, trace: SimulationTrace
) -> None:
    """Run ``handle``'s current incarnation until it is stopped or killed."""
    incarnation = handle.incarnation
    assert incarnation is not None
    try:
        with handle._process:
            async with trio.open_nursery() as tasks:
                handle._tasks = tasks
                await _run(handle, incarnation, trace)
    finally:
        if handle.runner is not None:
            handle._ended.add(handle.runner)
        handle.runner = None
        handle._tasks = None
        trace.record(
            "runner", "%s %s", incarnation, "killed" if incarnation.dead else "stopped"
        )
        handle._stopped.set()


async def _run(
    handle: SimulatedRunner, incarnation: Incarnation, trace: SimulationTrace
) -> None:
    attempt = 0
    while True:
        clock = handle.clock = TrioWallClock(
            origin=SIMULATION_EPOCH + trio.current_time(), skew=handle.skew
        )
        started = False
        try:
            async with open_runner(
                config=handle.config,
                transport=handle.transport,
                clock=clock,
                listeners=[incarnation],
                **handle._open_args,
            ) as runner:
                started = True
                handle.runner = runner
                if incarnation.dead:
                    # Killed between starting and getting here: the kill
                    # found no runner to abort.
                    runner.abort()
                trace.record(
                    "runner", "%s up (machine id %s)", incarnation, runner.machine_id
                )
                handle._up.set()
                for task in handle.runner_tasks if handle.up else ():
                    handle.start_soon(task, handle, runner)
                await trio.sleep_forever()
        except (PersistenceError, trio.TooSlowError, RunnerUnavailableError) as exc:
            if started:
                raise  # failing after it started is a bug in the runtime
            trace.record(
                "runner", "%s could not start (%r); retrying", incarnation, exc
            )
        await trio.sleep(_START_BACKOFF.delay(attempt))
        attempt += 1
