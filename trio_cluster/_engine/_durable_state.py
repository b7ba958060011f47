"""Durable entity state: loading, saving and rolling back (Trio driver).

Theory of operation (`trio_cluster._durable` has the user's side):

* `StateKeeper.load` runs when an entity with durable state is activated,
  before ``on_start``: one storage read; the incarnation's `StateCell` gets
  the stored value, its encoding and version, or the initial value (its
  encoding, version 0) if nothing is stored.
* A transactional handler of such an entity runs with `state_writer_var`
  set to a `StateWriter` for its slot (`StateKeeper.writing`), the only
  place its state may be assigned; the writer keeps the state it assigned
  (not the slot's incarnation at saving time, which may be gone by then). When it returns a value or a declared error, its reply is saved
  in its transaction and then, if the state's encoding changed,
  `StateKeeper.save_in` saves the state in the same transaction, fenced by
  the shard's epoch and by the version it replaces.
* `StateKeeper.settle` runs however the transaction ended: committed, the
  cell now stands on the saved snapshot; not committed (the handler crashed,
  was interrupted, its reply or state was refused, storage failed, the
  caller's task was cancelled), the value goes back to the last committed
  one, so memory never runs ahead of storage.
* `StateKeeper.checkpoint` (``checkpoint_state()`` in a handler) saves the
  state alone, outside the handler's transaction, and takes it as
  committed: concurrent checkpoints of the runner's entities are written
  together, one `StateStorage.save_states` statement per batch (group
  commit, `Batcher`: no delay at low load), each fenced as a save in the
  transaction is.
* A state write refused for its version (the snapshot is newer than the
  incarnation's: e.g. a commit whose outcome was unknown did commit) raises
  `RetryLater`: the request runs again after a backoff, in a fresh
  incarnation, which loads the newer snapshot.

The keeper reaches the entities' shards through `ShardHost.states`, set by
`shard_started` (a hook of `Sharding`), so neither the manager nor the
lifecycle needs a constructor argument for it.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from typing import TYPE_CHECKING

from .._durable import PendingSave, StateCell, StateWriter, state_writer_var
from .._errors import ConfigError, MalformedMessageError
from .._storage_state import StateOutcome, StateStorage, StateWrite
from ._batching import Batcher
from ._outcomes import RetryLater

if TYPE_CHECKING:
    from collections.abc import Iterable, Iterator, Sequence

    from .._clock import Clock
    from .._entity import Entity
    from .._registry import EntityType
    from .._storage_abc import MessageStorage, StorageTransaction
    from ._slots import ShardHost, Slot

__all__ = ["StateKeeper", "StateRefused"]

log = logging.getLogger("trio_cluster.persisted")

_MAX_BATCH = 512
"""Most checkpoints written in one statement."""


class StateRefused(Exception):
    """The state write was refused by fencing: roll back, record nothing
    (the shard's next owner runs the request again)."""


class StateKeeper:
    """Loads, saves and rolls back the durable state of a runner's entities.

    Args:
        storage: the session's message storage; its `StateStorage` part
            keeps the snapshots.
        clock: the wall clock of the saves' ``now``.
        entity_types: the types this runner hosts.

    Raises:
        ConfigError: a hosted type declares durable state and the storage
            keeps none.
    """

    def __init__(
        self,
        storage: MessageStorage,
        clock: Clock,
        entity_types: Iterable[EntityType],
    ) -> None:
        self._storage = storage if isinstance(storage, StateStorage) else None
        self._clock = clock
        self._checkpoints: Batcher[StateWrite, StateOutcome] = Batcher(
            self._flush_checkpoints, max_batch=_MAX_BATCH, name="checkpointing states"
        )
        needing = sorted(
            t.name for t in entity_types if t.hosted and t.durable is not None
        )
        if needing and self._storage is None:
            raise ConfigError(
                f"entity types {', '.join(needing)} declare durable state, which"
                f" {type(storage).__name__} cannot keep: use MemoryStorage or"
                " PostgresStorage"
            )

    async def run(self) -> None:
        """Write the checkpoints (`checkpoint`) in batches until cancelled;
        checkpoints still waiting then get `PersistenceError`."""
        await self._checkpoints.run()

    async def _flush_checkpoints(
        self, writes: Sequence[StateWrite]
    ) -> list[StateOutcome]:
        assert self._storage is not None, "checked at assembly"
        return await self._storage.save_states(writes, now=self._clock.now())

    def shard_started(self, host: ShardHost) -> None:
        """Hook of `Sharding`: the entities of ``host`` reach the keeper."""
        host.states = self

    async def load(self, slot: Slot, instance: Entity) -> None:
        """Give a new incarnation its stored state (or the initial one).

        Raises:
            PersistenceError: storage failed (the activation fails, and is
                retried as after a crash of ``on_start``).
            MalformedMessageError: the stored snapshot does not decode (it
                is left as it is).
        """
        entity_type = slot.entity_type
        durable, codec = entity_type.durable, entity_type.state_codec
        assert durable is not None
        assert codec is not None
        assert self._storage is not None, "checked at assembly"
        stored = await self._storage.load_state(slot.address)
        if stored is None:
            value = durable.initial()
            durable.check(value)
            cell = StateCell(value, codec.encode(value), 0)
        else:
            value = codec.decode(stored.payload)
            cell = StateCell(value, stored.payload, stored.version)
        instance._tc_state = cell

    @contextmanager
    def writing(self, slot: Slot) -> Iterator[StateWriter]:
        """Let the handler running in this context change ``slot``'s state;
        the writer yielded keeps what it changed (for `save_in`, `settle`)."""
        writer = StateWriter(slot, self.checkpoint)
        token = state_writer_var.set(writer)
        try:
            yield writer
        finally:
            state_writer_var.reset(token)

    async def checkpoint(self, writer: StateWriter) -> None:
        """Save the state ``writer``'s handler changed, if its encoding
        changed, outside the handler's transaction, and take it as committed
        (see `trio_cluster._durable.checkpoint_state`).

        Raises:
            StateRefused: the shard's epoch moved on (fencing).
            RetryLater: the stored snapshot is newer than the incarnation's.
            MalformedMessageError: the state does not encode, or its label
                function failed.
            PersistenceError: storage failed.
        """
        slot: Slot = writer.slot  # type: ignore[assignment]
        pending = await self._save(None, slot, writer)
        if pending is not None:
            pending.commit()

    async def save_in(
        self, transaction: StorageTransaction, slot: Slot, writer: StateWriter
    ) -> PendingSave | None:
        """Save the state ``writer``'s handler changed, if its encoding
        changed, in ``transaction``; returns what `settle` applies once it
        commits (None: nothing to save).

        Raises:
            StateRefused: the shard's epoch moved on (fencing).
            RetryLater: the stored snapshot is newer than the incarnation's.
            MalformedMessageError: the state does not encode, or its label
                function failed.
        """
        return await self._save(transaction, slot, writer)

    async def _save(
        self, transaction: StorageTransaction | None, slot: Slot, writer: StateWriter
    ) -> PendingSave | None:
        """`save_in` ``transaction``, or alone (None: committed when this
        returns); the same errors, and `PersistenceError` alone."""
        cell = writer.cell
        codec = slot.entity_type.state_codec
        if cell is None or codec is None:
            return None
        payload = codec.encode(cell.value)
        if payload == cell.payload:
            return None
        assert self._storage is not None, "checked at assembly"
        durable = slot.entity_type.durable
        label = None if durable is None else durable.label_of(cell.value)
        host = slot.shard
        write = StateWrite(
            address=slot.address,
            epoch=host.epoch,
            expected_version=cell.version,
            payload=payload,
            label=label,
        )
        if transaction is None:  # a checkpoint: group commit
            outcome = await self._checkpoints.submit(write)
        else:
            outcome = await self._storage.save_state(
                write, now=self._clock.now(), transaction=transaction
            )
        if outcome is StateOutcome.STALE_EPOCH:
            log.warning(
                "state of %s refused: shard %s moved on; rolled back",
                slot.address,
                host.shard_id,
            )
            raise StateRefused
        if outcome is StateOutcome.CONFLICT:
            raise RetryLater(
                f"the stored state of {slot.address} is newer than version"
                f" {cell.version}: reloading it"
            )
        return PendingSave(cell, cell.value, payload, cell.version + 1)

    def settle(
        self,
        slot: Slot,
        writer: StateWriter,
        saved: PendingSave | None,
        committed: bool,
    ) -> None:
        """The transaction of ``writer``'s handler ended: keep what
        committed (``saved``), or put the last committed value back."""
        if committed:
            if saved is not None:
                saved.commit()
            return
        cell = writer.cell
        codec = slot.entity_type.state_codec
        if cell is None or codec is None or cell.payload is None:
            return
        try:
            cell.value = codec.decode(cell.payload)
        except MalformedMessageError:  # pragma: no cover - it decoded before
            log.exception("state of %s cannot be restored", slot.address)
