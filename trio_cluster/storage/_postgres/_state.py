"""Durable entity state on PostgreSQL (edge adapter).

Theory of operation: one row per entity in ``<prefix>_entity_state``
(`._schema`, version 5), keyed by entity type and id. A save is one
statement, in the caller's transaction or on a pooled connection:

* ``fence`` locks the shard's row ``FOR SHARE``, as the replies statements
  do: an acquisition (which updates the row) waits for the transaction that
  wrote under the old epoch to end, and a write that waited for an
  acquisition reads the new epoch and is refused (``s``);
* ``current`` locks the entity's row, if any (``FOR UPDATE``), and a write
  whose expected version is not the stored one is refused (``c``);
* otherwise the row is inserted or updated to the next version. Two first
  saves racing (no row to lock yet) meet in ``ON CONFLICT``, whose update
  applies only at the expected version: the loser writes nothing and is
  reported as a conflict.

The batch form (``save_many``) does the same per row, each row's shard and
entity row found and locked by a lookup of its own (a ``LATERAL`` subquery),
in the order of (type, id) so that two batches lock the rows they share in
the same order: a join with the table, in a generic plan made while the
table was small (and kept until it is next analyzed), would read all of it
for every batch.

Listings and counts (since version 8, with ``label``) select the entity
types as a range in ``"C"`` collation (code-point order, as Python's
``str``), which the ``(entity_type, label, entity_id)`` index serves: an
exact type is ``[t, t || chr(1))``, a prefix ``p`` is ``[p, successor(p))``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import attrs

from trio_cluster._core._addresses import ShardId
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
from ._message_parts import any_work

if TYPE_CHECKING:
    from collections.abc import Sequence

    from trio_cluster._core._addresses import EntityAddress
    from trio_cluster._storage_abc import StorageTransaction

    from ._message_parts import PgTransaction
    from ._schema import PgNames

__all__ = ["PgStates", "StateQueries"]

_OUTCOMES = {
    "v": StateOutcome.SAVED,
    "s": StateOutcome.STALE_EPOCH,
    "c": StateOutcome.CONFLICT,
}


def _successor(prefix: str) -> str | None:
    """The least string greater than every string that starts with
    ``prefix`` (None: there is none, for ``""``)."""
    chars = list(prefix)
    while chars:
        last = ord(chars.pop())
        if last < 0x10FFFF:
            following = last + 1 if last + 1 != 0xD800 else 0xE000  # no surrogates
            return "".join(chars) + chr(following)
    return None


def type_range(query: StateQuery) -> tuple[str, str | None]:
    """``(lowest, bound)``: the entity types ``query`` selects are
    ``lowest <= type < bound`` in code-point order (no bound: None)."""
    if query.prefix:
        return query.entity_type, _successor(query.entity_type)
    # No text holds NUL: nothing sorts between t and t + chr(1) but t.
    return query.entity_type, query.entity_type + "\x01"


_UPSERT = """ON CONFLICT (entity_type, entity_id) DO UPDATE SET
        shard_group = EXCLUDED.shard_group,
        shard_number = EXCLUDED.shard_number,
        epoch = EXCLUDED.epoch,
        version = EXCLUDED.version,
        payload = EXCLUDED.payload,
        saved_at = EXCLUDED.saved_at,
        label = EXCLUDED.label"""
"""The update of a saved snapshot's row (the single and the batched save)."""


@attrs.frozen
class StateQueries:
    """The durable-state statements of one cluster."""

    load: str
    save: str
    save_many: str
    delete: str
    table: str
    """The entity-state table (listings and counts are composed per query:
    `selection`)."""

    @classmethod
    def build(cls, names: PgNames) -> StateQueries:
        t, s = names.entity_state, names.shards
        return cls(
            load=f"""
SELECT payload, version, epoch, label FROM {t}
WHERE entity_type = $1::text AND entity_id = $2::text""",
            # $1 type, $2 id, $3 group, $4 number, $5 epoch, $6 expected
            # version, $7 payload, $8 now, $9 label
            save=f"""
WITH fence AS MATERIALIZED (
    SELECT sh.epoch FROM {s} sh
    WHERE sh.shard_group = $3::text AND sh.shard_number = $4::int4
    FOR SHARE OF sh
), current AS MATERIALIZED (
    SELECT st.version FROM {t} st
    WHERE st.entity_type = $1::text AND st.entity_id = $2::text
    FOR UPDATE OF st
), verdict AS MATERIALIZED (
    SELECT CASE
        WHEN (SELECT epoch FROM fence) IS DISTINCT FROM $5::int8 THEN 's'
        WHEN coalesce((SELECT version FROM current), 0) <> $6::int8 THEN 'c'
        ELSE 'v' END AS status
), written AS (
    INSERT INTO {t} AS st (entity_type, entity_id, shard_group, shard_number,
                           epoch, version, payload, saved_at, label)
    SELECT $1::text, $2::text, $3::text, $4::int4, $5::int8, $6::int8 + 1,
           $7::bytea, $8::float8, $9::text
    FROM verdict WHERE status = 'v'
    {_UPSERT}
    WHERE st.version = $6::int8
    RETURNING 1
)
SELECT CASE WHEN status = 'v' AND NOT EXISTS (SELECT 1 FROM written)
            THEN 'c' ELSE status END
FROM verdict""",
            # Arrays $1 types, $2 ids, $3 groups, $4 numbers, $5 epochs, $6
            # expected versions, $7 payloads, $8 labels; $9 now.
            save_many=f"""
WITH input AS MATERIALIZED (
    SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::int4[],
                         $5::int8[], $6::int8[], $7::bytea[], $8::text[])
        WITH ORDINALITY AS i(t, id, g, n, e, v, p, l, ord)
    ORDER BY t, id
), verdict AS MATERIALIZED (
    SELECT i.t, i.id, i.g, i.n, i.e, i.v, i.p, i.l, i.ord, CASE
        WHEN f.epoch IS DISTINCT FROM i.e THEN 's'
        WHEN coalesce(c.version, 0) <> i.v THEN 'c'
        ELSE 'v' END AS status
    FROM input i
    LEFT JOIN LATERAL (
        SELECT sh.epoch FROM {s} sh
        WHERE sh.shard_group = i.g AND sh.shard_number = i.n
        FOR SHARE OF sh
    ) f ON true
    LEFT JOIN LATERAL (
        SELECT st.version FROM {t} st
        WHERE st.entity_type = i.t AND st.entity_id = i.id
        FOR UPDATE OF st
    ) c ON true
), written AS (
    INSERT INTO {t} AS st (entity_type, entity_id, shard_group, shard_number,
                           epoch, version, payload, saved_at, label)
    SELECT t, id, g, n, e, v + 1, p, $9::float8, l FROM verdict
    WHERE status = 'v'
    {_UPSERT}
    WHERE st.version = EXCLUDED.version - 1
    RETURNING st.entity_type, st.entity_id
)
SELECT CASE WHEN v.status = 'v' AND NOT EXISTS (
           SELECT 1 FROM written w
           WHERE w.entity_type = v.t AND w.entity_id = v.id)
       THEN 'c' ELSE v.status END
FROM verdict v ORDER BY v.ord""",
            delete=f"""
DELETE FROM {t} WHERE entity_type = $1::text AND entity_id = $2::text
RETURNING 1""",
            table=t,
        )


def selection(
    query: StateQuery, after: tuple[str, str] | None = None
) -> tuple[str, list[object]]:
    """The ``WHERE`` conditions of a listing or count, and their parameters.

    Only the conditions ``query`` (and ``after``) need are written, each
    with its own parameter, so that a prepared statement's generic plan
    reads the ``(entity_type, label, entity_id)`` index (a condition like
    ``$3 IS NULL OR label = $3`` would make it scan the table); the texts
    are few (one per combination of the optional filters).
    """
    lowest, bound = type_range(query)
    conditions = ['entity_type COLLATE "C" >= $1::text']
    params: list[object] = [lowest]

    def param(value: object) -> str:
        params.append(value)
        return f"${len(params)}::text"

    if bound is not None:
        conditions.append(f'entity_type COLLATE "C" < {param(bound)}')
    if query.label is not None:
        conditions.append(f'label COLLATE "C" = {param(query.label)}')
    if query.entity_id is not None:
        conditions.append(f"entity_id = {param(query.entity_id)}")
    if after is not None:
        after_type, after_id = param(after[0]), param(after[1])
        conditions.append(
            f'(entity_type COLLATE "C" > {after_type}'
            f' OR (entity_type COLLATE "C" = {after_type}'
            f' AND entity_id COLLATE "C" > {after_id}))'
        )
    return " AND ".join(conditions), params


class PgStates(StateStorage):
    """The `StateStorage` part of `._messages.PgMessages` (mixed in): it
    runs its statements with the session's ``_rows`` and ``_execute``, and
    checks transactions with ``_mine``."""

    _sq: StateQueries

    async def _rows(
        self, query: str, params: Sequence[object], transaction: PgTransaction | None
    ) -> list[tuple[Any, ...]]:
        raise NotImplementedError  # pragma: no cover - PgMessages has it

    def _mine(self, transaction: StorageTransaction) -> PgTransaction:
        raise NotImplementedError  # pragma: no cover - PgMessages has it

    async def load_state(self, address: EntityAddress) -> StoredState | None:
        address = check_clear_address(address)
        rows = await self._rows(
            self._sq.load, [address.entity_type, address.entity_id.value], None
        )
        if not rows:
            return None
        payload, version, epoch, label = rows[0]
        return StoredState(
            payload=bytes(payload), version=version, epoch=epoch, label=label
        )

    async def save_state(
        self,
        write: StateWrite,
        *,
        now: float,
        transaction: StorageTransaction | None = None,
    ) -> StateOutcome:
        write, now = check_state_write(write, now)
        mine = None if transaction is None else self._mine(transaction)
        address = write.address
        params: list[object] = [
            address.entity_type,
            address.entity_id.value,
            address.shard.group,
            address.shard.number,
            write.epoch,
            write.expected_version,
            write.payload,
            now,
            write.label,
        ]
        [(status,)] = await self._rows(self._sq.save, params, mine)
        return _OUTCOMES[status]

    async def save_states(
        self, writes: Sequence[StateWrite], *, now: float
    ) -> list[StateOutcome]:
        checked, now = check_state_writes(writes, now)
        if not await any_work(checked):
            return []
        addresses = [write.address for write in checked]
        params: list[object] = [
            [a.entity_type for a in addresses],
            [a.entity_id.value for a in addresses],
            [a.shard.group for a in addresses],
            [a.shard.number for a in addresses],
            [write.epoch for write in checked],
            [write.expected_version for write in checked],
            [write.payload for write in checked],
            [write.label for write in checked],
            now,
        ]
        rows = await self._rows(self._sq.save_many, params, None)
        return [_OUTCOMES[status] for (status,) in rows]

    async def delete_state(self, address: EntityAddress) -> bool:
        address = check_clear_address(address)
        rows = await self._rows(
            self._sq.delete,
            [address.entity_type, address.entity_id.value],
            None,
        )
        return bool(rows)

    async def list_states(
        self,
        query: StateQuery,
        *,
        after: tuple[str, str] | None = None,
        limit: int,
    ) -> list[ListedState]:
        query, after, limit = check_list_states(query, after, limit)
        where, params = selection(query, after)
        params.append(limit)
        rows = await self._rows(
            f"""
SELECT entity_type, entity_id, shard_group, shard_number, epoch, version,
       payload, label, saved_at
FROM {self._sq.table}
WHERE {where}
ORDER BY entity_type COLLATE "C", entity_id COLLATE "C"
LIMIT ${len(params)}::int8""",
            params,
            None,
        )
        return [
            ListedState(
                entity_type=entity_type,
                entity_id=entity_id,
                shard=ShardId(group, number),
                state=StoredState(
                    payload=bytes(payload), version=version, epoch=epoch, label=label
                ),
                saved_at=saved_at,
            )
            for (
                entity_type,
                entity_id,
                group,
                number,
                epoch,
                version,
                payload,
                label,
                saved_at,
            ) in rows
        ]

    async def count_states(self, query: StateQuery) -> list[StateCount]:
        query = check_state_query(query)
        where, params = selection(query)
        rows = await self._rows(
            f"""
SELECT entity_type, label, count(*) FROM {self._sq.table}
WHERE {where}
GROUP BY entity_type, label
ORDER BY entity_type COLLATE "C", label COLLATE "C" NULLS FIRST""",
            params,
            None,
        )
        return [StateCount(entity_type, label, n) for entity_type, label, n in rows]
