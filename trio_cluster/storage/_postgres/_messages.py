"""The PostgreSQL `MessageStorage`: durable requests and replies (edge adapter).

Theory of operation: every call validates its arguments with the contract's
checks (`.._validation`, the same as every backend's), borrows a connection of the session's pool, and runs *one*
statement (`._queries`) whatever the batch size. Only the parts of the
contract that a statement cannot express cheaply are done here:

* duplicates *within* a `save_requests` batch (same request id, or same
  address, tag and primary key as an earlier item) are resolved before the
  statement, which then only sees first occurrences, and answered from the
  first occurrence's result, as `MemoryStorage` would;
* a request saved concurrently by another session can be invisible to the
  statement's snapshot although it blocks our insert; such items are saved
  again (a new statement sees the winner as the original).
* a claimed row that cannot be read back as a `ClaimedRequest` (an entity
  id that is no valid `EntityId`, written by hand or by another program) is
  reported in `ClaimBatch.unreadable`, never raised: one such row would
  otherwise fail every claim of its shards, on every restart.

The dedup hash, the reply-outcome rules and the transaction of
transactional handlers are in `._message_parts`; retries and the dead
letters (`DeadLetterStorage`) in `._dead_letters`, but for dead-lettering
itself, which the save-replies statements do with the final reply.

Errors: the driver's `PgError`/`ConnectionLostError` are `PersistenceError`
subclasses (with the psycopg error as ``__cause__``); a call on a closed
session raises ``trio.ClosedResourceError``. A connection that broke is
replaced by the pool on the next call.
"""

from __future__ import annotations

import json
import logging
from contextlib import AsyncExitStack, asynccontextmanager
from typing import TYPE_CHECKING, Any

import attrs

from trio_cluster._core._addresses import EntityAddress, EntityId, ShardId
from trio_cluster._errors import (
    ClusterError,
    InvalidIdError,
    MalformedMessageError,
    PersistenceError,
)
from trio_cluster._storage_abc import (
    ClaimBatch,
    ClaimedRequest,
    MessageStorage,
    Notification,
    PersistedRequest,
    ReplyOutcome,
    ReplyQuery,
    ReplyRecord,
    SaveResult,
    StorageTransaction,
    StoredChunk,
    StoredReplies,
    StoredRequest,
    UnreadableRequest,
)

from .._validation import (
    check_ack_chunks,
    check_claim,
    check_clear_address,
    check_delete_processed,
    check_interrupt,
    check_replies_for,
    check_save_replies,
    check_save_requests,
    check_scan_unprocessed,
    check_transaction,
    check_transactional_saves,
)
from ._dead_letters import PgDeadLetters
from ._driver._pool import PgPool
from ._message_parts import (
    PgTransaction,
    any_work,
    dedup_key,
    reply_outcomes,
    stored_metadata,
)
from ._notify import Listener
from ._queries import MessageQueries
from ._state import PgStates, StateQueries

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Mapping, Sequence

    from trio_cluster._storage_retries import DeadLetter, RetryRecord

    from ._driver._driver import PgResult
    from ._driver._pool import PgPoolStatistics

__all__ = ["PgMessages"]

log = logging.getLogger("trio_cluster.storage.postgres")

_SAVE_ATTEMPTS = 5
_MIN_BIGINT = -(2**63)
_MAX_BIGINT = 2**63 - 1


@attrs.define(eq=False, kw_only=True)
class PgMessages(MessageStorage, PgStates):
    """One session's `MessageStorage` on PostgreSQL, with its durable entity
    state (`PgStates`).

    Args:
        pool: the session's connection pool for message traffic.
        transaction_pool: the pool of `open_transaction` (separate, so that
            slow transactional handlers never starve message traffic).
        queries: the statements of the cluster.
        listener: the session's LISTEN connection.
        channel: the NOTIFY channel.
        owner: identifies the `PostgresStorage` (transactions must come from it).
        dead_letters: runs the `DeadLetterStorage` methods (on ``pool``).
        state_queries: the statements of durable entity state.
    """

    notifications_lossless = True  # a lost LISTEN connection says so

    _pool: PgPool
    _transaction_pool: PgPool
    _q: MessageQueries = attrs.field(alias="queries")
    _listener: Listener
    _channel: str
    _owner: object
    _dead_letters: PgDeadLetters
    _sq: StateQueries = attrs.field(alias="state_queries")
    _shard_ids: dict[tuple[str, int], ShardId] = attrs.field(init=False, factory=dict)

    def statistics(self) -> PgPoolStatistics:
        """The message pool's counters (statements and round trips included)."""
        return self._pool.statistics()

    def transaction_statistics(self) -> PgPoolStatistics:
        """The transaction pool's counters."""
        return self._transaction_pool.statistics()

    async def _execute(self, query: str, params: Sequence[object]) -> PgResult:
        return await self._pool.execute(query, params)

    async def _rows(
        self, query: str, params: Sequence[object], transaction: PgTransaction | None
    ) -> list[tuple[Any, ...]]:
        if transaction is None:
            return (await self._execute(query, params)).rows
        return await transaction.execute_internal(query, params)

    def _mine(self, transaction: StorageTransaction) -> PgTransaction:
        return check_transaction(transaction, PgTransaction, self._owner)

    def _shard(self, group: str, number: int) -> ShardId:
        key = (group, number)
        shard = self._shard_ids.get(key)
        if shard is None:
            shard = self._shard_ids[key] = ShardId(group, number)
        return shard

    # ------------------------------------------------------------------
    # Saving

    async def save_requests(
        self,
        requests: Sequence[PersistedRequest],
        *,
        now: float,
        transaction: StorageTransaction | None = None,
    ) -> list[SaveResult]:
        checked, now = check_save_requests(requests, now)
        mine = None
        if transaction is not None:
            mine = check_transaction(transaction, PgTransaction, self._owner)
            check_transactional_saves(checked)
        if not await any_work(checked):
            return []
        keys = [dedup_key(request) for request in checked]
        first = [0] if len(checked) == 1 else _first_occurrences(checked, keys)
        sent = sorted(set(first))
        # Per first occurrence: (inserted, original id, current claim epoch, final).
        outcome: dict[int, tuple[bool, int, int | None, bytes | None]] = {}
        pending = sent
        for _ in range(_SAVE_ATTEMPTS):
            rows = await self._save_rows(
                [checked[i] for i in pending], pending, keys, now, mine
            )
            inserted = {row[2]: row[3] for row in rows if row[0] == 0}
            for ord_ in pending:
                request_id = checked[ord_].request_id
                if request_id in inserted:
                    outcome[ord_] = (True, request_id, inserted[request_id], None)
            retry = []
            for kind, ord_, original, claimed_epoch, final in rows:
                if kind != 1 or ord_ in outcome:
                    continue
                if original is not None:
                    outcome[ord_] = (False, original, claimed_epoch, final)
                else:  # blocked by a concurrent save our snapshot cannot see
                    retry.append(ord_)
            if not retry:
                break
            pending = sorted(retry)
        else:
            raise PersistenceError(
                f"saving {len(pending)} request(s) conflicted with concurrent saves"
                f" {_SAVE_ATTEMPTS} times in a row"
            )
        results: list[SaveResult] = []
        for index, request in enumerate(checked):
            stored, original, claimed_epoch, final = outcome[first[index]]
            duplicate = not stored or first[index] != index
            claimed = (
                claimed_epoch is not None
                and original == request.request_id
                and claimed_epoch == request.claim_epoch
            )
            results.append(
                SaveResult(
                    original,
                    duplicate=duplicate,
                    claimed=claimed,
                    final_reply=final if duplicate else None,
                )
            )
        return results

    async def _save_rows(
        self,
        requests: list[PersistedRequest],
        ords: list[int],
        keys: list[bytes | None],
        now: float,
        transaction: PgTransaction | None,
    ) -> list[tuple[Any, ...]]:
        """The rows of one save statement (on ``transaction``'s connection,
        if given)."""
        if len(requests) == 1 and self._q.save_one is not None:  # no arrays
            (request,) = requests
            address = request.address
            # The columns both single-row statements take first.
            head: list[object] = [
                request.request_id,
                address.shard.group,
                address.shard.number,
                address.entity_type,
                address.entity_id.value,
                request.tag,
                request.payload,
                request.primary_key,
                keys[ords[0]],
            ]
            plain = self._q.save_claimed
            if (
                plain is not None
                and request.claim_epoch is not None
                and request.deliver_at is None
            ):
                rows = await self._rows(
                    plain,
                    [
                        *head,
                        request.stream,
                        request.claim_epoch,
                        now,
                        _metadata_text(request),
                    ],
                    transaction,
                )
                if rows:  # inserted claimed; else `save_one` decides
                    return rows
            one: list[object] = [
                *head,
                None if request.deliver_at is None else float(request.deliver_at),
                request.stream,
                request.claim_epoch,
                ords[0],
                now,
                self._channel,
                _metadata_text(request),
            ]
            return await self._rows(self._q.save_one, one, transaction)
        addresses = [request.address for request in requests]
        params: list[object] = [
            [request.request_id for request in requests],
            [address.shard.group for address in addresses],
            [address.shard.number for address in addresses],
            [address.entity_type for address in addresses],
            [address.entity_id.value for address in addresses],
            [request.tag for request in requests],
            [request.payload for request in requests],
            [request.primary_key for request in requests],
            [keys[i] for i in ords],
            [
                None if request.deliver_at is None else float(request.deliver_at)
                for request in requests
            ],
            [request.stream for request in requests],
            [request.claim_epoch for request in requests],
            ords,
            now,
            self._channel,
            [_metadata_text(request) for request in requests],
        ]
        return await self._rows(self._q.save, params, transaction)

    # ------------------------------------------------------------------
    # Claiming

    async def claim(
        self, shards: Mapping[ShardId, int], *, now: float, limit: int
    ) -> ClaimBatch:
        checked, now, limit = check_claim(shards, now, limit)
        if not await any_work(checked):
            return ClaimBatch(requests=[], next_deliver_at=None)
        order = list(checked)
        params: list[object] = [
            [shard.group for shard in order],
            [shard.number for shard in order],
            [checked[shard] for shard in order],
            now,
            min(limit, 2**31 - 2),
        ]
        rows = (await self._execute(self._q.claim, params)).rows
        claimed: list[tuple[int, ClaimedRequest]] = []
        unreadable: list[UnreadableRequest] = []
        stale: set[ShardId] = set()
        next_deliver_at: float | None = None
        more = False
        for row in rows:
            kind = row[0]
            if kind == 0:
                try:
                    claimed.append((row[2], self._claimed(row)))
                except (TypeError, ValueError) as exc:  # InvalidIdError included
                    unreadable.append(self._unreadable(row, exc))
            elif kind == 1:
                stale.add(self._shard(row[3], row[4]))
            else:
                next_deliver_at, more = row[10], bool(row[11])
        claimed.sort(key=lambda pair: pair[0])
        return ClaimBatch(
            requests=[request for _, request in claimed],
            next_deliver_at=next_deliver_at,
            stale_shards=frozenset(stale),
            more=more,
            unreadable=unreadable,
        )

    def _claimed(self, row: tuple[Any, ...]) -> ClaimedRequest:
        (_, request_id, _, group, number, entity_type, entity_id, tag, payload) = row[
            :9
        ]
        (primary_key, deliver_at, stream, interrupted, next_sequence, epoch) = row[9:15]
        return ClaimedRequest(
            request_id=request_id,
            address=EntityAddress(
                entity_type, EntityId(entity_id), self._shard(group, number)
            ),
            tag=tag,
            payload=payload,
            primary_key=primary_key,
            deliver_at=deliver_at,
            stream=stream,
            interrupted=interrupted,
            next_sequence=next_sequence,
            epoch=epoch,
            claimed_before=bool(row[15]),
            metadata=stored_metadata(row[16]),
            attempts=row[17],
            last_error=row[18],
        )

    def _unreadable(self, row: tuple[Any, ...], exc: Exception) -> UnreadableRequest:
        """A claimed row `_claimed` could not read (see `ClaimBatch.unreadable`)."""
        request_id, group, number, epoch = row[1], row[3], row[4], row[14]
        error: ClusterError = (
            exc
            if isinstance(exc, InvalidIdError)
            else MalformedMessageError(
                what=f"stored request {request_id}", problems=[str(exc)]
            )
        )
        log.error("stored request %d cannot be read: %s", request_id, error)
        return UnreadableRequest(
            request_id=request_id,
            shard=self._shard(group, number),
            epoch=epoch,
            error=error,
        )

    # ------------------------------------------------------------------
    # Replies

    async def save_replies(
        self,
        replies: Sequence[ReplyRecord],
        *,
        now: float,
        transaction: StorageTransaction | None = None,
    ) -> list[ReplyOutcome]:
        checked, now = check_save_replies(replies, now)
        mine = None
        if transaction is not None:
            mine = check_transaction(transaction, PgTransaction, self._owner)
        if not await any_work(checked):
            return []
        one = self._q.save_reply_one
        if len(checked) == 1 and one is not None:  # no arrays
            (reply,) = checked
            if await self._saved_final(reply, now, mine):
                return [ReplyOutcome.RECORDED]
            query = one
            params: list[object] = [
                *_reply_head(reply),
                reply.sequence,
                now,
                self._channel,
                reply.dead_letter,
            ]
        else:
            query = self._q.save_replies
            params = self._reply_arrays(checked, now)
        if mine is None:
            rows = (await self._execute(query, params)).rows
        else:
            rows = await mine.execute_internal(query, params)
        statuses: list[str] = ["d"] * len(checked)
        written: set[tuple[int, int | None]] = set()
        for kind, number, status, sequence in rows:
            if kind == 0:
                statuses[number] = status
            elif kind == 1:
                written.add((number, sequence))
        return reply_outcomes(checked, statuses, written)

    async def _saved_final(
        self, reply: ReplyRecord, now: float, transaction: PgTransaction | None
    ) -> bool:
        """Whether the plain statement of a final reply without a dead letter
        (`._one_row.save_final_reply`) recorded ``reply``; False for any
        other reply, and when it wrote nothing (`save_reply_one` decides)."""
        plain = self._q.save_final_reply
        if plain is None or reply.sequence is not None or reply.dead_letter is not None:
            return False
        params: list[object] = [*_reply_head(reply), now, self._channel, reply.notify]
        return bool(await self._rows(plain, params, transaction))

    def _reply_arrays(self, checked: Sequence[ReplyRecord], now: float) -> list[object]:
        """The batch ``save_replies`` statement's parameters."""
        return [
            list(range(len(checked))),
            [reply.request_id for reply in checked],
            [reply.shard.group for reply in checked],
            [reply.shard.number for reply in checked],
            [reply.epoch for reply in checked],
            [reply.payload for reply in checked],
            [reply.sequence for reply in checked],
            now,
            self._channel,
            [reply.dead_letter for reply in checked],
            any(reply.notify for reply in checked),
        ]

    @asynccontextmanager
    async def open_transaction(self) -> AsyncIterator[StorageTransaction]:
        """Open a transaction on a connection of the transaction pool (see
        `MessageStorage`); waits (cancellably) while every one is in use.

        The connection is taken, and ``BEGIN`` runs, at the transaction's
        first statement (`PgTransaction.begin`): a handler's code that runs
        outside it (a workflow's plain steps) holds no connection meanwhile.
        The block's normal exit commits (a failed ``COMMIT`` raises
        `PersistenceError`; nothing to commit if no statement ran); an
        exception or cancellation rolls back (shielded, bounded) and
        propagates. The connection goes back to the pool afterwards.
        """
        async with AsyncExitStack() as stack:
            transaction = PgTransaction(self._transaction_pool, self._owner, stack)
            try:
                yield transaction
            finally:
                transaction.finished = True

    async def replies_for(self, queries: Sequence[ReplyQuery]) -> list[StoredReplies]:
        checked = check_replies_for(queries)
        if not await any_work(checked):
            return []
        params: list[object] = [
            list(range(len(checked))),
            [query.request_id for query in checked],
            [query.after_sequence for query in checked],
        ]
        rows = (await self._execute(self._q.replies_for, params)).rows
        results: list[StoredReplies] = [
            StoredReplies(q.request_id, known=False) for q in checked
        ]
        for ord_, known, acked, final, sequences, payloads in rows:
            if not known:
                continue
            chunks = [
                StoredChunk(sequence, payload)
                for sequence, payload in zip(
                    sequences or (), payloads or (), strict=True
                )
            ]
            results[ord_] = StoredReplies(
                checked[ord_].request_id,
                known=True,
                chunks=chunks,
                final=final,
                acked_sequence=acked,
            )
        return results

    async def ack_chunks(self, acks: Sequence[tuple[int, int]]) -> None:
        checked = check_ack_chunks(acks)
        if not await any_work(checked):
            return
        params = [[a[0] for a in checked], [a[1] for a in checked]]
        await self._execute(self._q.ack_chunks, params)

    async def interrupt(self, request_ids: Sequence[int]) -> None:
        checked = check_interrupt(request_ids)
        if not await any_work(checked):
            return
        await self._execute(self._q.interrupt, [checked, self._channel])

    async def clear_address(self, address: EntityAddress) -> int:
        address = check_clear_address(address)
        params = [
            address.entity_id.value,
            address.entity_type,
            address.shard.group,
            address.shard.number,
        ]
        return (await self._execute(self._q.clear_address, params)).rowcount

    async def delete_processed(self, *, older_than: float, limit: int) -> int:
        older_than, limit = check_delete_processed(older_than, limit)
        if not await any_work(limit):
            return 0
        params = [older_than, limit]
        return (await self._execute(self._q.delete_processed, params)).rowcount

    async def scan_unprocessed(
        self, *, after_id: int | None = None, limit: int
    ) -> list[StoredRequest]:
        after_id, limit = check_scan_unprocessed(after_id, limit)
        if not await any_work(limit) or (after_id or 0) >= _MAX_BIGINT:
            return []
        params: list[object] = [
            _MIN_BIGINT if after_id is None else max(after_id + 1, _MIN_BIGINT),
            limit,
        ]
        rows = (await self._execute(self._q.scan_unprocessed, params)).rows
        return [
            StoredRequest(
                request_id=request_id,
                shard=self._shard(group, number),
                entity_type=entity_type,
                entity_id=entity_id,
                tag=tag,
                payload=payload,
                deliver_at=deliver_at,
                stream=stream,
                claimed_epoch=claimed_epoch,
                interrupted=interrupted,
            )
            for (
                request_id,
                group,
                number,
                entity_type,
                entity_id,
                tag,
                payload,
                deliver_at,
                stream,
                claimed_epoch,
                interrupted,
            ) in rows
        ]

    # ------------------------------------------------------------------
    # Retries and dead letters (`._dead_letters`)

    async def retry_later(
        self, retries: Sequence[RetryRecord], *, now: float
    ) -> list[ReplyOutcome]:
        return await self._dead_letters.retry_later(retries, now=now)

    async def dead_letters(
        self, *, after_id: int | None = None, limit: int
    ) -> list[DeadLetter]:
        return await self._dead_letters.dead_letters(after_id=after_id, limit=limit)

    async def replay_dead_letter(
        self, request_id: int, *, new_request_id: int, now: float
    ) -> bool:
        return await self._dead_letters.replay_dead_letter(
            request_id, new_request_id=new_request_id, now=now
        )

    async def purge_dead_letters(self, request_ids: Sequence[int]) -> int:
        return await self._dead_letters.purge_dead_letters(request_ids)

    async def wait_notifications(self) -> list[Notification]:
        return await self._listener.wait()


def _metadata_text(request: PersistedRequest) -> str | None:
    """A request's call metadata as stored (JSON text, NULL for none)."""
    if not request.metadata:
        return None
    return json.dumps(dict(request.metadata), ensure_ascii=False)


def _reply_head(reply: ReplyRecord) -> list[object]:
    """The parameters both single-row reply statements take first."""
    return [
        reply.request_id,
        reply.shard.group,
        reply.shard.number,
        reply.epoch,
        reply.payload,
    ]


def _first_occurrences(
    requests: Sequence[PersistedRequest], keys: Sequence[bytes | None]
) -> list[int]:
    """Duplicates within a batch: per item, the index of its first occurrence
    (same request id, or same dedup key)."""
    first: list[int] = []
    by_id: dict[int, int] = {}
    by_key: dict[bytes, int] = {}
    for index, (request, key) in enumerate(zip(requests, keys, strict=True)):
        earlier = by_id.get(request.request_id)
        if earlier is None and key is not None:
            earlier = by_key.get(key)
        if earlier is None:
            earlier = index
            by_id[request.request_id] = index
            if key is not None:
                by_key[key] = index
        first.append(earlier)
    return first
