"""A whole cluster's sans-IO core against a simple model (model-based test).

The simulator (``tests/simulation``) runs the real runtime; this test runs only
the sans-IO core, so Hypothesis can try thousands of event orders cheaply:
several runners, each with its own `Ownership` state machine and its own view
of the membership, fed by a *model* of storage (session leases that lapse
lazily, shard locks with fencing epochs, exactly as `MemoryStorage` does) and
by a driver that does what `Sharding` does with the commands. Runners join,
crash, lose their lock session, fail to refresh, poll, stop and release shards
in any order while time advances, or one of them is frozen while the
others carry on.

Checked after every step (`@invariant`):

* at most one runner serves a shard, and it holds the shard's lock at the
  epoch it serves it at (the pessimistic lease keeps it so: a runner whose
  refreshes fail stops before storage frees its locks);
* each runner's `Ownership` agrees with a simple model of the commands it
  emitted (serving, stopping, releasing, wanted);
* the shards a runner is assigned are those of the documented greedy matching
  (`reference_greedy` of ``test_ring.py``) for the membership it last saw.

And the `settle` rule checks liveness: once every runner polls, refreshes and
finishes its stops and releases a few times without faults, every shard is
served by exactly the runner the assignment names.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import attrs
import pytest
from hypothesis import HealthCheck, Phase as Stage, settings, strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from trio_cluster._core._addresses import RunnerAddress, ShardId
from trio_cluster._core._ownership import (
    ExtendLeases,
    Ownership,
    Phase,
    ReleaseShards,
    StartShard,
    StopShard,
)
from trio_cluster._core._ring import Member, assign_shards, shards_of

from .test_ring import reference_greedy

LEASE = 5.0
REFRESH = 1.0
GROUP = "g"
SHARDS = 6
NAMES = ("a", "b", "c", "d")
ALL_SHARDS = frozenset(ShardId(GROUP, n) for n in range(1, SHARDS + 1))


@attrs.define
class Session:
    heartbeat: float
    expired: bool = False


class ModelStorage:
    """Sessions with lazily lapsing leases and shard locks with epochs, as
    the storage contract (and `MemoryStorage`) define them."""

    def __init__(self) -> None:
        self.sessions: dict[str, Session] = {}
        self.holder: dict[ShardId, str | None] = {}
        self.epoch: dict[ShardId, int] = {}

    def _free(self, name: str) -> None:
        for shard, holder in self.holder.items():
            if holder == name:
                self.holder[shard] = None

    def operation(self, name: str, now: float) -> None:
        """Any runner-storage call: lapse old sessions, heartbeat this one."""
        for other, session in self.sessions.items():
            if not session.expired and now - session.heartbeat > LEASE:
                session.expired = True
                self._free(other)
        session = self.sessions[name]
        session.expired = False  # a new generation, without locks
        session.heartbeat = now

    def live(self) -> list[str]:
        return sorted(n for n, s in self.sessions.items() if not s.expired)

    def acquire(self, name: str, shards: frozenset[ShardId]) -> dict[ShardId, int]:
        got: dict[ShardId, int] = {}
        for shard in sorted(shards, key=lambda s: s.number):
            if self.holder.get(shard) is None:
                self.holder[shard] = name
                self.epoch[shard] = self.epoch.get(shard, 0) + 1
            if self.holder[shard] == name:
                got[shard] = self.epoch[shard]
        return got

    def kill(self, name: str) -> None:
        self._free(name)
        del self.sessions[name]

    def lose(self, name: str) -> None:
        self.sessions[name].expired = True
        self._free(name)


class Driver:
    """One runner: its `Ownership` and a simple model of what it was told."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.address = RunnerAddress(name, 1)
        self.own = Ownership(lease_duration=LEASE, refresh_interval=REFRESH)
        self.members: frozenset[str] = frozenset()
        self.serving: dict[ShardId, tuple[int, float]] = {}
        self.stopping: set[ShardId] = set()
        self.draining: dict[ShardId, tuple[int, float]] = {}
        """Stopping gracefully (a subset of ``stopping``): leases extended."""
        self.releasing: set[ShardId] = set()

    def lapse(self, now: float, storage: ModelStorage) -> None:
        """Every served or draining shard whose lease deadline has passed
        lapses."""
        leases = {**self.serving, **self.draining}
        for shard, (_, deadline) in sorted(leases.items()):
            if deadline <= now:
                self.apply(self.own.lapsed(shard), storage)

    def apply(self, commands: Sequence[object], storage: ModelStorage) -> None:
        for command in commands:
            if isinstance(command, StartShard):
                assert command.shard not in self.serving
                assert command.shard not in self.stopping | self.releasing
                assert storage.holder.get(command.shard) == self.name
                assert storage.epoch[command.shard] == command.epoch
                self.serving[command.shard] = (command.epoch, command.deadline)
            elif isinstance(command, ExtendLeases):
                for shard in command.shards:
                    leases = self.serving if shard in self.serving else self.draining
                    epoch, deadline = leases[shard]
                    assert command.deadline >= deadline
                    leases[shard] = (epoch, command.deadline)
            elif isinstance(command, StopShard):
                if command.shard in self.serving:
                    lease = self.serving.pop(command.shard)
                    if command.graceful:
                        self.draining[command.shard] = lease
                else:
                    # Escalation: the lock of a draining shard was lost, or
                    # its lease ran out.
                    assert not command.graceful
                    del self.draining[command.shard]
                self.stopping.add(command.shard)
            else:
                assert isinstance(command, ReleaseShards)
                self.releasing |= command.shards


class ClusterCore(RuleBasedStateMachine):
    """Several runners' sans-IO cores on one model storage."""

    names: ClassVar[tuple[str, ...]] = NAMES

    def __init__(self) -> None:
        super().__init__()
        self.now = 0.0
        self.storage = ModelStorage()
        self.drivers: dict[str, Driver] = {}

    # ------------------------------------------------------------------
    # Membership

    @rule(name=st.sampled_from(NAMES))
    def join(self, name: str) -> None:
        if name in self.drivers:
            return
        self.drivers[name] = Driver(name)
        self.storage.sessions[name] = Session(self.now)

    @precondition(lambda self: self.drivers)
    @rule(data=st.data())
    def crash(self, data: st.DataObject) -> None:
        name = data.draw(st.sampled_from(sorted(self.drivers)))
        del self.drivers[name]
        self.storage.kill(name)

    @precondition(lambda self: self.drivers)
    @rule(data=st.data())
    def lose_session(self, data: st.DataObject) -> None:
        name = data.draw(st.sampled_from(sorted(self.drivers)))
        driver = self.drivers[name]
        self.storage.lose(name)
        # `Sharding._watch_session`: stop everything the moment storage says so.
        driver.apply(driver.own.refreshed((), started_at=self.now), self.storage)

    # ------------------------------------------------------------------
    # The driver's loops

    @precondition(lambda self: self.drivers)
    @rule(data=st.data())
    def poll(self, data: st.DataObject) -> None:
        name = data.draw(st.sampled_from(sorted(self.drivers)))
        self._poll(self.drivers[name])

    def _poll(self, driver: Driver) -> None:
        self.storage.operation(driver.name, self.now)
        driver.members = frozenset(self.storage.live()) | {driver.name}
        members = [Member(RunnerAddress(n, 1), (GROUP,)) for n in driver.members]
        assignment = assign_shards(members, shards_per_group=SHARDS)
        mine = shards_of(assignment, driver.address)
        driver.apply(driver.own.assignment_changed(mine), self.storage)
        wanted = driver.own.wanted()
        if wanted:
            self.storage.operation(driver.name, self.now)
            epochs = self.storage.acquire(driver.name, wanted)
            commands = driver.own.acquired(epochs, started_at=self.now)
            driver.apply(commands, self.storage)

    @precondition(lambda self: self.drivers)
    @rule(data=st.data(), reaches_storage=st.booleans())
    def refresh(self, data: st.DataObject, reaches_storage: bool) -> None:
        name = data.draw(st.sampled_from(sorted(self.drivers)))
        if not reaches_storage:
            return  # storage down for it: no heartbeat, leases not extended
        self._refresh(self.drivers[name])

    def _refresh(self, driver: Driver) -> None:
        self.storage.operation(driver.name, self.now)
        held = {
            shard
            for shard in driver.own.held()
            if self.storage.holder.get(shard) == driver.name
        }
        driver.apply(driver.own.refreshed(held, started_at=self.now), self.storage)

    @rule(step=st.sampled_from((0.25, 0.5, 1.0, 2.5, 4.5)))
    def tick(self, step: float) -> None:
        self.now += step
        for driver in self.drivers.values():
            # The shard nurseries' deadlines fire: the driver tells the core
            # each lapse, as `Sharding._serve_shard` does.
            driver.lapse(self.now, self.storage)

    @precondition(lambda self: self.drivers)
    @rule(data=st.data(), quarters=st.integers(1, 32))
    def freeze(self, data: st.DataObject, quarters: int) -> None:
        """One runner is frozen (no storage call at all) for ``quarters``
        quarter-seconds while the others poll every quarter-second and
        refresh every second, as the real loops do; only its shards' lease
        deadlines still fire."""
        frozen = data.draw(st.sampled_from(sorted(self.drivers)))
        for quarter in range(1, quarters + 1):
            self.tick(0.25)
            for driver in list(self.drivers.values()):
                if driver.name != frozen:
                    self._poll(driver)
                    if quarter % 4 == 0:
                        self._refresh(driver)
            # Check at every instant, not only when the freeze is over.
            self.at_most_one_server_holding_the_lock()

    @precondition(lambda self: any(d.stopping for d in self.drivers.values()))
    @rule(data=st.data())
    def finish_stop(self, data: st.DataObject) -> None:
        name = data.draw(
            st.sampled_from(sorted(n for n, d in self.drivers.items() if d.stopping))
        )
        driver = self.drivers[name]
        shard = data.draw(st.sampled_from(sorted(driver.stopping, key=_number)))
        driver.stopping.discard(shard)
        driver.draining.pop(shard, None)
        driver.apply(driver.own.stopped(shard), self.storage)

    @precondition(lambda self: any(d.releasing for d in self.drivers.values()))
    @rule(data=st.data())
    def finish_release(self, data: st.DataObject) -> None:
        name = data.draw(
            st.sampled_from(sorted(n for n, d in self.drivers.items() if d.releasing))
        )
        self._release(self.drivers[name])

    def _release(self, driver: Driver) -> None:
        self.storage.operation(driver.name, self.now)
        for shard in driver.releasing:
            if self.storage.holder.get(shard) == driver.name:
                self.storage.holder[shard] = None
        driver.own.released(driver.releasing)
        driver.releasing = set()

    @precondition(lambda self: self.drivers)
    @rule()
    def settle(self) -> None:
        """No more faults: a few rounds of every loop, then every shard is
        served once, by its assigned runner."""
        for _ in range(3):
            for driver in self.drivers.values():
                self._poll(driver)
                self._refresh(driver)
                for shard in sorted(driver.stopping, key=_number):
                    driver.stopping.discard(shard)
                    driver.draining.pop(shard, None)
                    driver.apply(driver.own.stopped(shard), self.storage)
                self._release(driver)
            self.now += REFRESH
        for driver in self.drivers.values():
            self._poll(driver)
        served = {
            shard: driver.name
            for driver in self.drivers.values()
            for shard in driver.own.serving()
        }
        members = [Member(d.address, (GROUP,)) for d in self.drivers.values()]
        expected = {
            shard: owner.host
            for shard, owner in assign_shards(members, shards_per_group=SHARDS).items()
        }
        assert served == expected

    # ------------------------------------------------------------------
    # Invariants

    @invariant()
    def at_most_one_server_holding_the_lock(self) -> None:
        seen: dict[ShardId, str] = {}
        for driver in self.drivers.values():
            for shard, epoch in driver.own.serving().items():
                assert shard not in seen, (
                    f"{shard} served by {seen[shard]} and {driver.name}"
                )
                seen[shard] = driver.name
                assert self.storage.holder.get(shard) == driver.name
                assert self.storage.epoch[shard] == epoch

    @invariant()
    def a_draining_shard_keeps_its_lock(self) -> None:
        """While a shard drains under its lease, nobody else can lock it."""
        for driver in self.drivers.values():
            for shard, (epoch, _) in driver.draining.items():
                assert self.storage.holder.get(shard) == driver.name, (
                    f"{shard} drained by {driver.name} is locked by"
                    f" {self.storage.holder.get(shard)}"
                )
                assert self.storage.epoch[shard] == epoch

    @invariant()
    def ownership_matches_the_model(self) -> None:
        for driver in self.drivers.values():
            own = driver.own
            assert own.serving() == {s: e for s, (e, _) in driver.serving.items()}
            for shard, (_, deadline) in driver.serving.items():
                assert own.phase(shard) is Phase.SERVING
                assert deadline > self.now
            for shard, (_, deadline) in driver.draining.items():
                assert own.phase(shard) is Phase.STOPPING
                assert shard in driver.stopping
                assert deadline > self.now
            for shard in driver.stopping:
                assert own.phase(shard) is Phase.STOPPING
            for shard in driver.releasing:
                assert own.phase(shard) is Phase.RELEASING
            assert (
                own.held() == set(driver.serving) | driver.stopping | driver.releasing
            )
            assert own.wanted() == own.assigned - own.held()
            deadlines = [
                deadline
                for _, deadline in (*driver.serving.values(), *driver.draining.values())
            ]
            assert own.next_deadline() == (min(deadlines) if deadlines else None)

    @invariant()
    def assignment_is_the_documented_greedy_matching(self) -> None:
        for driver in self.drivers.values():
            if not driver.members:
                continue
            members = [Member(RunnerAddress(n, 1), (GROUP,)) for n in driver.members]
            owners = reference_greedy(members, GROUP, SHARDS)
            expected = {
                ShardId(GROUP, n + 1)
                for n, owner in enumerate(owners)
                if owner.address == driver.address
            }
            assert driver.own.assigned == expected
            assert driver.own.assigned <= ALL_SHARDS


def _number(shard: ShardId) -> int:
    return shard.number


TestClusterCore = pytest.mark.simulation(ClusterCore.TestCase)


class _TooLongLease(Ownership):
    """A planted bug: local leases that outlive the storage lease."""

    def __init__(self, *, lease_duration: float, refresh_interval: float) -> None:
        super().__init__(
            lease_duration=lease_duration, refresh_interval=refresh_interval
        )
        self._validity = lease_duration + 0.5


def test_the_model_catches_a_lease_that_outlives_storage(monkeypatch):
    monkeypatch.setattr(f"{__name__}.Ownership", _TooLongLease)
    with pytest.raises(AssertionError):
        run_state_machine_as_test(
            ClusterCore,
            settings=settings(
                max_examples=300,
                derandomize=True,
                database=None,
                phases=[Stage.generate],
                deadline=None,
                suppress_health_check=[HealthCheck.too_slow],
            ),
        )
