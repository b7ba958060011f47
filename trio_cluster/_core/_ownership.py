"""Shard ownership: which shards this runner serves, under which lease (sans-IO).

Theory of operation: each shard this runner cares about has a phase::

    (absent) --acquire--> SERVING --release/lost--> STOPPING --stopped--> RELEASING --released--> (absent)

* The runner is *assigned* shards by the deterministic assignment. Assigned
  shards that are absent are *wanted*; the driver tries to lock them and
  reports `acquired` with the fencing epochs it got.
* A SERVING shard has a lease deadline: ``refresh start + lease_duration -
  lease_refresh_interval``. It is pessimistic on purpose: the database ends
  a silent session ``lease_duration`` after its last statement, which is
  later than any deadline computed here, so this runner always stops serving
  before anyone else can lock the shard.
* A successful refresh that still holds the lock extends the deadline; a
  refresh that reports the lock gone, or a deadline that passes, stops the
  shard *forced* (no grace: it may already be served elsewhere). A shard no
  longer assigned is stopped *gracefully*, then released.
* A shard stopping gracefully (*draining*: its handlers finish within the
  termination timeout) keeps its lease: refreshes go on extending its
  deadline until it is stopped and released, so its lock is never freed
  while one of its handlers still runs. If its lock is lost meanwhile, or its
  deadline passes, the graceful stop is escalated: a forced `StopShard` for
  a shard already STOPPING.

Records are kept in insertion order (dicts), so for the same inputs the
commands come out in the same order: runs are reproducible without sorting.

Inputs are method calls named after events; outputs are lists of commands
(`AcquireShards` is not a command: the driver asks `wanted()` whenever it
has an acquisition slot, so retries need no timers here).
"""

from __future__ import annotations

import enum
from typing import TYPE_CHECKING

import attrs

from ._addresses import ShardId

if TYPE_CHECKING:
    from collections.abc import Iterable, Mapping

__all__ = [
    "ExtendLeases",
    "Ownership",
    "Phase",
    "ReleaseShards",
    "StartShard",
    "StopShard",
]


class Phase(enum.Enum):
    SERVING = "serving"
    STOPPING = "stopping"
    RELEASING = "releasing"


@attrs.frozen
class StartShard:
    """Start serving ``shard`` under ``epoch`` until ``deadline``."""

    shard: ShardId
    epoch: int
    deadline: float


@attrs.frozen
class ExtendLeases:
    """Move the lease deadline of these serving shards."""

    shards: frozenset[ShardId]
    deadline: float


@attrs.frozen
class StopShard:
    """Stop serving ``shard``; ``graceful`` lets running handlers finish.

    A forced stop of a shard already stopping gracefully escalates that stop:
    its lock was lost or its lease ran out while it was draining."""

    shard: ShardId
    graceful: bool


@attrs.frozen
class ReleaseShards:
    """Unlock these shards in storage."""

    shards: frozenset[ShardId]


Command = StartShard | ExtendLeases | StopShard | ReleaseShards


@attrs.define
class _Record:
    phase: Phase
    epoch: int
    deadline: float
    draining: bool = False
    """STOPPING gracefully: its lease is still extended."""


class Ownership:
    """Ownership state of one runner's shards.

    Args:
        lease_duration: seconds a lease lasts after a refresh starts.
        refresh_interval: seconds between refreshes; also the safety margin
            subtracted from each lease.
    """

    def __init__(self, *, lease_duration: float, refresh_interval: float) -> None:
        if not 0 < refresh_interval < lease_duration:
            raise ValueError("need 0 < refresh_interval < lease_duration")
        self._validity = lease_duration - refresh_interval
        self.assigned: frozenset[ShardId] = frozenset()
        self._records: dict[ShardId, _Record] = {}

    def phase(self, shard: ShardId) -> Phase | None:
        """The shard's phase, None if this runner has nothing to do with it."""
        record = self._records.get(shard)
        return None if record is None else record.phase

    def epoch(self, shard: ShardId) -> int | None:
        """The epoch of a shard being served (or stopped), else None."""
        record = self._records.get(shard)
        return None if record is None else record.epoch

    def serving(self) -> dict[ShardId, int]:
        """Shards being served, with their epochs."""
        return {
            shard: record.epoch
            for shard, record in self._records.items()
            if record.phase is Phase.SERVING
        }

    def held(self) -> frozenset[ShardId]:
        """Shards whose lock this runner holds or may hold (not yet released)."""
        return frozenset(self._records)

    def held_epochs(self) -> dict[ShardId, int]:
        """`held`, with the epoch each was locked at (what a refresh asks)."""
        return {shard: record.epoch for shard, record in self._records.items()}

    def wanted(self) -> frozenset[ShardId]:
        """Assigned shards this runner should try to lock now."""
        return frozenset(shard for shard in self.assigned if shard not in self._records)

    def assignment_changed(self, assigned: Iterable[ShardId]) -> list[Command]:
        """The assignment was recomputed; stop shards that moved away."""
        assigned = frozenset(assigned)
        if assigned == self.assigned:
            return []
        self.assigned = assigned
        return [
            self._stop(shard, record, graceful=True)
            for shard, record in self._records.items()
            if record.phase is Phase.SERVING and shard not in assigned
        ]

    def acquired(
        self, epochs: Mapping[ShardId, int], *, started_at: float
    ) -> list[Command]:
        """The driver locked these shards (an acquire that started at ``started_at``)."""
        commands: list[Command] = []
        stray: dict[ShardId, int] = {}
        deadline = started_at + self._validity
        for shard, epoch in epochs.items():
            if shard in self._records:
                continue  # already ours (serving or on its way out)
            if shard not in self.assigned:
                stray[shard] = epoch  # assignment moved while we were acquiring
                continue
            self._records[shard] = _Record(Phase.SERVING, epoch, deadline)
            commands.append(StartShard(shard, epoch, deadline))
        return commands + self._release_unserved(stray)

    def untrusted(self, epochs: Mapping[ShardId, int]) -> list[Command]:
        """The driver got these locks, but its lock session was lost while
        the answer was on its way (they may be gone, or held by a session it
        cannot trust): release them without serving."""
        return self._release_unserved(epochs)

    def _release_unserved(self, epochs: Mapping[ShardId, int]) -> list[Command]:
        """Release locks got that are not to be served (those of shards
        already known here aside)."""
        got = frozenset(shard for shard in epochs if shard not in self._records)
        for shard in got:
            self._records[shard] = _Record(Phase.RELEASING, epochs[shard], 0.0)
        return [ReleaseShards(got)] if got else []

    def refreshed(
        self,
        held: Iterable[ShardId],
        *,
        started_at: float,
        asked: Mapping[ShardId, int] | None = None,
    ) -> list[Command]:
        """A refresh that started at ``started_at`` reported ``held`` still
        locked: extend the leases of serving and draining shards, stop
        (forced) those whose lock is gone or whose deadline passed.

        ``asked``: the shards (with their epochs, from `held_epochs`) the
        refresh asked about; a shard locked again since (another epoch, or
        acquired after it began) is left alone: the answer predates its lock.
        None: every shard is judged (the lock session was lost)."""
        held = frozenset(held)
        commands: list[Command] = []
        extended: set[ShardId] = set()
        deadline = started_at + self._validity
        for shard, record in self._records.items():
            if record.phase is not Phase.SERVING and not record.draining:
                continue
            if asked is not None and asked.get(shard) != record.epoch:
                continue
            if shard in held and record.deadline > started_at:
                if deadline > record.deadline:
                    record.deadline = deadline
                    extended.add(shard)
            else:
                commands.append(self._stop(shard, record, graceful=False))
        if extended:
            commands.insert(0, ExtendLeases(frozenset(extended), deadline))
        return commands

    def lapsed(self, shard: ShardId) -> list[Command]:
        """The driver saw the lease of a serving or draining shard run out
        (its scope was cancelled by the deadline): stop it, forced."""
        record = self._records.get(shard)
        if record is None or (
            record.phase is not Phase.SERVING and not record.draining
        ):
            return []
        return [self._stop(shard, record, graceful=False)]

    def next_deadline(self) -> float | None:
        """Earliest lease deadline of a serving or draining shard."""
        deadlines = [
            r.deadline
            for r in self._records.values()
            if r.phase is Phase.SERVING or r.draining
        ]
        return min(deadlines) if deadlines else None

    def stopped(self, shard: ShardId) -> list[Command]:
        """The driver finished stopping ``shard``: release its lock."""
        record = self._records.get(shard)
        if record is None or record.phase is not Phase.STOPPING:
            return []
        record.phase = Phase.RELEASING
        record.draining = False
        return [ReleaseShards(frozenset({shard}))]

    def released(self, shards: Iterable[ShardId]) -> None:
        """The driver unlocked these shards (or lost them): forget them."""
        for shard in shards:
            record = self._records.get(shard)
            if record is not None and record.phase is Phase.RELEASING:
                del self._records[shard]

    def stop_all(self) -> list[Command]:
        """Shutdown: stop every serving shard gracefully."""
        self.assigned = frozenset()
        return [
            self._stop(shard, record, graceful=True)
            for shard, record in self._records.items()
            if record.phase is Phase.SERVING
        ]

    def _stop(self, shard: ShardId, record: _Record, *, graceful: bool) -> StopShard:
        record.phase = Phase.STOPPING
        record.draining = graceful
        return StopShard(shard, graceful)
