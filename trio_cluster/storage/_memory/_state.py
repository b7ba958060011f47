"""Durable entity state on `MemoryStorage` (edge adapter).

Theory of operation: `StateTable` is the shared "table" of snapshots, one
per entity type and id, and checks writes against the shards' current
epochs (``epoch_of``, the runner table's) and the stored versions. It is
synchronous, like `._store.MessageStore`: `MemoryStates`, the
`StateStorage` part of a session's `._messages.MemoryMessages`, runs an
operation's entry steps and then calls it without a checkpoint, so every
operation is atomic.

A row is the `ListedState` listings return (the snapshot, with the shard
and time of its save); listings and counts read the committed rows, in
code-point order of entity type and id.

A write in a transaction is *previewed* (its outcome computed against the
table and the transaction's earlier writes), buffered in the transaction
(`MemoryTransaction.states`) and applied when it commits; meanwhile the
transaction holds the fence of the entity's shard, as for replies, so no
acquisition moves that epoch before the commit.
"""

from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING

from trio_cluster._storage_state import (
    ListedState,
    StateCount,
    StateOutcome,
    StateQuery,
    StateStorage,
    StateWrite,
    StoredState,
)

from .._validation import (
    check_clear_address,
    check_list_states,
    check_state_query,
    check_state_write,
    check_state_writes,
)

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Mapping, Sequence

    from trio_cluster._core._addresses import EntityAddress, ShardId
    from trio_cluster._storage_abc import StorageTransaction

    from ._messages import MemoryTransaction
    from ._store import MessageStore

__all__ = ["MemoryStates", "StateTable", "row_of"]

_Key = tuple[str, str]
"""An entity's type and id: what a snapshot is stored under."""


def _key(address: EntityAddress) -> _Key:
    return (address.entity_type, address.entity_id.value)


class StateTable:
    """The snapshots of one `MemoryStorage`.

    Args:
        epoch_of: the current epoch of a shard (None: never acquired).
    """

    def __init__(self, epoch_of: Callable[[ShardId], int | None]) -> None:
        self._epoch_of = epoch_of
        self._rows: dict[_Key, ListedState] = {}

    def load(self, address: EntityAddress) -> StoredState | None:
        row = self._rows.get(_key(address))
        return None if row is None else row.state

    def preview(
        self, write: StateWrite, pending: Mapping[_Key, ListedState] | None = None
    ) -> StateOutcome:
        """The outcome of ``write`` now, after the writes ``pending`` (those
        of the same transaction), changing nothing."""
        if self._epoch_of(write.address.shard) != write.epoch:
            return StateOutcome.STALE_EPOCH
        key = _key(write.address)
        stored = (pending or {}).get(key) or self._rows.get(key)
        current = 0 if stored is None else stored.state.version
        if current != write.expected_version:
            return StateOutcome.CONFLICT
        return StateOutcome.SAVED

    def save(self, write: StateWrite, now: float) -> StateOutcome:
        outcome = self.preview(write)
        if outcome is StateOutcome.SAVED:
            self.apply({_key(write.address): row_of(write, now)})
        return outcome

    def apply(self, rows: Mapping[_Key, ListedState]) -> None:
        """Store rows previewed as saved (a transaction commits)."""
        self._rows.update(rows)

    def delete(self, address: EntityAddress) -> bool:
        return self._rows.pop(_key(address), None) is not None

    def matching(self, query: StateQuery) -> list[ListedState]:
        """The rows ``query`` selects, in order of entity type and id."""
        return sorted(
            (row for row in self._rows.values() if _matches(query, row)),
            key=lambda row: (row.entity_type, row.entity_id),
        )


def _matches(query: StateQuery, row: ListedState) -> bool:
    if query.prefix:
        if not row.entity_type.startswith(query.entity_type):
            return False
    elif row.entity_type != query.entity_type:
        return False
    if query.entity_id is not None and row.entity_id != query.entity_id:
        return False
    return query.label is None or row.state.label == query.label


def _count_order(item: tuple[tuple[str, str | None], int]) -> tuple[str, bool, str]:
    (entity_type, label), _ = item
    return (entity_type, label is not None, label or "")


def row_of(write: StateWrite, now: float) -> ListedState:
    """The row ``write`` stores (saved at ``now``)."""
    address = write.address
    return ListedState(
        entity_type=address.entity_type,
        entity_id=address.entity_id.value,
        shard=address.shard,
        state=StoredState(
            payload=write.payload,
            version=write.expected_version + 1,
            epoch=write.epoch,
            label=write.label,
        ),
        saved_at=now,
    )


class MemoryStates(StateStorage):
    """The `StateStorage` part of a session's `MemoryMessages` (mixed in).

    It uses the session view's entry steps (``_enter``), its store (the
    owner of its transactions) and ``_states``, the shared `StateTable`.
    """

    _enter: Callable[[str], Awaitable[None]]
    _store: MessageStore
    _states: StateTable

    def _mine(self, transaction: StorageTransaction) -> MemoryTransaction:
        """``transaction``, checked to come from this storage."""
        raise NotImplementedError  # pragma: no cover - MemoryMessages has it

    async def load_state(self, address: EntityAddress) -> StoredState | None:
        address = check_clear_address(address)
        await self._enter("load_state")
        return self._states.load(address)

    async def save_state(
        self,
        write: StateWrite,
        *,
        now: float,
        transaction: StorageTransaction | None = None,
    ) -> StateOutcome:
        write, now = check_state_write(write, now)
        if transaction is None:
            await self._enter("save_state")
            return self._states.save(write, now)
        mine = self._mine(transaction)
        await self._enter("save_state")
        mine.check_usable()
        outcome = self._states.preview(write, mine.states)
        if outcome is StateOutcome.SAVED:
            shard = write.address.shard
            if shard not in mine.fences:
                mine.fences.add(shard)
                self._store.hold_fences([shard])
            mine.states[_key(write.address)] = row_of(write, now)
        return outcome

    async def save_states(
        self, writes: Sequence[StateWrite], *, now: float
    ) -> list[StateOutcome]:
        checked, now = check_state_writes(writes, now)
        await self._enter("save_states")
        return [self._states.save(write, now) for write in checked]

    async def delete_state(self, address: EntityAddress) -> bool:
        address = check_clear_address(address)
        await self._enter("delete_state")
        return self._states.delete(address)

    async def list_states(
        self,
        query: StateQuery,
        *,
        after: tuple[str, str] | None = None,
        limit: int,
    ) -> list[ListedState]:
        query, after, limit = check_list_states(query, after, limit)
        await self._enter("list_states")
        rows = self._states.matching(query)
        if after is not None:
            rows = [r for r in rows if (r.entity_type, r.entity_id) > after]
        return rows[:limit]

    async def count_states(self, query: StateQuery) -> list[StateCount]:
        query = check_state_query(query)
        await self._enter("count_states")
        counts = Counter(
            (row.entity_type, row.state.label) for row in self._states.matching(query)
        )
        return [
            StateCount(entity_type, label, n)
            for (entity_type, label), n in sorted(counts.items(), key=_count_order)
        ]
