"""`open_simulated_cluster`: a whole cluster in one process, on virtual time (test support).

N runners run the production runtime (`open_runner`: the same sharding,
entity manager and delivery code) on one shared `MemoryStorage` and one
`MemoryNetwork`, inside one ``trio.run`` on ``MockClock(autojump_threshold=0)``.
Nothing of the logic under test is reimplemented: faults are injected only at
the edges a real process has (its storage session, its network endpoint, its
existence), and invariants are checked by observing storage and the runners'
served shards, which every runner tells through the public `RunnerListener`
seam (`._invariants`).

Determinism: Trio's scheduler is made deterministic and seeded with the
seed, wall clocks start at a fixed origin, and frame faults draw from seeded
streams; so a run is a function of the seed, the entities and what the test
does. The same seed gives the same trace (in one process; across processes
as long as nothing the test itself does depends on ``PYTHONHASHSEED``).

Fault primitives (`SimulatedCluster.kill`, `freeze`, `partition`, ...) act
at once; `run_schedule` applies a `FaultSchedule` over virtual time.
"""

from __future__ import annotations

import logging
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any, TypeVar

import trio
import trio.testing

from trio_cluster import (
    ConfigError,
    NoCurrentRunnerError,
    ShardingConfig,
    current_runner,
)
from trio_cluster.storage import MemoryStorage
from trio_cluster.transport import MemoryNetwork

from ._cluster import SimulatedCluster, open_runners
from ._invariants import Checker
from ._io import StorageFaults
from ._livelock import DEFAULT_LIVELOCK_ROUNDS, LivelockWatch
from ._probe import install_journal
from ._runner import SimulatedRunner
from ._storage import ObservedStorage
from ._trace import (
    DEFAULT_TRACE_LIMIT,
    InvariantViolation,
    SimulationTrace,
    describe,
)

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Awaitable, Callable, Sequence

    import cattrs

    from trio_cluster import Broadcast, Cron, Entity, Runner, Singleton

__all__ = [
    "current_simulation",
    "default_settle_time",
    "open_simulated_cluster",
    "run_simulation",
]

T = TypeVar("T")

_CURRENT: trio.lowlevel.RunVar[SimulatedCluster] = trio.lowlevel.RunVar(
    "trio_cluster.simulation"
)


def current_simulation() -> SimulatedCluster:
    """The simulated cluster open in this ``trio.run`` (for entities under test).

    Raises:
        RuntimeError: no simulated cluster is open.
    """
    try:
        return _CURRENT.get()
    except (LookupError, RuntimeError):
        raise RuntimeError(
            "no simulated cluster is open (use open_simulated_cluster)"
        ) from None


def run_simulation(async_fn: Callable[..., Awaitable[T]], *args: Any) -> T:
    """Run ``async_fn(*args)`` in a new ``trio.run`` on
    ``MockClock(autojump_threshold=0)`` and return its result: the way to run
    one simulated cluster per Hypothesis example."""
    clock = trio.testing.MockClock(autojump_threshold=0)
    return trio.run(async_fn, *args, clock=clock)


@asynccontextmanager
async def open_simulated_cluster(
    entities: Sequence[type[Entity]],
    *,
    runners: int = 3,
    seed: int = 0,
    config: ShardingConfig | None = None,
    singletons: Sequence[Singleton] = (),
    crons: Sequence[Cron] = (),
    broadcasts: Sequence[Broadcast] = (),
    converter: cattrs.Converter | None = None,
    trace_frames: bool = True,
    trace_limit: int = DEFAULT_TRACE_LIMIT,
    settle_time: float | None = None,
    livelock_rounds: int | None = DEFAULT_LIVELOCK_ROUNDS,
    runner_tasks: Sequence[Callable[[SimulatedRunner, Runner], Awaitable[object]]] = (),
) -> AsyncIterator[SimulatedCluster]:
    """Open a cluster of ``runners`` simulated runners hosting ``entities``.

    Must run on ``trio.testing.MockClock(autojump_threshold=0)`` (see
    `run_simulation`, or pytest-trio's ``autojump_clock`` fixture). Every
    runner is `open_runner` with the given ``config`` (its
    ``runner_address`` replaced by ``r<i>:7000``), a shared memory storage
    and memory network, and a wall clock starting at a fixed origin. The
    block starts once every runner is up and the shards are spread.

    Args:
        entities: entity classes every runner hosts.
        runners: how many runners (at least 1).
        seed: makes the run reproducible (scheduler order, frame faults).
        config: base configuration; ``ShardingConfig(shards_per_group=16)``
            by default.
        singletons, crons, broadcasts, converter: as for `open_runner`.
        trace_frames: record every transport envelope in the trace.
        trace_limit: most trace events kept.
        settle_time: virtual seconds the cluster gets to settle (start, heal,
            answer every persisted request); by default
            ``3 * lease_duration + 2 * storage_poll_interval +
            entity_termination_timeout``.
        livelock_rounds: scheduler rounds at one virtual instant after which
            the run fails as a livelock (a task looping without waiting stops
            virtual time, so no deadline of the test would ever fire); None:
            not watched.
        runner_tasks: async functions started on each runner's process,
            ``fn(handle, runner)``, each time it is up (after a restart
            too): servers of the application, such as a gateway
            (`MemoryGateways.serve`). They die with the runner (killed or
            stopped).

    Raises:
        ConfigError: not on an autojump ``MockClock``, or ``runners < 1``.
        InvariantViolation: an invariant broke, or virtual time stood still
            (a livelock: see ``livelock_rounds``); the block is cancelled.

    On exit every runner shuts down gracefully. An exception leaving the block
    gets a note with the seed and the end of the trace. Cancelling the
    enclosing scope cancels the runners too.
    """
    _check_clock()
    if runners < 1:
        raise ConfigError(f"a simulated cluster needs at least 1 runner, got {runners}")
    base = config if config is not None else ShardingConfig(shards_per_group=16)
    trace = SimulationTrace(limit=trace_limit)
    storage = MemoryStorage()
    network = MemoryNetwork()
    cluster: SimulatedCluster
    checker = Checker(
        storage=storage, trace=trace, fail=lambda text: cluster.fail(text)
    )
    observed = ObservedStorage(storage, checker)
    handles = [
        SimulatedRunner(
            index,
            base_config=base,
            entities=entities,
            singletons=singletons,
            crons=crons,
            broadcasts=broadcasts,
            converter=converter,
            storage=observed,
            network=network,
            trace=trace if trace_frames else None,
            runner_tasks=runner_tasks,
        )
        for index in range(runners)
    ]
    cluster = SimulatedCluster(
        seed=seed,
        runners=handles,
        storage=storage,
        network=network,
        trace=trace,
        checker=checker,
        observed=observed,
        storage_faults=StorageFaults(storage),
        settle_time=settle_time
        if settle_time is not None
        else default_settle_time(base),
        shard_count=base.shards_per_group * len(base.shard_groups),
    )
    restore = _deterministic_scheduler(seed)
    token = _CURRENT.set(cluster)
    uninstall_journal = install_journal(cluster.probes)
    log_handler = _TraceHandler(cluster)
    logger = logging.getLogger("trio_cluster")
    logger.addHandler(log_handler)
    watch = None
    if livelock_rounds is not None:
        watch = LivelockWatch(cluster.fail, rounds=livelock_rounds)
        trio.lowlevel.add_instrument(watch)
    try:
        async with open_runners(cluster):
            yield cluster
    except Exception as exc:
        if isinstance(exc, InvariantViolation):
            raise
        if cluster.violation is not None:
            # The violation stopped the cluster: it is the cause of this.
            raise cluster.violation from exc
        exc.add_note(describe(trace, seed))
        raise
    finally:
        if watch is not None:
            watch.stop()
        logger.removeHandler(log_handler)
        uninstall_journal()
        _CURRENT.reset(token)
        restore()
    if cluster.violation is not None:
        raise cluster.violation


def default_settle_time(config: ShardingConfig) -> float:
    """The default `SimulatedCluster.settle_time` for ``config``."""
    return (
        3 * config.lease_duration
        + 2 * config.storage_poll_interval
        + config.entity_termination_timeout
    )


def _check_clock() -> None:
    clock = trio.lowlevel.current_clock()
    if not isinstance(clock, trio.testing.MockClock) or clock.autojump_threshold != 0:
        raise ConfigError(
            "open_simulated_cluster runs on virtual time: use run_simulation(),"
            " trio.run(..., clock=trio.testing.MockClock(autojump_threshold=0)),"
            " or pytest-trio's autojump_clock fixture"
        )


def _deterministic_scheduler(seed: int) -> Callable[[], None]:
    """Make Trio's scheduler deterministic and seeded; returns an undo.

    Trio shuffles each batch of runnable tasks with a module-level `Random`
    (pytest-trio and Hypothesis use the same switch to make runs
    reproducible). Without this, equal deadlines would fire in an order that
    depends on memory addresses.
    """
    import trio._core._run as run_module

    rng = getattr(run_module, "_r", None)
    flag = getattr(run_module, "_ALLOW_DETERMINISTIC_SCHEDULING", None)
    if rng is None or flag is None:  # pragma: no cover - a newer Trio
        return lambda: None
    state = rng.getstate()
    rng.seed(seed)
    run_module._ALLOW_DETERMINISTIC_SCHEDULING = True  # type: ignore[misc]

    def restore() -> None:
        rng.setstate(state)
        run_module._ALLOW_DETERMINISTIC_SCHEDULING = flag  # type: ignore[misc]

    return restore


class _TraceHandler(logging.Handler):
    """Copies the runtime's warnings into the trace."""

    def __init__(self, cluster: SimulatedCluster) -> None:
        super().__init__(logging.WARNING)
        self._cluster = cluster

    def emit(self, record: logging.LogRecord) -> None:
        try:
            who = self._cluster.label_of(current_runner())
        except NoCurrentRunnerError:
            who = "-"
        try:
            message = record.getMessage()
        except Exception:  # pragma: no cover - a bad log call
            message = str(record.msg)
        self._cluster.trace.record("log", "%s: %s", who, message)
