"""`SimulatedCluster`: the handle on a simulated cluster, and its faults (test support).

Made by `open_simulated_cluster` (``._run``). It reaches every runner
(`SimulatedRunner`), and injects faults at the edges a real process has: its
storage session (`StorageFaults`), its network endpoint (`MemoryNetwork`,
`HoldingTransport`) and its existence (kill, restart). Each fault primitive
acts at once and is recorded in the trace; `run_schedule` plays a
`FaultSchedule` over virtual time. It also waits for the cluster to settle and
checks liveness (`wait_stable`, `wait_quiescent`). `open_runners` starts and
stops its runners (for `open_simulated_cluster`).
"""

from __future__ import annotations

from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any, TypeVar

import attrs
import trio

from trio_cluster import ConfigError
from trio_cluster._groups import unwrap_single
from trio_cluster.storage import MemoryStorage
from trio_cluster.transport import MemoryNetwork, RandomFaults

from ._faults import FaultSchedule, run_schedule
from ._invariants import Checker
from ._io import StorageFaults
from ._probe import ProbeJournal
from ._runner import SimulatedRunner, serve_simulated_runner
from ._storage import ObservedStorage
from ._trace import InvariantViolation, SimulationTrace

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Awaitable, Callable, Mapping

    from trio_cluster import Entity, EntityAddress, EntityClient, Runner, ShardId

    from ._invariants import Incarnation
    from ._io import RunnerFaults

__all__ = ["NOTICE_WITHIN", "SimulatedCluster", "open_runners"]

E = TypeVar("E", bound="Entity")

_STEP = 0.05
"""Virtual seconds between checks while waiting for the cluster to settle."""
NOTICE_WITHIN = 0.001
"""Virtual seconds a runner has to stop serving after storage ended its lock
session (it must react at once: no time passes in between)."""


@attrs.define(eq=False, kw_only=True)
class SimulatedCluster:
    """A cluster of simulated runners; made by `open_simulated_cluster`.

    Runners are numbered ``0 .. runners-1`` (named ``r0``, ``r1``, ...); a
    restarted runner keeps its number and address (its new run is ``r1#2``).
    """

    seed: int
    runners: list[SimulatedRunner]
    storage: MemoryStorage
    """The shared memory storage (its ``fault_hook`` belongs to the simulator)."""
    network: MemoryNetwork
    """The shared memory network (its ``fault`` belongs to the simulator)."""
    trace: SimulationTrace
    checker: Checker
    _observed: ObservedStorage
    _storage_faults: StorageFaults
    settle_time: float
    """Virtual seconds the cluster gets to settle after healing."""
    _shard_count: int
    violation: InvariantViolation | None = attrs.field(init=False, default=None)
    probes: ProbeJournal = attrs.field(init=False)
    """Executions of `Probe` entities."""
    _cuts: dict[frozenset[int], int] = attrs.field(init=False, factory=dict)
    _frame_faults: list[RandomFaults] = attrs.field(init=False, factory=list)
    _scope: trio.CancelScope = attrs.field(init=False, factory=trio.CancelScope)
    _nursery: trio.Nursery | None = attrs.field(init=False, default=None)

    def __attrs_post_init__(self) -> None:
        self.probes = ProbeJournal(
            trace=self.trace,
            fail=self.fail,
            incarnation_of=self.incarnation_of,
            current_runs=self.checker.incarnations.values,
        )
        self.checker.stored_hooks.append(self.probes.stored)
        self.checker.answered_hooks.append(self.probes.answered)

    # ------------------------------------------------------------------
    # Access

    def runner(self, index: int) -> SimulatedRunner:
        """The simulated runner ``index``.

        Raises:
            ConfigError: there is no runner ``index``.
        """
        if not 0 <= index < len(self.runners):
            raise ConfigError(
                f"no runner {index}: this cluster has runners 0..{len(self.runners) - 1}"
            )
        return self.runners[index]

    def up(self) -> list[SimulatedRunner]:
        """Runners that are up (started, not killed), frozen ones included."""
        return [handle for handle in self.runners if handle.up]

    def client(self, cls: type[E], *, via: int | None = None) -> EntityClient[E]:
        """A client for ``cls`` on runner ``via`` (default: the first one up).

        Raises:
            RuntimeError: that runner (or every runner) is down.
        """
        handles = self.up() if via is None else [self.runner(via)]
        for handle in handles:
            if handle.runner is not None:
                return handle.runner.client(cls)
        raise RuntimeError(
            f"runner {via} is down" if via is not None else "no runner is up"
        )

    def owner_of(self, address: EntityAddress) -> int | None:
        """The number of the runner serving ``address``'s shard now, if any
        (``cluster.owner_of(client("alice").address)``)."""
        for handle in self.up():
            if address.shard in handle.served():
                return handle.index
        return None

    def start_soon_on(
        self, index: int, async_fn: Callable[..., Awaitable[object]], *args: Any
    ) -> None:
        """Run ``async_fn(*args)`` as a task of runner ``index``'s process: it
        dies with the runner (kill) and is cancelled when the runner stops.

        Raises:
            RuntimeError: the runner is down.
        """
        self.runner(index).start_soon(async_fn, *args)

    def incarnation_of(self, runner: Runner) -> Incarnation | None:
        """The run of a `Runner` of this cluster (None if not one of ours)."""
        for handle in self.runners:
            incarnation = handle.run_of(runner)
            if incarnation is not None:
                return incarnation
        return None

    def label_of(self, runner: Runner) -> str:
        """The name (``r1``, ``r1#2``) of a `Runner` of this cluster."""
        incarnation = self.incarnation_of(runner)
        return "?" if incarnation is None else incarnation.label

    # ------------------------------------------------------------------
    # Faults (each acts at once and is recorded in the trace)

    def _fault(self, fmt: str, *args: object) -> None:
        self.trace.record("fault", fmt, *args)

    async def kill(self, index: int) -> None:
        """Kill runner ``index`` as with SIGKILL: its storage session and
        network endpoint die now (its locks are free at once, peers see the
        connections drop), its tasks are cancelled without a graceful stop,
        and it is dead for the invariants from this instant. Returns when
        its tasks are gone. No-op if it is already down."""
        handle = self.runner(index)
        if handle.down:
            self._fault("kill %s: already down", handle.name)
            return
        self._fault("kill %s", handle.incarnation)
        await handle.kill(self.storage, self.network)
        self._storage_faults.update()

    def stop_soon(self, index: int) -> None:
        """Stop runner ``index`` gracefully, as a rolling deploy does:
        `open_runner` shuts down (its shards drain and are released, its
        streams end, it leaves the membership); does not wait for it to be
        down (`wait_stopped`). No-op if it is down or stopping already."""
        handle = self.runner(index)
        if handle.down or handle.stopping:
            self._fault("stop %s: already down or stopping", handle.name)
            return
        self._fault("stop %s", handle.incarnation)
        handle.stop()

    async def wait_stopped(self, index: int) -> None:
        """Wait until the graceful stop of runner ``index``'s current run is
        over; returns at once if it is not stopping."""
        handle = self.runner(index)
        if handle.stopping:
            await handle.wait_stopped()
        else:
            await trio.lowlevel.checkpoint()

    def restart_soon(self, index: int) -> None:
        """Start a killed or stopped runner again (a new run at the same
        address); does not wait for it to be up. No-op if it is not down."""
        handle = self.runner(index)
        if not handle.down:
            self._fault("restart %s: not down", handle.name)
            return
        assert self._nursery is not None
        self._start(handle)
        self._fault("restart %s", handle.incarnation)

    async def restart(self, index: int) -> None:
        """`restart_soon`, then wait until the runner is up."""
        self.restart_soon(index)
        await self.runner(index).wait_up()

    def freeze(self, index: int) -> None:
        """Freeze runner ``index``: its storage calls and transport envelopes
        are held (its lease lapses, peers hear nothing) until `thaw`, when
        they go through late. Its tasks keep running on their own deadlines,
        so its shards stop when their leases lapse. Nested freezes thaw with
        the last `thaw`."""
        handle = self.runner(index)
        if handle.down:
            self._fault("freeze %s: down", handle.name)
            return
        handle.faults.freeze()
        self._storage_faults.update()
        self._fault("freeze %s", handle.incarnation)

    def thaw(self, index: int) -> None:
        """Undo one `freeze`; held storage calls and envelopes go through."""
        handle = self.runner(index)
        if not handle.faults.frozen:
            return
        released = handle.faults.thaw()
        self._storage_faults.update()
        self._fault("thaw %s (%d held envelopes let through)", handle.name, released)

    def partition(self, a: int, b: int) -> None:
        """Cut the network between runners ``a`` and ``b`` (both ways) until
        `heal`; their connections drop now."""
        pair = frozenset((a, b))
        if a == b:
            raise ConfigError(f"cannot partition runner {a} from itself")
        self._cuts[pair] = self._cuts.get(pair, 0) + 1
        self.network.partition(self.runner(a).address, self.runner(b).address)
        self._fault("partition r%d | r%d", a, b)

    def heal(self, a: int, b: int) -> None:
        """Undo one `partition` between ``a`` and ``b``."""
        pair = frozenset((a, b))
        count = self._cuts.get(pair, 0)
        if count > 1:
            self._cuts[pair] = count - 1
        elif count == 1:
            del self._cuts[pair]
            self.network.heal(self.runner(a).address, self.runner(b).address)
            self._fault("heal r%d | r%d", a, b)

    def storage_outage(self, index: int | None = None, *, hang: bool = False) -> None:
        """Cut runner ``index`` (None: every runner) off from storage: its
        calls fail at once, or with ``hang`` wait until the outage ends and
        then go through, late (unless their caller gave up meanwhile)."""
        faults, whom = self._storage_faults_of(index)
        faults.start_outage(hang=hang)
        self._storage_faults.update()
        self._fault("storage %s for %s", "hangs" if hang else "fails", whom)

    def end_storage_outage(
        self, index: int | None = None, *, hang: bool = False
    ) -> None:
        """Undo one `storage_outage` (with the same arguments)."""
        faults, whom = self._storage_faults_of(index)
        faults.end_outage(hang=hang)
        self._storage_faults.update()
        self._fault("storage back for %s", whom)

    def _storage_faults_of(self, index: int | None) -> tuple[RunnerFaults, str]:
        """The fault state a storage outage of ``index`` (None: every
        runner) acts on, and who that is for the trace."""
        if index is None:
            return self._storage_faults.everyone, "every runner"
        return self.runner(index).faults, f"r{index}"

    def lose_session(self, index: int) -> None:
        """End runner ``index``'s lock session now, as if the database lost
        its connection: its locks are free at once; its next storage call
        starts a new session without them."""
        handle = self.runner(index)
        try:
            self.storage.expire_session(str(handle.address))
        except KeyError:
            self._fault("lose the lock session of %s: no session", handle.name)
            return
        self._fault("lose the lock session of %s", handle.name)
        incarnation = handle.incarnation
        if incarnation is not None:
            incarnation.session_lost_at = trio.current_time()
            serving = dict(handle.served())
            assert self._nursery is not None
            self._nursery.start_soon(self._check_noticed, handle, incarnation, serving)

    async def _check_noticed(
        self,
        handle: SimulatedRunner,
        incarnation: Incarnation,
        serving: Mapping[ShardId, int],
    ) -> None:
        """A runner whose lock session storage ended must stop serving its
        shards before any time passes (another runner may hold them now)."""
        await trio.sleep(NOTICE_WITHIN)
        if incarnation.dead:
            return
        served = handle.served()
        still = [
            shard for shard, epoch in serving.items() if served.get(shard) == epoch
        ]
        if still:
            self.fail(
                f"single owner: {incarnation} still serves {still[0]} at epoch"
                f" {serving[still[0]]} {NOTICE_WITHIN}s after storage ended its"
                " lock session"
            )

    def skew_clock(self, index: int, seconds: float) -> None:
        """Set runner ``index``'s wall clock ``seconds`` away from true time
        (it keeps the skew across restarts)."""
        self.runner(index).set_skew(seconds)
        self._fault("skew the clock of r%d by %+.3fs", index, seconds)

    def frame_faults(
        self,
        *,
        drop: float = 0.0,
        duplicate: float = 0.0,
        delay: float = 0.0,
        max_delay: float = 0.1,
    ) -> RandomFaults:
        """Drop, duplicate and/or delay transport frames between all runners
        with these probabilities (seeded) until `end_frame_faults` is called
        with the returned token (the network's fault hook)."""
        faults = RandomFaults(
            f"{self.seed}/{len(self._frame_faults)}/{self.trace.recorded}",
            drop=drop,
            duplicate=duplicate,
            delay=delay,
            max_delay=max_delay,
        )
        self._frame_faults.append(faults)
        self.network.fault = faults
        self._fault(
            "frames: drop %.2f, duplicate %.2f, delay %.2f (max %.3fs)",
            drop,
            duplicate,
            delay,
            max_delay,
        )
        return faults

    def end_frame_faults(self, token: RandomFaults) -> None:
        """Stop the frame faults `frame_faults` started (others stay)."""
        if token in self._frame_faults:
            self._frame_faults.remove(token)
            fault = self._frame_faults[-1] if self._frame_faults else None
            self.network.fault = fault
            self._fault("frames: %s", "normal" if fault is None else "previous faults")

    async def heal_all(self) -> None:
        """End every fault: thaw, reconnect storage, heal partitions, stop
        frame faults, restart dead runners and wait until they are up.
        Clock skews stay (they are not failures)."""
        self._fault("heal everything")
        for handle in self.runners:
            handle.faults.clear()
        self._storage_faults.everyone.clear()
        self._storage_faults.update()
        for pair in list(self._cuts):
            a, b = sorted(pair)
            self._cuts[pair] = 1
            self.heal(a, b)
        self._frame_faults.clear()
        self.network.fault = None
        for handle in self.runners:
            await self.wait_stopped(handle.index)
            if handle.down:
                self.restart_soon(handle.index)
        for handle in self.runners:
            await handle.wait_up()

    async def run_schedule(self, schedule: FaultSchedule) -> None:
        """Apply ``schedule``, its times counted from now; return when its
        last fault ended (every fault of a schedule undoes itself)."""
        await run_schedule(self, schedule)

    # ------------------------------------------------------------------
    # Waiting and checking

    async def wait_stable(self) -> None:
        """Wait until every runner that is up agrees on the membership and
        every shard is served by the runner the assignment names.

        Raises:
            InvariantViolation: not within `settle_time` virtual seconds.
        """
        with trio.move_on_after(self.settle_time):
            # Polling costs nothing on virtual time; the state is spread
            # over every runner.
            while not self._stable():  # noqa: ASYNC110
                await trio.sleep(_STEP)
            return
        raise self._violation(
            f"liveness: the cluster did not settle within {self.settle_time}s"
            f" ({self._serving_summary()})"
        )

    def _stable(self) -> bool:
        up = [h for h in self.runners if h.up and not h.faults.frozen]
        if len(up) != len(self.up()):
            return False
        addresses = {h.address for h in up}
        served: set[ShardId] = set()
        for handle in up:
            runner = handle.runner
            assert runner is not None
            if {info.address for info in runner.live_runners()} != addresses:
                return False
            assignment = runner.assignment()
            for shard in runner.served_shards():
                if shard in served or assignment.get(shard) != handle.address:
                    return False
                served.add(shard)
        return len(served) == self._shard_count

    def _serving_summary(self) -> str:
        parts = []
        for handle in self.runners:
            if not handle.up:
                parts.append(f"{handle.name}: down")
            else:
                parts.append(f"{handle.name}: {len(handle.served())} shards")
        return ", ".join(parts)

    async def wait_quiescent(self) -> None:
        """After the faults stopped: wait until every persisted request that
        storage accepted has its final reply ("no persisted message lost").

        Raises:
            InvariantViolation: some are still unanswered after `settle_time`
                virtual seconds.
        """
        with trio.move_on_after(self.settle_time):
            while self.checker.unanswered():  # noqa: ASYNC110
                await trio.sleep(_STEP)
            return
        missing = self.checker.unanswered()
        shown = ", ".join(self.checker.describe_request(r) for r in missing[:5])
        raise self._violation(
            f"no persisted message lost: {len(missing)} accepted request(s) still"
            f" have no reply {self.settle_time}s after the faults stopped: {shown}"
        )

    def fail(self, message: str) -> None:
        """Record a violation of an invariant (the first one wins) and stop
        the simulation: `open_simulated_cluster` raises it."""
        if self.violation is None:
            self.violation = self._violation(message)
            self._scope.cancel()

    def _violation(self, message: str) -> InvariantViolation:
        self.trace.record("check", "VIOLATION: %s", message)
        return InvariantViolation(
            message, seed=self.seed, trace=self.trace, time=trio.current_time()
        )

    # ------------------------------------------------------------------
    # Lifecycle

    def _start(self, handle: SimulatedRunner) -> None:
        assert self._nursery is not None
        incarnation = handle.new_incarnation()
        self.checker.incarnations[str(handle.address)] = incarnation
        self._observed.next_incarnation[str(handle.address)] = incarnation
        self._storage_faults.sessions[str(handle.address)] = handle.faults
        self._nursery.start_soon(serve_simulated_runner, handle, self.trace)

    async def _close(self) -> None:
        """Stop every runner gracefully (as at the end of a test)."""
        for handle in self.runners:
            handle.faults.clear()
        self._storage_faults.update()
        for handle in self.runners:
            handle.stop()
        for handle in self.runners:
            await handle.wait_stopped()


@asynccontextmanager
async def open_runners(cluster: SimulatedCluster) -> AsyncIterator[None]:
    """Start every runner of ``cluster``, wait until the shards are spread,
    run the block, then stop every runner gracefully.

    `SimulatedCluster.fail` cancels the block (and the runners); the
    violation is the caller's to raise.
    """
    with cluster._scope:
        async with unwrap_single(), trio.open_nursery() as nursery:
            cluster._nursery = nursery
            for handle in cluster.runners:
                cluster._start(handle)
                await handle.wait_up()
            await cluster.wait_stable()
            try:
                yield
            finally:
                with trio.CancelScope(shield=not cluster._scope.cancel_called):
                    await cluster._close()
            nursery.cancel_scope.cancel()
