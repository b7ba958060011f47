"""The shard ownership state machine (sans-IO)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import pytest
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from trio_cluster._core._addresses import ShardId
from trio_cluster._core._ownership import (
    ExtendLeases,
    Ownership,
    Phase,
    ReleaseShards,
    StartShard,
    StopShard,
)

A, B, C = (ShardId("default", n) for n in (1, 2, 3))


def make() -> Ownership:
    return Ownership(lease_duration=5.0, refresh_interval=1.0)


@pytest.mark.parametrize("refresh_interval", [1.0, 0.0])
def test_invalid_timing(refresh_interval):
    with pytest.raises(ValueError, match="refresh_interval"):
        Ownership(lease_duration=1.0, refresh_interval=refresh_interval)


def test_acquire_serve_and_extend():
    own = make()
    assert own.assignment_changed([A, B]) == []
    assert own.wanted() == {A, B}
    commands = own.acquired({A: 3}, started_at=10.0)
    assert commands == [StartShard(A, 3, 14.0)]
    assert own.phase(A) is Phase.SERVING
    assert own.epoch(A) == 3
    assert own.phase(B) is None
    assert own.epoch(B) is None
    assert own.wanted() == {B}
    assert own.serving() == {A: 3}
    assert own.held() == {A}
    assert own.next_deadline() == 14.0
    assert own.refreshed({A}, started_at=11.0) == [ExtendLeases(frozenset({A}), 15.0)]
    # An older refresh that finishes late does not move the deadline back.
    assert own.refreshed({A}, started_at=10.5) == []
    assert own.next_deadline() == 15.0


def test_same_assignment_is_a_no_op():
    own = make()
    own.assignment_changed([A])
    own.acquired({A: 1}, started_at=0.0)
    assert own.assignment_changed([A]) == []


def test_acquired_twice_is_ignored():
    own = make()
    own.assignment_changed([A])
    own.acquired({A: 1}, started_at=0.0)
    assert own.acquired({A: 1}, started_at=1.0) == []


def test_shard_moved_away_stops_gracefully_then_releases():
    own = make()
    own.assignment_changed([A, B])
    own.acquired({A: 1, B: 1}, started_at=0.0)
    assert own.assignment_changed([B]) == [StopShard(A, graceful=True)]
    assert own.phase(A) is Phase.STOPPING
    assert own.wanted() == set()  # not wanted while on its way out
    assert own.stopped(A) == [ReleaseShards(frozenset({A}))]
    assert own.phase(A) is Phase.RELEASING
    assert own.stopped(A) == []  # idempotent
    own.released([A])
    assert own.phase(A) is None
    assert own.held() == {B}


def test_acquired_after_assignment_moved_is_released_at_once():
    own = make()
    own.assignment_changed([A])
    own.assignment_changed([B])
    assert own.acquired({A: 5, B: 2}, started_at=0.0) == [
        StartShard(B, 2, 4.0),
        ReleaseShards(frozenset({A})),
    ]
    assert own.phase(A) is Phase.RELEASING


def test_refresh_that_lost_a_lock_stops_it_forced():
    own = make()
    own.assignment_changed([A, B])
    own.acquired({A: 1, B: 1}, started_at=0.0)
    commands = own.refreshed({B}, started_at=1.0)
    assert commands == [ExtendLeases(frozenset({B}), 5.0), StopShard(A, graceful=False)]
    # Released and still assigned: wanted again (a new epoch next time).
    own.stopped(A)
    own.released([A])
    assert own.wanted() == {A}


def test_refresh_that_started_after_the_deadline_does_not_extend():
    own = make()
    own.assignment_changed([A])
    own.acquired({A: 1}, started_at=0.0)  # deadline 4.0
    assert own.refreshed({A}, started_at=4.5) == [StopShard(A, graceful=False)]


def test_a_refresh_does_not_judge_a_lock_taken_after_it_began():
    own = make()
    own.assignment_changed([A, B])
    own.acquired({A: 1}, started_at=0.0)
    asked = own.held_epochs()
    assert asked == {A: 1}
    # While the refresh is on its way, A's lease lapses, A is released and
    # locked again (epoch 2), and B is locked: the answer predates both.
    assert own.lapsed(A) == [StopShard(A, graceful=False)]
    own.stopped(A)
    own.released([A])
    own.acquired({A: 2, B: 1}, started_at=4.1)
    assert own.refreshed((), started_at=4.0, asked=asked) == []
    assert own.serving() == {A: 2, B: 1}
    # Without ``asked`` (the lock session was lost) every shard is judged.
    assert own.refreshed((), started_at=4.2) == [
        StopShard(A, graceful=False),
        StopShard(B, graceful=False),
    ]


def test_a_draining_shard_keeps_its_lease_until_stopped():
    own = make()
    own.assignment_changed([A])
    own.acquired({A: 1}, started_at=0.0)  # deadline 4.0
    assert own.assignment_changed([]) == [StopShard(A, graceful=True)]
    # Its handlers still run: refreshes go on extending its lease.
    assert own.refreshed({A}, started_at=1.0) == [ExtendLeases(frozenset({A}), 5.0)]
    assert own.next_deadline() == 5.0
    assert own.stopped(A) == [ReleaseShards(frozenset({A}))]
    # Released (or on its way): no lease to extend any more.
    assert own.refreshed({A}, started_at=2.0) == []
    assert own.next_deadline() is None


def test_a_draining_shard_whose_lock_is_lost_is_stopped_forced():
    own = make()
    own.assignment_changed([A, B])
    own.acquired({A: 1, B: 1}, started_at=0.0)
    own.assignment_changed([B])
    assert own.refreshed({B}, started_at=1.0) == [
        ExtendLeases(frozenset({B}), 5.0),
        StopShard(A, graceful=False),
    ]
    # Escalated once: a later refresh or lapse does not stop it again.
    assert own.refreshed({B}, started_at=2.0) == [ExtendLeases(frozenset({B}), 6.0)]
    assert own.lapsed(A) == []


def test_a_draining_shard_whose_lease_runs_out_is_stopped_forced():
    own = make()
    own.assignment_changed([A])
    own.acquired({A: 1}, started_at=0.0)  # deadline 4.0
    own.assignment_changed([])
    assert own.lapsed(A) == [StopShard(A, graceful=False)]
    assert own.refreshed({A}, started_at=4.5) == []
    assert own.stopped(A) == [ReleaseShards(frozenset({A}))]


def test_expiry_and_lapse():
    own = make()
    own.assignment_changed([A, B])
    own.acquired({A: 1}, started_at=0.0)
    own.acquired({B: 1}, started_at=2.0)
    assert own.next_deadline() == 4.0  # A's lease: the driver's scope fires
    assert own.lapsed(A) == [StopShard(A, graceful=False)]
    assert own.lapsed(A) == []  # already stopping
    assert own.lapsed(C) == []  # unknown
    assert own.lapsed(B) == [StopShard(B, graceful=False)]
    assert own.next_deadline() is None


def test_released_ignores_shards_not_releasing():
    own = make()
    own.assignment_changed([A])
    own.acquired({A: 1}, started_at=0.0)
    own.released([A, B])
    assert own.phase(A) is Phase.SERVING


def test_stop_all_for_shutdown():
    own = make()
    own.assignment_changed([A, B])
    own.acquired({A: 1, B: 1}, started_at=0.0)
    own.assignment_changed([B])
    assert own.stop_all() == [StopShard(B, graceful=True)]
    assert own.assigned == frozenset()
    assert own.wanted() == set()


class OwnershipMachine(RuleBasedStateMachine):
    """Random event sequences against a simple model: a shard is started at
    most once per acquisition, never served while stopping, and commands only
    name shards in the phases they are legal for."""

    shards: ClassVar[list[ShardId]] = [ShardId("g", n) for n in range(1, 6)]

    def __init__(self) -> None:
        super().__init__()
        self.own = make()
        self.now = 0.0
        self.serving: dict[ShardId, float] = {}
        self.stopping: set[ShardId] = set()
        self.draining: dict[ShardId, float] = {}
        """Stopping gracefully: a lease still extended, until escalated."""
        self.releasing: set[ShardId] = set()
        self.next_epoch = 1

    def _apply(self, commands: Sequence[object]) -> None:
        for command in commands:
            if isinstance(command, StartShard):
                assert command.shard not in self.serving
                assert command.shard not in self.stopping | self.releasing
                self.serving[command.shard] = command.deadline
            elif isinstance(command, ExtendLeases):
                for shard in command.shards:
                    leases = self.serving if shard in self.serving else self.draining
                    assert shard in leases
                    assert command.deadline >= leases[shard]
                    leases[shard] = command.deadline
            elif isinstance(command, StopShard):
                if command.shard in self.serving:
                    deadline = self.serving.pop(command.shard)
                    if command.graceful:
                        self.draining[command.shard] = deadline
                else:  # escalating a graceful stop, once
                    assert not command.graceful
                    del self.draining[command.shard]
                self.stopping.add(command.shard)
            else:
                assert isinstance(command, ReleaseShards)
                for shard in command.shards:
                    self.releasing.add(shard)

    @rule(assigned=st.sets(st.sampled_from(shards)))
    def assign(self, assigned):
        self._apply(self.own.assignment_changed(assigned))

    @rule(data=st.data())
    def acquire(self, data):
        wanted = sorted(self.own.wanted(), key=lambda s: s.number)
        got = data.draw(st.sets(st.sampled_from(wanted))) if wanted else set()
        epochs = {}
        for shard in sorted(got, key=lambda s: s.number):
            epochs[shard] = self.next_epoch
            self.next_epoch += 1
        self._apply(self.own.acquired(epochs, started_at=self.now))

    @rule(data=st.data())
    def refresh(self, data):
        held = self.own.held()
        kept = (
            data.draw(st.sets(st.sampled_from(sorted(held, key=lambda s: s.number))))
            if held
            else set()
        )
        self._apply(
            self.own.refreshed(kept, started_at=self.now, asked=self.own.held_epochs())
        )

    @rule(step=st.floats(0.1, 3.0))
    def tick(self, step):
        self.now += step
        # The shard scopes whose deadline passed fire, one lapse each (the
        # path `Sharding._serve_shard` takes).
        for shard, deadline in sorted({**self.serving, **self.draining}.items()):
            if deadline <= self.now:
                self._apply(self.own.lapsed(shard))

    @precondition(lambda self: self.stopping)
    @rule(data=st.data())
    def finish_stop(self, data):
        shard = data.draw(
            st.sampled_from(sorted(self.stopping, key=lambda s: s.number))
        )
        self.stopping.discard(shard)
        self.draining.pop(shard, None)
        self._apply(self.own.stopped(shard))

    @precondition(lambda self: self.releasing)
    @rule()
    def finish_release(self):
        done = set(self.releasing)
        self.releasing.clear()
        self.own.released(done)

    @invariant()
    def model_matches(self):
        assert set(self.own.serving()) == set(self.serving)
        for shard in self.serving:
            assert self.own.phase(shard) is Phase.SERVING
        for shard in self.stopping:
            assert self.own.phase(shard) is Phase.STOPPING
        assert not (self.own.wanted() & self.own.held())
        deadlines = [*self.serving.values(), *self.draining.values()]
        assert self.own.next_deadline() == (min(deadlines) if deadlines else None)
        assert all(deadline > self.now for deadline in deadlines)


TestOwnershipMachine = pytest.mark.simulation(OwnershipMachine.TestCase)


def test_untrusted_locks_are_released_unserved():
    own = make()
    own.assignment_changed([A, B])
    own.acquired({B: 1}, started_at=0.0)
    assert own.untrusted({A: 3, B: 1}) == [ReleaseShards(frozenset({A}))]
    assert own.phase(A) is Phase.RELEASING
    assert own.wanted() == frozenset()
    own.released([A])
    assert own.wanted() == {A}
