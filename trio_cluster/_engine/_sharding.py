"""Sharding: membership, assignment, shard locks and leases (Trio driver).

Drives the sans-IO `Ownership` state machine with two loops:

* the **assignment loop** reads the live runners when something may have
  changed, computes the deterministic assignment, stops shards that moved
  away, and tries to lock wanted shards (retrying every
  ``membership_poll_interval`` while another runner still holds them);
* the **lease loop** refreshes the locks every ``lease_refresh_interval``,
  which is also the session heartbeat; each success pushes the lease
  deadlines of served and *draining* shards forward.

Nothing is polled while nothing changes. The assignment loop reads the live
runners when storage announces that one registered or unregistered
(`RunnersChanged`), when the lock session was lost, and while something is
pending (`PollSchedule`: a peer's connection dropped, wanted shards locked
elsewhere). Each lease refresh also lists them
(`RunnerStorage.refresh_and_list`, one statement on PostgreSQL) and acts on
a changed listing at once: that is how a runner whose session ended with no
connection to this one (and no announcement) is noticed, within one refresh
interval.

A dropped connection to a peer is the first sign that it died: it triggers a
read at once, and quick ones after it while the peer is still live (its
storage session ends a few milliseconds later). The locks stay the
authority: a shard is served only once its lock is acquired, at a new epoch.
A peer that is alive but unreachable (frozen, partitioned) stays live in
storage, and its shards move when its session ends (the lease).

A shard that moved away is drained: it keeps its lease (and lock) while its
handlers finish, within ``entity_termination_timeout``, and its lock is
released only once none of them runs any more, so its next owner never
activates an entity the previous one is still running. If the lock is lost
or the lease runs out while it drains, the stop is escalated to a forced one.

Each served shard gets a `ShardHost` and a task whose nursery's cancel scope
has the lease deadline, so if refreshes stop succeeding (frozen process, lost
database) Trio itself cancels the shard's handlers before the lock can be
taken by anyone else. Every storage operation runs under a deadline.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, assert_never

import trio

from .._core._ownership import (
    ExtendLeases,
    Ownership,
    Phase,
    ReleaseShards,
    StartShard,
    StopShard,
)
from .._core._retry import Backoff
from .._core._ring import Member, assign_shards
from .._errors import PersistenceError
from .._stalls import fail_after_unstalled
from .._storage_abc import RunnerInfo, RunnerStorage
from ._polls import PollSchedule
from ._slots import ShardHost, ShardState

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Iterable, Sequence

    from .._core._addresses import RunnerAddress, ShardId
    from .._core._config import ShardingConfig
    from .._core._ownership import Command
    from .._core._snowflake import SnowflakeGenerator
    from ._listeners import Listeners
    from ._manager import EntityManager
    from ._shard_table import ShardTable

__all__ = ["Sharding"]

_SHOWN = 16
"""Shards named in one log line (the rest are counted)."""

_EXTENDED_PER_STEP = 32
"""Leases moved in one task step (`Sharding._extend_leases`)."""

log = logging.getLogger("trio_cluster.sharding")


class Sharding:
    """Which shards this runner serves, and the hosts that serve them."""

    def __init__(
        self,
        *,
        config: ShardingConfig,
        table: ShardTable,
        runners: RunnerStorage,
        manager: EntityManager,
        listeners: Listeners,
        ids: SnowflakeGenerator,
        on_shard_started: Sequence[Callable[[ShardHost], None]] = (),
        on_shard_stopped: Sequence[Callable[[ShardHost], Awaitable[None]]] = (),
    ) -> None:
        """
        Args:
            config: the runner's policies (address, groups, lease timing).
            table: the state it maintains for the other parts to read.
            runners: the storage session's runner registry and shard locks.
            manager: runs the served shards' entities (and stops them).
            listeners: told of shard lifecycle events.
            ids: the runner's id generator; registration sets its machine id.
            on_shard_started: the engine's own hooks, called with each host
                that starts serving (persisted delivery, singletons).
            on_shard_stopped: awaited with each host that stopped gracefully,
                its lease still held, before its lock is released (bounded
                by the lock operation timeout; persisted delivery gives back
                the requests it claimed and did not run).
        """
        self._config = config
        self._runners = runners
        self._manager = manager
        self._listeners = listeners
        self._ids = ids
        self._on_shard_started = tuple(on_shard_started)
        self._on_shard_stopped = tuple(on_shard_stopped)
        self.table = table
        self.address: RunnerAddress = config.runner_address
        self.ownership = Ownership(
            lease_duration=config.lease_duration,
            refresh_interval=config.lease_refresh_interval,
        )
        self._members: frozenset[Member] = frozenset()
        self._mine: list[ShardId] = []
        self._nursery: trio.Nursery | None = None
        self._shard_tasks: dict[ShardId, trio.Event] = {}
        self._draining: dict[ShardId, ShardHost] = {}
        """Hosts stopping gracefully: their leases are still extended, and a
        forced stop escalates them."""
        self._alive: set[ShardHost] = set()
        """Every host whose task has not ended: serving, stopping, or
        stopped while starting (what `abort` must cut)."""
        self._cleanups: set[trio.CancelScope] = set()
        """Shielded stop scopes in progress (`abort` cancels them too)."""
        self._closing = False
        self._polls = PollSchedule(config, table, lambda: bool(self.ownership.wanted()))
        self._polling = trio.Lock()
        """Held by `_poll_assignment`."""
        self._release_backoff = Backoff(0.05, config.lease_refresh_interval)
        self._to_release: set[ShardId] = set()
        """Stopped shards whose locks `_release_loop` releases next."""
        self._release_wanted = trio.Event()
        self.failovers = 0
        self._reports: dict[str, list[ShardId]] = {}
        """Shards per event, logged together by `_report`."""
        self._sessions_lost = 0
        """Lock sessions lost so far (an acquisition that overlapped a loss
        got locks that are gone already)."""
        self.heartbeat_at: float | None = None
        """When the last successful registration or lease refresh started
        (Trio time); None before registering, after the lock session was
        lost (until the next refresh succeeds) and after unregistering."""

    # ------------------------------------------------------------------
    # Queries

    def session_up(self) -> bool:
        """Whether the storage session is up: registered, and its last
        heartbeat (a registration or lease refresh) started less than a lease
        duration ago, with no loss of the lock session since."""
        return (
            self.heartbeat_at is not None
            and not self._closing
            and trio.current_time() - self.heartbeat_at < self._config.lease_duration
        )

    def serves_all_assigned(self) -> bool:
        """Whether every shard assigned to this runner is served here."""
        return not self.ownership.wanted() and len(self.table.hosts) >= len(
            self.ownership.assigned
        )

    # ------------------------------------------------------------------
    # Lifecycle

    async def run(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Register, then run the assignment and lease loops until cancelled.

        `started` is called once the runner is registered and a first
        assignment was computed and acted on. Before that, a storage failure
        raises `PersistenceError` out of this call.
        """
        info = RunnerInfo(
            address=self.address,
            groups=self._config.shard_groups,
            weight=self._config.runner_weight,
        )
        started_at = trio.current_time()
        with fail_after_unstalled(self._operation_timeout):
            self.table.machine_id = await self._runners.register(info)
        self.heartbeat_at = started_at
        self._ids.machine_id = self.table.machine_id
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            nursery.start_soon(self._release_loop)
            # Watching from before the first acquisition: a loss during it
            # must be heard (see `_poll_assignment`).
            nursery.start_soon(self._watch_session)
            nursery.start_soon(self._watch_registry)
            await trio.lowlevel.checkpoint()
            await self._poll_assignment()
            nursery.start_soon(self._lease_loop)
            nursery.start_soon(self._assignment_loop)
            task_status.started()

    async def _leave(self) -> None:
        """Register again with no shard group (the same registration: the
        machine id stays), so that the other runners' assignment no longer
        counts this one and they want its shards while they drain.

        Only while the live registration of this address is still this
        runner's (its machine id): a newer runner registered at the same
        address (this one frozen meanwhile) keeps it. Failing (storage
        down, too slow) is logged: the others then take the shards once
        this runner unregisters. Cancellation propagates (`shutdown` runs
        shielded)."""
        if not self._config.shard_groups:
            await trio.lowlevel.checkpoint()
            return  # serves no shard: nothing to hand over
        leaving = RunnerInfo(
            address=self.address, groups=(), weight=self._config.runner_weight
        )
        try:
            # While shards still drain: a stall must not abandon a statement
            # (that would end the lock session, see `_operation_timeout`).
            with fail_after_unstalled(self._operation_timeout):
                live = await self._runners.live_runners()
            mine = [runner for runner in live if runner.address == self.address]
            if len(mine) != 1 or mine[0].machine_id != self.table.machine_id:
                return  # displaced by a newer registration: not ours to change
            with fail_after_unstalled(self._operation_timeout):
                await self._runners.register(leaving)
        except (PersistenceError, trio.TooSlowError) as exc:
            log.warning("could not tell the others this runner is leaving: %r", exc)

    @property
    def _operation_timeout(self) -> float:
        # NOTE: storage calls of the lease and membership loops run under
        # `fail_after_unstalled`: a stall of the event loop (a long GC, a burst
        # of activations) must not abandon a refresh the server answered (on
        # PostgreSQL that ends the lock session: every shard lost). The lease
        # itself is measured on the clock (`Ownership`).
        return self._config.lease_refresh_interval

    async def _assignment_loop(self) -> None:
        while True:
            await self._polls.next_poll()
            if self._closing:
                return
            try:
                await self._poll_assignment()
            except (PersistenceError, trio.TooSlowError) as exc:
                log.warning("assignment poll failed: %r", exc)

    async def _poll_assignment(self, live: list[RunnerInfo] | None = None) -> None:
        """Read the live runners (unless ``live`` was just listed), act on
        a changed assignment, and try to lock the wanted shards. One at a
        time (the assignment loop and the lease loop both call it)."""
        # NOTE: no schedule point when nobody else polls: the listing is
        # acted on in the same step as it arrived.
        if self._polling.locked():
            await self._polling.acquire()
        else:
            self._polling.acquire_nowait()
        try:
            await self._assign(live)
        finally:
            self._polling.release()

    async def _assign(self, live: list[RunnerInfo] | None) -> None:
        if live is None:
            with fail_after_unstalled(self._operation_timeout):
                live = await self._runners.live_runners()
        # NOTE: most polls see the same runners: then nothing below can
        # change (profiled in the simulator: 10 runners polling 4 times a
        # second spent half their idle time rebuilding the same members).
        changed = live != self.table.live or not self._members
        self.table.live = live
        if changed:
            by_address = _members(live)
            by_address[self.address] = Member(
                self.address, self._config.shard_groups, self._config.runner_weight
            )
            members = frozenset(by_address.values())
            if members != self._members:
                # Only a change of membership changes the assignment.
                self._members = members
                self.table.assign(
                    assign_shards(
                        members, shards_per_group=self._config.shards_per_group
                    )
                )
                self._mine = [
                    shard
                    for shard, owner in self.table.assignment.items()
                    if owner == self.address
                ]
                self.table.signal_changed()
        if self._closing:
            return
        if changed:
            await self._execute(self.ownership.assignment_changed(self._mine))

        wanted = self.ownership.wanted()
        if wanted:
            started_at = trio.current_time()
            lost_before = self._sessions_lost
            with fail_after_unstalled(self._operation_timeout):
                epochs = await self._runners.acquire(_in_order(wanted))
            if self._sessions_lost != lost_before:
                # A lock session was lost while the answer was on its way:
                # those locks may have gone with it (another runner may hold
                # them now). Never serve them: release them (if they are
                # still held), and they are wanted again at the next poll.
                log.warning(
                    "lock session lost during an acquisition; releasing its %d"
                    " shard(s) unserved",
                    len(epochs),
                )
                await self._execute(self.ownership.untrusted(epochs))
                return
            await self._execute(self.ownership.acquired(epochs, started_at=started_at))

    async def _lease_loop(self) -> None:
        interval = self._config.lease_refresh_interval
        next_at = trio.current_time()
        while True:
            next_at += interval
            await trio.sleep_until(next_at)
            started_at = trio.current_time()
            asked = self.ownership.held_epochs()
            try:
                with fail_after_unstalled(self._operation_timeout):
                    held, live = await self._runners.refresh_and_list(_in_order(asked))
            except (PersistenceError, trio.TooSlowError) as exc:
                log.warning("lease refresh failed (leases not extended): %r", exc)
                continue
            self.heartbeat_at = started_at
            await self._execute(
                self.ownership.refreshed(held, started_at=started_at, asked=asked)
            )
            if live != self.table.live and not self._closing:
                # A runner joined, left or died: act on it now.
                try:
                    await self._poll_assignment(live)
                except (PersistenceError, trio.TooSlowError) as exc:
                    log.warning(
                        "acting on a change of the live runners failed: %r", exc
                    )
            # Never fall behind by more than one interval after a slow refresh.
            next_at = max(next_at, trio.current_time() - interval)

    async def _watch_session(self) -> None:
        """Stop serving every shard the moment storage says the lock session
        is gone (another runner may take the locks right away)."""
        while True:
            try:
                await self._runners.wait_session_lost()
            except PersistenceError as exc:
                log.warning("cannot watch the lock session: %r", exc)
                await trio.sleep(self._config.lease_refresh_interval)
                continue
            self._sessions_lost += 1
            self.heartbeat_at = None
            log.warning("the lock session was lost; stopping every shard now")
            # Also while the runner shuts down: its shards still draining
            # must stop now, not at the end of their drain (the simulator
            # found another runner running a handler its drain still ran).
            await self._execute(
                self.ownership.refreshed((), started_at=trio.current_time())
            )
            if self._closing:
                return
            self.poll_soon()

    async def _watch_registry(self) -> None:
        """Read the live runners at once when storage announces that one
        registered or unregistered (`RunnersChanged`)."""
        while True:
            await self.table.wait_runners_changed()
            self.poll_soon()

    def poll_soon(self) -> None:
        """Ask for an assignment poll now (a runner joined or left)."""
        self._polls.soon()

    def peer_lost(self, peer: RunnerAddress) -> None:
        """The connection to ``peer`` dropped: poll now, and again soon while
        it is still live in storage or shards are still locked elsewhere
        (see `PollSchedule`)."""
        self._polls.peer_lost(peer)

    # ------------------------------------------------------------------
    # Commands

    async def _execute(self, commands: list[Command]) -> None:
        starts = [command for command in commands if isinstance(command, StartShard)]
        if starts:
            await self._start_shards(starts)
        for command in commands:
            match command:
                case StartShard():
                    pass  # started above
                case ExtendLeases(shards=shards, deadline=deadline):
                    await self._extend_leases(shards, deadline)
                case StopShard():
                    self._stop_shard(command)
                case ReleaseShards(shards=shards):
                    self._to_release |= shards
                    self._release_wanted.set()
                case _:  # pragma: no cover - the core's command union is closed
                    assert_never(command)

    async def _extend_leases(self, shards: Iterable[ShardId], deadline: float) -> None:
        """Move the lease deadline of these shards' hosts (served or
        draining) to ``deadline``; the other tasks run between every
        `_EXTENDED_PER_STEP` of them. Moving a deadline is a few
        microseconds of Trio's deadline bookkeeping per shard: all of a
        runner's shards in one step held every socket and caller up each
        second (about 2 ms for 300 shards). A host not extended yet keeps
        its earlier deadline meanwhile (the safe side: at worst its lease
        lapses, as it would have without this refresh), and one stopped
        meanwhile is skipped. Cancellation: not a cancellation point (the
        steps are shielded); every host is extended."""
        hosts, draining = self.table.hosts, self._draining
        for done, shard in enumerate(shards, 1):
            host = hosts.get(shard) or draining.get(shard)
            if host is not None:
                host.extend_lease(deadline)
            if not done % _EXTENDED_PER_STEP:
                await trio.lowlevel.cancel_shielded_checkpoint()

    async def _start_shards(self, starts: list[StartShard]) -> None:
        """Serve the shards of ``starts``: one task each, which registers its
        host itself once its nursery is open. Returns once every one of them
        is registered, or stopped at once (see `_announce`). If cancelled
        while waiting, the shard tasks go on starting in the sharding nursery
        (cancelled with it when the runner stops).

        Together, and with no round trip through a starting task: under load
        a scheduling round is tens of milliseconds (one by one, 150 shards
        taken over from a dead runner took 4 s of a busy loop; with a
        `trio.Nursery.start` each, three rounds)."""
        assert self._nursery is not None
        remaining = len(starts)
        all_up = trio.Event()

        def up() -> None:
            nonlocal remaining
            remaining -= 1
            if not remaining:
                all_up.set()

        for command in starts:
            host = ShardHost(
                command.shard,
                command.epoch,
                command.deadline,
                self._listeners,
                background=self._nursery,
            )
            done = trio.Event()
            self._shard_tasks[command.shard] = done
            self._nursery.start_soon(self._serve_shard, command, host, done, up)
        await all_up.wait()

    def _announce(self, command: StartShard, host: ShardHost) -> None:
        """``host``'s nursery is open: serve it from now on, unless it was
        stopped meanwhile."""
        assert self._nursery is not None
        if self._closing or not self._still_serving(command):
            # Stopped before its task ran, so its StopShard found no host:
            # shutdown() began (an acquisition woken by a peer leaving), or
            # the lock was lost meanwhile (the lock session ended: another
            # runner may take the shard at once). Stop it here, never serving.
            if self._closing:
                self._draining[command.shard] = host
            self._nursery.start_soon(self._stop_host, host, self._closing)
            return
        self.table.serve(command.shard, host)
        host.announced = True
        self._listeners.shard_acquired(command.shard, command.epoch)
        log.debug(
            "serving shard %s at epoch %d",
            command.shard,
            command.epoch,
            extra={"shard": str(command.shard)},
        )
        self.table.signal_changed()
        for hook in self._on_shard_started:
            hook(host)

    def _still_serving(self, command: StartShard) -> bool:
        """Whether ``command``'s shard is still to be served at its epoch."""
        shard = command.shard
        return (
            self.ownership.phase(shard) is Phase.SERVING
            and self.ownership.epoch(shard) == command.epoch
        )

    async def _serve_shard(
        self,
        command: StartShard,
        host: ShardHost,
        done: trio.Event,
        up: Callable[[], None],
    ) -> None:
        self._alive.add(host)
        try:
            async with trio.open_nursery() as nursery:
                nursery.cancel_scope.deadline = host.lease_deadline
                host.nursery = nursery
                try:
                    self._announce(command, host)
                finally:
                    up()
                try:
                    await trio.sleep_forever()
                finally:
                    # Cancelled: the nursery closes once its tasks end, and
                    # a task started in it after that would fail.
                    host.closing = True
                    if host.state is ShardState.ACTIVE and host.announced:
                        # The lease lapsed (or the runner is cancelled): its
                        # handlers are being cancelled now.
                        self._listeners.shard_stopping(
                            host.shard_id, host.epoch, graceful=False
                        )
        finally:
            with trio.CancelScope(shield=True) as cleanup:
                self._cleanups.add(cleanup)
                lapsed = trio.current_time() >= host.lease_deadline
                if host.state is ShardState.ACTIVE:
                    # Nobody asked us to stop: the lease deadline passed, or
                    # the runner itself is being cancelled.
                    if lapsed:
                        self._report("lease lapsed; stopped serving", host.shard_id)
                        self.failovers += 1
                    self.table.hosts.pop(host.shard_id, None)
                    self.table.signal_changed()
                    self.ownership.lapsed(host.shard_id)
                    await self._manager.stop_shard(host, graceful=False)
                elif (
                    self._draining.get(host.shard_id) is host
                    and lapsed
                    and not host.forced
                ):
                    # The lease ran out while the shard drained (refreshes
                    # failed): nothing of it may run on from here.
                    self.ownership.lapsed(host.shard_id)
                    self._escalate(
                        host, "lease lapsed while draining; cancelled its handlers"
                    )
                # The lock is released only once no handler of the shard runs
                # (handlers in callers' tasks unwind after their scopes are
                # cancelled), so the next owner never runs an entity that
                # still runs here. Bounded: a handler that ignores
                # cancellation does not hold the shard forever.
                with trio.move_on_after(self._config.entity_termination_timeout):
                    await host.wait_idle()
                if host.stop_hooks_done is not None:
                    # A graceful stop's hooks write under the shard's epoch
                    # (requests given back unrun): before the lock goes.
                    with trio.move_on_after(self._operation_timeout):
                        await host.stop_hooks_done.wait()
                if self._draining.get(host.shard_id) is host:
                    del self._draining[host.shard_id]

                self._shard_tasks.pop(host.shard_id, None)
                self._alive.discard(host)
                host.ended()
                done.set()
                await self._execute(self.ownership.stopped(host.shard_id))
            self._cleanups.discard(cleanup)

    def _stop_shard(self, command: StopShard) -> None:
        host = self.table.hosts.pop(command.shard, None)
        if host is None:
            draining = self._draining.get(command.shard)
            if draining is not None and not command.graceful:
                self._escalate(
                    draining, "lost the lock while draining; cancelling its handlers"
                )
            return
        # Not active from now on, before the manager gets to stop it: a job
        # granted meanwhile must not start (found by the simulator).
        was_active = host.active  # not already stopping after a lapse
        host.state = ShardState.STOPPING
        self.table.signal_changed()
        if was_active:
            self._listeners.shard_stopping(
                host.shard_id, host.epoch, graceful=command.graceful
            )
        if not command.graceful:
            self.failovers += 1
            self._report("lost the lock; stopping now", command.shard)
            # Now, not when the stopping task gets to run: another runner
            # may hold the lock already.
            host.force_stop()

        if command.graceful:
            self._draining[host.shard_id] = host
            host.stop_hooks_done = trio.Event()
        assert self._nursery is not None
        self._nursery.start_soon(self._stop_host, host, command.graceful)

    def _escalate(self, host: ShardHost, what: str) -> None:
        """The lock of a draining shard was lost, or its lease ran out
        (``what``, for the log): stop it now, forced."""
        self.failovers += 1
        self._report(what, host.shard_id)
        self._listeners.shard_stopping(host.shard_id, host.epoch, graceful=False)
        host.force_stop()

    def _report(self, what: str, shard: ShardId) -> None:
        """Log that ``what`` happened to ``shard``: one line for all the
        shards it happens to in one scheduling round (a lost lock session or
        leases lapsing together stop every shard at once)."""
        shards = self._reports.get(what)
        if shards is not None:
            shards.append(shard)
            return
        self._reports[what] = [shard]
        try:
            assert self._nursery is not None
            self._nursery.start_soon(self._flush_report, what)
        except RuntimeError:  # the nursery is closed: log it now
            self._log_report(what)

    async def _flush_report(self, what: str) -> None:
        await trio.lowlevel.checkpoint()
        self._log_report(what)

    def _log_report(self, what: str) -> None:
        shards = self._reports.pop(what, [])
        if shards:
            shown = " ".join(str(shard) for shard in shards[:_SHOWN])
            more = f" and {len(shards) - _SHOWN} more" if len(shards) > _SHOWN else ""
            log.warning(
                "%s: %d shard(s): %s%s",
                what,
                len(shards),
                shown,
                more,
                extra={"shard": str(shards[0])},
            )

    async def _stop_host(self, host: ShardHost, graceful: bool) -> None:
        with trio.CancelScope(shield=True) as cleanup:
            self._cleanups.add(cleanup)
            try:
                await self._manager.stop_shard(host, graceful=graceful)
                if graceful and host.leased():
                    with trio.move_on_after(self._operation_timeout):
                        for hook in self._on_shard_stopped:
                            await hook(host)
            finally:
                if host.stop_hooks_done is not None:
                    host.stop_hooks_done.set()
        self._cleanups.discard(cleanup)

    async def _release_loop(self) -> None:
        """Release the locks of stopped shards in batches: shards that stop
        together (every lease lapsing at one deadline, a lost session) take
        one storage call, not one each. A failed release is retried, with
        whatever stopped meanwhile, after a backoff."""
        attempt = 0
        while True:
            await self._release_wanted.wait()
            # Let the shards that stop in this same scheduling round join.
            await trio.lowlevel.checkpoint()
            self._release_wanted = trio.Event()
            shards, self._to_release = frozenset(self._to_release), set()
            try:
                with fail_after_unstalled(self._operation_timeout):
                    await self._runners.release(_in_order(shards))
            except (PersistenceError, trio.TooSlowError) as exc:
                log.warning("releasing shards failed, retrying: %r", exc)
                self._to_release |= shards
                await trio.sleep(self._release_backoff.delay(attempt))
                attempt += 1
                self._release_wanted.set()
                continue
            attempt = 0
            self.ownership.released(shards)
            self.poll_soon()

    def abort(self) -> None:
        """Stop at once, as a killed process does: cancel every handler and
        every shard task, graceful stops included, with no termination
        timeout and no ``on_stop`` hook. Locks are not released (the leases
        lapse, as after a crash). The runner's own scope is cancelled by its
        owner."""
        self._closing = True
        for cleanup in list(self._cleanups):
            cleanup.cancel()
        for host in list(self._alive):
            host.cancel_all()

    async def shutdown(self) -> None:
        """Stop every shard gracefully (bounded by the termination timeout),
        release all locks and unregister. Call shielded.

        While the shards drain, the runner says it is leaving (`_leave`), so
        that the others take each of its shards as soon as that shard has
        drained and its lock is released, not once every shard has: one slow
        handler holds up its own shard only."""
        self._closing = True
        self._polls.soon()
        await self._execute(self.ownership.stop_all())
        await self._leave()
        pending = list(self._shard_tasks.values())
        with trio.move_on_after(self._config.entity_termination_timeout + 1.0):
            for event in pending:
                await event.wait()
        for host in list(self.table.hosts.values()):  # pragma: no cover - defensive
            await self._manager.stop_shard(host, graceful=False)
        self.table.hosts.clear()
        try:
            with trio.fail_after(self._operation_timeout):
                await self._runners.release_all()
            with trio.fail_after(self._operation_timeout):
                await self._runners.unregister()
        except (PersistenceError, trio.TooSlowError) as exc:
            log.warning("could not release locks or unregister cleanly: %r", exc)
        self.heartbeat_at = None
        # Another runner may get the machine id now: no more ids from it.
        self.table.machine_id = None
        self.table.signal_changed()
        if self._nursery is not None:
            self._nursery.cancel_scope.cancel()


def _in_order(shards: Iterable[ShardId]) -> list[ShardId]:
    """Shards in a stable order (cheaper than attrs' generated comparisons)."""
    return sorted(shards, key=_shard_key)


def _shard_key(shard: ShardId) -> tuple[str, int]:
    return (shard.group, shard.number)


def _members(live: Iterable[RunnerInfo]) -> dict[RunnerAddress, Member]:
    """The assignment's members for the live runners, by address.

    A registration the assignment cannot use (a weight that is not positive
    and finite, groups that are not names), read back from storage as
    another program or a hand edit left it, is logged and left out: it must
    not stop this runner's assignment. No runner of ours
    registers one.
    """
    members: dict[RunnerAddress, Member] = {}
    for runner in live:
        try:
            members[runner.address] = Member(
                runner.address, tuple(runner.groups), runner.weight
            )
        except (TypeError, ValueError) as exc:
            log.warning(
                "leaving runner %s out of the assignment: %s", runner.address, exc
            )
    return members
