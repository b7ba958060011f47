"""Invariants of a simulated cluster, checked as it runs (test support).

`Checker` is fed by the observed storage (`._storage`), which sees every
storage call of every runner and its result, atomically with the backend's
own work, and by each run's `Incarnation`, the `RunnerListener` that hears
from its runner which shards it serves. From that it checks, continuously:

* **single owner**: when a runner acquires a shard, no other living runner
  still serves it or drains it (its runner said it acquired the shard and did
  not say it is stopping it yet, or said it stops it gracefully and did not
  say that its handlers are done or were cancelled). Together with the lock
  this is "at most one runner serves a shard at any instant": the
  acquisition is the only moment a second server could appear. A handler
  counts as an owner only while it can still have effects: once its runner
  stopped the shard forced (lease lapsed, lock lost), its handlers are
  cancelled at their next checkpoint and nothing of theirs leaves;
* **fencing**: no write of a stale epoch commits after the successor's
  acquisition committed: every reply storage *recorded* carries the shard's
  current epoch, every claim was made at the current epoch, every
  request stored *claimed* was claimed at the current epoch, and every
  durable entity state storage *saved* carries the current epoch (replies
  and states saved in a transaction are checked when it commits);
* **dedup**: a primary key is stored once (while its request exists), a
  duplicate always names the stored request, and request ids never collide;
* **one reply**: a request gets at most one recorded final reply;

and, when asked after the faults stopped (`Checker.unanswered`), that every
accepted persisted request got its final reply ("no persisted message lost").

A killed runner is dead at once: what its cancelled tasks still do is not
held against it (a killed process does nothing at all).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import attrs
import trio

from trio_cluster import EntityAddress, ShardId
from trio_cluster.abc import ReplyOutcome, RunnerListener, StateOutcome

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping, Sequence

    from trio_cluster import RunnerAddress
    from trio_cluster.abc import (
        ClaimBatch,
        PersistedRequest,
        ReplyRecord,
        SaveResult,
        StateWrite,
    )
    from trio_cluster.storage import MemoryStorage

    from ._trace import SimulationTrace

__all__ = ["Checker", "Incarnation"]


@attrs.define(eq=False)
class Incarnation(RunnerListener):
    """One run of one simulated runner, from start to death (or shutdown).

    It is the run's `RunnerListener` (given to ``open_runner``): it follows
    which shards the run serves, as the runner tells them.
    """

    label: str
    """``r1``, or ``r1#2`` for its second run (after a restart)."""
    dead: bool = False
    """Killed: it no longer counts as serving anything."""
    session_lost_at: float | None = None
    """When storage last ended its lock session behind its back."""
    serving: dict[ShardId, int] = attrs.Factory(dict)
    """The shards it serves, with their epochs: told acquired and not yet
    told stopping (gracefully or not)."""
    draining: dict[ShardId, int] = attrs.Factory(dict)
    """The shards it stops gracefully, with their epochs: their handlers may
    still run and have effects (told stopping gracefully, and neither
    stopped nor stopping forced since)."""

    def shard_acquired(self, runner: RunnerAddress, shard: ShardId, epoch: int) -> None:
        self.serving[shard] = epoch

    def shard_stopping(
        self, runner: RunnerAddress, shard: ShardId, epoch: int, *, graceful: bool
    ) -> None:
        # NOTE: only at that epoch: a host of an older epoch (or one told
        # twice) stopping leaves a newer one serving.
        if self.serving.get(shard) == epoch:
            del self.serving[shard]
            if graceful:
                self.draining[shard] = epoch
        if not graceful and self.draining.get(shard) == epoch:
            del self.draining[shard]  # escalated: its handlers are cancelled

    def shard_stopped(self, runner: RunnerAddress, shard: ShardId, epoch: int) -> None:
        if self.draining.get(shard) == epoch:
            del self.draining[shard]

    def owns(self, shard: ShardId, epoch: int | None) -> bool:
        """Whether its handlers of ``shard`` at ``epoch`` can still have
        effects (it serves or drains the shard at that epoch)."""
        if self.dead or epoch is None:
            return False
        return epoch in (self.serving.get(shard), self.draining.get(shard))

    def __str__(self) -> str:
        return self.label


@attrs.define(eq=False)
class _Accepted:
    address: EntityAddress
    tag: str
    primary_key: str | None
    by: str
    finals: int = 0


class Checker:
    """Bookkeeping and continuous checks of a simulated cluster.

    Args:
        storage: the backend (its current epochs are read synchronously).
        trace: where events are recorded.
        fail: called with the text of a violation (records it and stops the
            simulation); the checker carries on (returning normally).
    """

    def __init__(
        self,
        *,
        storage: MemoryStorage,
        trace: SimulationTrace,
        fail: Callable[[str], None],
    ) -> None:
        self._storage = storage
        self._trace = trace
        self._fail = fail
        self.incarnations: dict[str, Incarnation] = {}
        """The living incarnation of each storage session name."""
        self.accepted: dict[int, _Accepted] = {}
        """Persisted requests storage accepted (stored), by request id."""
        self.keys: dict[tuple[EntityAddress, str, str], int] = {}
        """Request id stored for each (address, tag, primary key)."""
        self._unanswered: dict[int, None] = {}
        self.finals = 0
        """Final replies recorded."""
        self.stale_refused = 0
        """Reply writes refused by fencing (late writes of old owners)."""
        self.stored_hooks: list[Callable[[PersistedRequest], None]] = []
        """Called with each persisted request storage accepts."""
        self.answered_hooks: list[Callable[[str, str | None], None]] = []
        """Called with the tag and primary key of each request whose final
        reply is recorded (ran or not: a dead-lettered one never runs)."""
        self.acquisitions = 0
        self.overlaps = 0
        """Acquisitions made while the previous holder, whose lock session
        storage had just ended, had not noticed yet (see `acquired`)."""

    # ------------------------------------------------------------------
    # Queries

    def unanswered(self) -> list[int]:
        """Accepted persisted requests without a final reply, oldest first."""
        return list(self._unanswered)

    def describe_request(self, request_id: int) -> str:
        accepted = self.accepted.get(request_id)
        if accepted is None:
            return f"#{request_id}"
        key = "" if accepted.primary_key is None else f" key {accepted.primary_key!r}"
        return (
            f"#{request_id} ({accepted.tag} to {accepted.address}{key},"
            f" stored by {accepted.by})"
        )

    def _epoch(self, shard: ShardId) -> int | None:
        return self._storage.epoch_of(shard)

    # ------------------------------------------------------------------
    # Runner storage

    def acquired(self, by: Incarnation, epochs: Mapping[ShardId, int]) -> None:
        """``by`` holds these shards now (some may have been held already)."""
        fresh = {
            shard: epoch
            for shard, epoch in epochs.items()
            if by.serving.get(shard) != epoch
        }
        if not fresh:
            return
        self.acquisitions += len(fresh)
        self._trace.record(
            "shard",
            "%s acquired %s",
            by,
            " ".join(_owned(s, e) for s, e in fresh.items()),
        )
        for other in self.incarnations.values():
            if other is by or other.dead:
                continue
            for shard, epoch in fresh.items():
                serving = other.serving.get(shard, other.draining.get(shard))
                if serving is None:
                    continue
                if other.session_lost_at == trio.current_time():
                    # NOTE: storage freed the locks of a session it ended (as
                    # PostgreSQL does when it drops a connection); the runner
                    # learns it a moment later. Until then a new owner may
                    # already hold its shards (fencing keeps storage safe).
                    # Allowed only within that instant: see
                    # `SimulatedCluster.lose_session`.
                    self.overlaps += 1
                    self._trace.record(
                        "check",
                        "%s acquired %s@%d while %s, whose lock session was just"
                        " lost, has not noticed yet",
                        by,
                        shard,
                        epoch,
                        other,
                    )
                else:
                    self._fail(
                        f"single owner: {by} acquired shard {shard} at epoch {epoch}"
                        f" while {other} still serves it at epoch {serving}"
                    )

    def released(self, by: Incarnation, shards: Sequence[ShardId]) -> None:
        if shards:
            self._trace.record(
                "shard", "%s released %s", by, " ".join(str(s) for s in shards)
            )

    def refreshed(
        self, by: Incarnation, asked: Sequence[ShardId], held: set[ShardId]
    ) -> None:
        lost = [shard for shard in asked if shard not in held]
        if lost:
            self._trace.record(
                "shard",
                "%s refresh: lock lost on %s",
                by,
                " ".join(str(s) for s in lost),
            )

    # ------------------------------------------------------------------
    # Message storage

    def saved(
        self,
        by: Incarnation,
        requests: Sequence[PersistedRequest],
        results: Sequence[SaveResult],
    ) -> None:
        for request, result in zip(requests, results, strict=True):
            key = (
                None
                if request.primary_key is None
                else (request.address, request.tag, request.primary_key)
            )
            if result.duplicate:
                self._duplicate(by, request, result, key)
                continue
            if result.request_id != request.request_id:
                self._fail(
                    f"dedup: storing {request.request_id} returned id"
                    f" {result.request_id} without saying it is a duplicate"
                )
            if result.claimed:
                current = self._epoch(request.address.shard)
                if request.claim_epoch != current:
                    self._fail(
                        f"fencing: {by} stored #{request.request_id} claimed at"
                        f" epoch {request.claim_epoch}, but shard"
                        f" {request.address.shard} is at epoch {current}"
                    )
            if key is not None:
                earlier = self.keys.get(key)
                if earlier is not None and self._still_stored(earlier):
                    self._fail(
                        f"dedup: {by} stored key {request.primary_key!r} of"
                        f" {request.address} again as #{request.request_id};"
                        f" #{earlier} still holds it"
                    )
                self.keys[key] = request.request_id
            if request.request_id in self.accepted:
                self._fail(f"dedup: request id {request.request_id} stored twice")
            self.accepted[request.request_id] = _Accepted(
                request.address, request.tag, request.primary_key, str(by)
            )
            self._unanswered[request.request_id] = None
            for hook in self.stored_hooks:
                hook(request)
            self._trace.record(
                "persisted",
                "%s stored #%d %s to %s%s%s",
                by,
                request.request_id,
                request.tag,
                request.address,
                "" if request.primary_key is None else f" key={request.primary_key}",
                " (claimed)" if result.claimed else "",
            )

    def _duplicate(
        self,
        by: Incarnation,
        request: PersistedRequest,
        result: SaveResult,
        key: tuple[EntityAddress, str, str] | None,
    ) -> None:
        original = self.accepted.get(result.request_id)
        if original is None:
            self._fail(
                f"dedup: storing #{request.request_id} to {request.address} was"
                f" answered as a duplicate of #{result.request_id}, which was never"
                " stored"
            )
            return
        same_key = (
            key is not None
            and (original.address, original.tag, original.primary_key) == key
        )
        if not same_key and result.request_id != request.request_id:
            self._fail(
                f"dedup: #{request.request_id} ({request.tag} to {request.address},"
                f" key {request.primary_key!r}) was taken for a duplicate of"
                f" {self.describe_request(result.request_id)}: a request id or key"
                " collision"
            )
            return
        self._trace.record(
            "persisted",
            "%s re-sent key=%s: duplicate of #%d%s",
            by,
            request.primary_key,
            result.request_id,
            " (answered)" if result.final_reply is not None else "",
        )

    def _still_stored(self, request_id: int) -> bool:
        # Retention (or clear_address) may have deleted the original.
        return self._storage.has_request(request_id)

    def claimed(
        self, by: Incarnation, shards: Mapping[ShardId, int], batch: ClaimBatch
    ) -> None:
        for request in batch.requests:
            current = self._epoch(request.address.shard)
            if request.epoch != current or shards.get(request.address.shard) != current:
                self._fail(
                    f"fencing: {by} claimed #{request.request_id} at epoch"
                    f" {request.epoch}, but shard {request.address.shard} is at"
                    f" epoch {current}"
                )
        if batch.requests:
            self._trace.record(
                "persisted",
                "%s claimed %s",
                by,
                " ".join(
                    f"#{r.request_id}@{_owned(r.address.shard, r.epoch)}"
                    for r in batch.requests
                ),
            )

    def replies_saved(
        self,
        by: Incarnation,
        replies: Sequence[ReplyRecord],
        outcomes: Sequence[ReplyOutcome],
    ) -> None:
        for reply, outcome in zip(replies, outcomes, strict=True):
            final = reply.sequence is None
            what = "reply" if final else f"chunk {reply.sequence}"
            if outcome is ReplyOutcome.STALE_EPOCH:
                self.stale_refused += 1
                self._trace.record(
                    "persisted",
                    "%s %s to #%d at %s refused: stale epoch (now %s)",
                    by,
                    what,
                    reply.request_id,
                    _owned(reply.shard, reply.epoch),
                    self._epoch(reply.shard),
                )
                continue
            if outcome is not ReplyOutcome.RECORDED:
                self._trace.record(
                    "persisted",
                    "%s %s to #%d: %s",
                    by,
                    what,
                    reply.request_id,
                    outcome.value,
                )
                continue
            current = self._epoch(reply.shard)
            if reply.epoch != current:
                self._fail(
                    f"fencing: {by} recorded the {what} to"
                    f" {self.describe_request(reply.request_id)} under epoch"
                    f" {reply.epoch} of shard {reply.shard}, whose epoch is {current}"
                )
            self._trace.record(
                "persisted",
                "%s recorded %s to #%d at %s",
                by,
                what,
                reply.request_id,
                _owned(reply.shard, reply.epoch),
            )
            if final:
                self._final(by, reply.request_id)

    def states_saved(
        self,
        by: Incarnation,
        writes: Sequence[StateWrite],
        outcomes: Sequence[StateOutcome],
    ) -> None:
        """Durable entity states took effect (at commit, for those saved in
        a transaction): each saved one was written under its shard's
        current epoch (fencing)."""
        for write, outcome in zip(writes, outcomes, strict=True):
            if outcome is not StateOutcome.SAVED:
                self._trace.record(
                    "state",
                    "%s state of %s at %s: %s",
                    by,
                    write.address,
                    _owned(write.address.shard, write.epoch),
                    outcome.value,
                )
                continue
            current = self._epoch(write.address.shard)
            if write.epoch != current:
                self._fail(
                    f"fencing: {by} saved the state of {write.address} under epoch"
                    f" {write.epoch} of shard {write.address.shard}, whose epoch"
                    f" is {current}"
                )
            self._trace.record(
                "state",
                "%s saved state v%d of %s at %s",
                by,
                write.expected_version + 1,
                write.address,
                _owned(write.address.shard, write.epoch),
            )

    def _final(self, by: Incarnation, request_id: int) -> None:
        self.finals += 1
        self._unanswered.pop(request_id, None)
        accepted = self.accepted.get(request_id)
        if accepted is None:
            return
        for hook in self.answered_hooks:
            hook(accepted.tag, accepted.primary_key)
        accepted.finals += 1
        if accepted.finals > 1:
            self._fail(
                f"one reply: {by} recorded a second final reply to"
                f" {self.describe_request(request_id)}"
            )

    def cleared(self, address: EntityAddress) -> None:
        """``clear_address`` deleted every request of ``address``."""
        for request_id, accepted in list(self.accepted.items()):
            if accepted.address == address:
                self._unanswered.pop(request_id, None)


def _owned(shard: ShardId, epoch: int | None) -> str:
    return f"{shard}@{epoch}"
