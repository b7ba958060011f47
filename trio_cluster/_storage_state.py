"""The storage contract's durable entity state (interface).

An optional capability of a backend's `MessageStorage`: a backend whose
session ``messages`` is also a `StateStorage` can keep *durable entity
state* (``trio_cluster.durable``). Both built-in backends are.

One snapshot per entity, keyed by entity type and id (not by shard: a
change of ``shards_per_group`` moves an entity to another shard, and its
state goes with it). Each snapshot has a *version*, 1 for the first save and
one more for each save after it, like an etag:

* `StateStorage.load_state` reads it (None: never saved, or deleted);
* `StateStorage.save_state` replaces it, *fenced* like replies: the write
  carries the epoch under which its writer owns the entity's shard, and is
  refused (`StateOutcome.STALE_EPOCH`) when the shard's epoch has moved on;
  it also carries the version it replaces (0: none), and is refused
  (`StateOutcome.CONFLICT`) when the stored version is another one, so a
  writer whose copy fell behind storage never overwrites a newer snapshot.

Saved in a transaction (``transaction``, from ``open_transaction`` on the
same storage), a snapshot takes effect when the transaction commits, with
the reply saved in it, and not at all if it rolls back; while the
transaction is open, no acquisition moves the shard's epoch (as for replies:
the module docstring of `trio_cluster._storage_abc` says what fencing
guarantees). `MessageStorage.clear_address` deletes an entity's snapshot
along with its requests.

Each snapshot may carry a *label*: a short text the entity's state declares
(``durable(..., label=...)``; a workflow's status, a state machine's state)
and storage keeps beside the opaque payload, so operators can list
(`StateStorage.list_states`) and count (`StateStorage.count_states`) the
snapshots of some entity types by label without decoding any payload.
"""

from __future__ import annotations

import enum
from abc import ABC, abstractmethod
from typing import TYPE_CHECKING

import attrs

from ._core._addresses import EntityAddress, ShardId

if TYPE_CHECKING:
    from collections.abc import Sequence

    from ._storage_abc import StorageTransaction

__all__ = [
    "MAX_LABEL",
    "ListedState",
    "StateCount",
    "StateOutcome",
    "StateQuery",
    "StateStorage",
    "StateWrite",
    "StoredState",
]

MAX_LABEL = 200
"""The longest label (characters) a snapshot may carry."""


@attrs.frozen
class StoredState:
    """An entity's stored snapshot."""

    payload: bytes
    """The encoded state (opaque to storage)."""
    version: int
    """1 for the first save, one more for each save after it."""
    epoch: int
    """The shard epoch of the write that stored it."""
    label: str | None = None
    """The label it was saved with (None: none)."""


@attrs.frozen
class StateWrite:
    """Replace one entity's snapshot (see `StateStorage.save_state`)."""

    address: EntityAddress
    """The entity; its shard is the one whose epoch fences the write."""
    epoch: int
    """Epoch under which the writer owns the shard (fencing)."""
    expected_version: int
    """The version this write replaces (0: nothing is stored)."""
    payload: bytes
    label: str | None = None
    """What the snapshot is listed and counted by (at most `MAX_LABEL`
    characters; None: no label)."""


@attrs.frozen
class StateQuery:
    """Which snapshots `StateStorage.list_states` and
    `StateStorage.count_states` read."""

    entity_type: str
    """The entity type; with ``prefix``, every entity type that starts with
    it (``""``: all of them)."""
    prefix: bool = False
    """Match ``entity_type`` as a prefix."""
    label: str | None = None
    """Only the snapshots with this label (None: any, or none)."""
    entity_id: str | None = None
    """Only the snapshots of entities with this id (None: any)."""


@attrs.frozen
class ListedState:
    """A snapshot as listed by `StateStorage.list_states`."""

    entity_type: str
    entity_id: str
    shard: ShardId
    """The shard of the write that stored it."""
    state: StoredState
    saved_at: float
    """The writer's clock when it was saved (Unix seconds)."""


@attrs.frozen
class StateCount:
    """How many snapshots of one entity type carry one label."""

    entity_type: str
    label: str | None
    count: int


class StateOutcome(enum.Enum):
    """What happened to one `StateWrite`."""

    SAVED = "saved"
    """Stored as version ``expected_version + 1``."""
    STALE_EPOCH = "stale_epoch"
    """Refused: the shard's epoch moved on (fencing); nothing changed."""
    CONFLICT = "conflict"
    """Refused: the stored version is not ``expected_version``; nothing
    changed."""


class StateStorage(ABC):
    """Durable entity state: the optional capability of a `MessageStorage`
    (see the module docstring)."""

    @abstractmethod
    async def load_state(self, address: EntityAddress) -> StoredState | None:
        """The stored snapshot of the entity at ``address`` (found by its
        type and id), or None.

        Raises:
            TypeError: ``address`` is not an `EntityAddress`.
            PersistenceError: storage failed.
        """

    @abstractmethod
    async def save_state(
        self,
        write: StateWrite,
        *,
        now: float,
        transaction: StorageTransaction | None = None,
    ) -> StateOutcome:
        """Replace an entity's snapshot, fenced by epoch and version (see
        `StateOutcome`); ``now`` is kept as the time of the save.

        With ``transaction``, the write takes effect when it commits, and
        the outcome is the one it will have if it does.

        Raises:
            TypeError, ValueError: a malformed write (nothing is stored).
            PersistenceError: storage failed.
        """

    async def save_states(
        self, writes: Sequence[StateWrite], *, now: float
    ) -> list[StateOutcome]:
        """Replace several entities' snapshots at once, outside any
        transaction (group commit): each write is fenced and versioned as by
        `save_state`, and stands alone (one refused changes nothing of the
        others); one outcome per write, in order. At most one write per
        entity. This default saves them one by one; backends write them
        in one statement.

        Raises:
            TypeError, ValueError: a malformed write, or two for one entity
                (nothing is stored).
            PersistenceError: storage failed (any of them may be stored).
        """
        return [await self.save_state(write, now=now) for write in writes]

    @abstractmethod
    async def delete_state(self, address: EntityAddress) -> bool:
        """Delete the snapshot of the entity at ``address``, unfenced (an
        operator's action, as `MessageStorage.clear_address`); whether one
        was stored."""

    @abstractmethod
    async def list_states(
        self,
        query: StateQuery,
        *,
        after: tuple[str, str] | None = None,
        limit: int,
    ) -> list[ListedState]:
        """Up to ``limit`` snapshots matching ``query``, in order of entity
        type then id (compared by code point: the order of Python's ``str``),
        starting after ``after`` (an ``(entity_type, entity_id)`` pair, the
        last one of the previous page). Committed snapshots only.

        Raises:
            TypeError, ValueError: a malformed argument.
            PersistenceError: storage failed.
        """

    @abstractmethod
    async def count_states(self, query: StateQuery) -> list[StateCount]:
        """How many snapshots match ``query``, per entity type and label, in
        order of entity type then label (None first); only the pairs that
        have some.

        Raises:
            TypeError, ValueError: a malformed argument.
            PersistenceError: storage failed.
        """
