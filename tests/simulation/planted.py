"""Planted bugs: the runtime made wrong on purpose, to check that the
simulator notices (test-only hooks, applied with pytest's ``monkeypatch``).

Each function patches one runtime class for the duration of a test; nothing
in the package itself knows about them.
"""

from __future__ import annotations

import math
from typing import Any

import attrs
import pytest

from trio_cluster._core._addresses import ShardId
from trio_cluster._engine._persisted import PersistedDelivery
from trio_cluster._engine._sharding import Sharding
from trio_cluster._engine._slots import ShardHost
from trio_cluster._storage_abc import ClaimBatch, ReplyOutcome, ReplyRecord
from trio_cluster.storage._memory._messages import MessageStore


def release_without_cancelling(monkeypatch: pytest.MonkeyPatch) -> None:
    """Stopping a shard releases its lock at once but leaves the shard's
    scope running: the runner keeps serving a shard it no longer holds."""

    def stop_shard(self: Sharding, command: object) -> None:
        shard = command.shard  # type: ignore[attr-defined]
        if shard in self.table.hosts:
            self._to_release.add(shard)
            self._release_wanted.set()

    monkeypatch.setattr(Sharding, "_stop_shard", stop_shard)


def lease_never_lapses(monkeypatch: pytest.MonkeyPatch) -> None:
    """The shard scope has no deadline: a runner whose refreshes stop keeps
    serving until it hears that its lock is gone."""
    original = ShardHost.__init__

    def init(
        self: ShardHost,
        shard_id: ShardId,
        epoch: int,
        deadline: float,
        *args: Any,
        **kwargs: Any,
    ) -> None:
        original(self, shard_id, epoch, math.inf, *args, **kwargs)

    def extend_lease(self: ShardHost, deadline: float) -> None:
        self.lease_deadline = math.inf

    monkeypatch.setattr(ShardHost, "__init__", init)
    monkeypatch.setattr(ShardHost, "extend_lease", extend_lease)


def no_fencing(monkeypatch: pytest.MonkeyPatch) -> None:
    """Storage records replies whatever their epoch (the fencing check is
    skipped): a runner waking from a freeze writes over its successor."""
    original = MessageStore._save_reply

    def save_reply(self: MessageStore, reply: ReplyRecord, now: float) -> ReplyOutcome:
        current = self._epoch_of(reply.shard)
        if current is not None:
            reply = attrs.evolve(reply, epoch=current)
        return original(self, reply, now)

    monkeypatch.setattr(MessageStore, "_save_reply", save_reply)


def claims_out_of_order(monkeypatch: pytest.MonkeyPatch) -> None:
    """Storage hands claimed requests over newest first: per-entity FIFO
    breaks whenever a claim returns more than one request of an entity."""
    original = MessageStore.claim

    def claim(
        self: MessageStore, shards: dict[ShardId, int], now: float, limit: int
    ) -> ClaimBatch:
        batch = original(self, shards, now, limit)
        return attrs.evolve(batch, requests=batch.requests[::-1])

    monkeypatch.setattr(MessageStore, "claim", claim)


def attempts_not_counted(monkeypatch: pytest.MonkeyPatch) -> None:
    """Claims count no attempt: a request whose runners keep dying is
    claimed and started again without end."""
    original = MessageStore.claim

    def claim(self: MessageStore, *args: Any, **kwargs: Any) -> ClaimBatch:
        batch = original(self, *args, **kwargs)
        requests = [attrs.evolve(request, attempts=1) for request in batch.requests]
        return attrs.evolve(batch, requests=requests)

    monkeypatch.setattr(MessageStore, "claim", claim)


def outbox_outside_the_transaction(monkeypatch: pytest.MonkeyPatch) -> None:
    """A persisted message sent in a transaction is saved at once, in a
    transaction of its own, not in the sender's: it exists even if the
    sender's transaction rolls back."""
    original = PersistedDelivery._send_in

    async def send_in(self: PersistedDelivery, transaction: Any, *args: Any) -> None:
        async with self._parts.storage.open_transaction() as own:
            await original(self, own, *args)

    monkeypatch.setattr(PersistedDelivery, "_send_in", send_in)


PLANTED = {
    "release_without_cancelling": release_without_cancelling,
    "lease_never_lapses": lease_never_lapses,
    "no_fencing": no_fencing,
    "claims_out_of_order": claims_out_of_order,
}
