"""The session view of `MemoryStorage`'s messages and its transactions (edge adapter).

Theory of operation: each session gets a `MemoryMessages` view on the shared
`MessageStore` (`._store`). An operation checks its arguments
(`.._validation`), runs the session's entry steps (fault hook, checkpoint,
session checks) and then calls the store synchronously, so every operation
is atomic. A `MemoryTransaction` buffers the replies (and durable states,
`._state`) saved in it and applies them to the store, without a checkpoint,
when it commits; until it ends it holds the fences of their shards (`MessageStore.hold_fences`), so no
acquisition moves their epochs before the commit.
"""

from __future__ import annotations

from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

import trio

from trio_cluster._errors import PersistenceError
from trio_cluster._storage_abc import MessageStorage, StorageTransaction

from .._validation import (
    check_ack_chunks,
    check_claim,
    check_clear_address,
    check_dead_letters,
    check_delete_processed,
    check_interrupt,
    check_purge_dead_letters,
    check_replay_dead_letter,
    check_replies_for,
    check_retry_later,
    check_save_replies,
    check_save_requests,
    check_scan_unprocessed,
    check_transaction,
    check_transactional_saves,
)
from ._state import MemoryStates, StateTable
from ._store import MessageStore

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence

    from trio_cluster._core._addresses import EntityAddress, ShardId
    from trio_cluster._storage_abc import (
        ClaimBatch,
        Notification,
        PersistedRequest,
        ReplyOutcome,
        ReplyQuery,
        ReplyRecord,
        SaveResult,
        StoredReplies,
        StoredRequest,
    )
    from trio_cluster._storage_retries import DeadLetter, RetryRecord
    from trio_cluster._storage_state import ListedState

    from ._store import Inbox

__all__ = ["MemoryMessages", "MemoryTransaction", "MessageStore"]


class MemoryMessages(MessageStorage, MemoryStates):
    """One session's `MessageStorage` view on a `MessageStore`, with its
    durable entity state (`MemoryStates`).

    Args:
        store: the shared store.
        states: the shared snapshots of durable entity state.
        enter: runs the entry steps of an operation (fault hook, checkpoint,
            session checks), given the operation's name.
        inbox: this session's notifications.
        check_open: raises if the session ended (used after waking up).
    """

    notifications_lossless = True  # in memory: none is ever lost

    def __init__(
        self,
        store: MessageStore,
        *,
        states: StateTable,
        enter: Callable[[str], Awaitable[None]],
        inbox: Inbox,
        check_open: Callable[[], None],
    ) -> None:
        self._store = store
        self._states = states
        self._enter = enter
        self._inbox = inbox
        self._check_open = check_open

    async def save_requests(
        self,
        requests: Sequence[PersistedRequest],
        *,
        now: float,
        transaction: StorageTransaction | None = None,
    ) -> list[SaveResult]:
        checked, now = check_save_requests(requests, now)
        if transaction is None:
            await self._enter("save_requests")
            return self._store.save(checked, now)
        mine = check_transaction(transaction, MemoryTransaction, self._store)
        check_transactional_saves(checked)
        await self._enter("save_requests")
        mine.check_usable()
        # Preview against everything this transaction saves, so a duplicate
        # within the transaction is reported as such.
        earlier = [request for batch, _ in mine.saves for request in batch]
        mine.saves.append((checked, now))
        return self._store.preview_saves(earlier + checked)[len(earlier) :]

    async def claim(
        self, shards: Mapping[ShardId, int], *, now: float, limit: int
    ) -> ClaimBatch:
        checked, now, limit = check_claim(shards, now, limit)
        await self._enter("claim")
        return self._store.claim(checked, now, limit)

    async def save_replies(
        self,
        replies: Sequence[ReplyRecord],
        *,
        now: float,
        transaction: StorageTransaction | None = None,
    ) -> list[ReplyOutcome]:
        checked, now = check_save_replies(replies, now)
        await self._enter("save_replies")
        if transaction is None:
            return self._store.save_replies(checked, now)
        mine = check_transaction(transaction, MemoryTransaction, self._store)
        mine.check_usable()
        shards = {reply.shard for reply in checked} - mine.fences
        mine.fences |= shards
        self._store.hold_fences(shards)
        # Preview against everything this transaction saves, so a duplicate
        # within the transaction is reported as such.
        earlier = [reply for batch, _ in mine.pending for reply in batch]
        mine.pending.append((checked, now))
        return self._store.preview_replies(earlier + checked)[len(earlier) :]

    @asynccontextmanager
    async def open_transaction(self) -> AsyncIterator[StorageTransaction]:
        await self._enter("open_transaction")
        transaction = MemoryTransaction(self._store, enter=self._enter)
        try:
            try:
                yield transaction
            finally:
                transaction.finished = True
            # Commit: check, then apply the buffered saves, replies and the
            # other parts' writes (the event log) atomically (no checkpoint
            # between), under the fences held since they were saved.
            for check in transaction.commit_checks:
                check()
            for requests, now in transaction.saves:
                self._store.save(requests, now)
            for replies, now in transaction.pending:
                self._store.save_replies(replies, now)
            self._states.apply(transaction.states)
            for action in transaction.commit_actions:
                action()
        finally:
            self._store.drop_fences(transaction.fences)

    async def replies_for(self, queries: Sequence[ReplyQuery]) -> list[StoredReplies]:
        checked = check_replies_for(queries)
        await self._enter("replies_for")
        return self._store.replies_for(checked)

    async def ack_chunks(self, acks: Sequence[tuple[int, int]]) -> None:
        checked = check_ack_chunks(acks)
        await self._enter("ack_chunks")
        self._store.ack_chunks(checked)

    async def interrupt(self, request_ids: Sequence[int]) -> None:
        checked = check_interrupt(request_ids)
        await self._enter("interrupt")
        self._store.interrupt(checked)

    async def clear_address(self, address: EntityAddress) -> int:
        address = check_clear_address(address)
        await self._enter("clear_address")
        self._states.delete(address)
        return self._store.clear_address(address)

    def _mine(self, transaction: StorageTransaction) -> MemoryTransaction:
        return check_transaction(transaction, MemoryTransaction, self._store)

    async def delete_processed(self, *, older_than: float, limit: int) -> int:
        older_than, limit = check_delete_processed(older_than, limit)
        await self._enter("delete_processed")
        return self._store.delete_processed(older_than, limit)

    async def scan_unprocessed(
        self, *, after_id: int | None = None, limit: int
    ) -> list[StoredRequest]:
        after_id, limit = check_scan_unprocessed(after_id, limit)
        await self._enter("scan_unprocessed")
        return self._store.scan_unprocessed(after_id, limit)

    async def retry_later(
        self, retries: Sequence[RetryRecord], *, now: float
    ) -> list[ReplyOutcome]:
        checked, now = check_retry_later(retries, now)
        await self._enter("retry_later")
        return self._store.retry_later(checked, now)

    async def dead_letters(
        self, *, after_id: int | None = None, limit: int
    ) -> list[DeadLetter]:
        after_id, limit = check_dead_letters(after_id, limit)
        await self._enter("dead_letters")
        return self._store.list_dead_letters(after_id, limit)

    async def replay_dead_letter(
        self, request_id: int, *, new_request_id: int, now: float
    ) -> bool:
        request_id, new_request_id, now = check_replay_dead_letter(
            request_id, new_request_id, now
        )
        await self._enter("replay_dead_letter")
        return self._store.replay_dead_letter(request_id, new_request_id, now)

    async def purge_dead_letters(self, request_ids: Sequence[int]) -> int:
        checked = check_purge_dead_letters(request_ids)
        await self._enter("purge_dead_letters")
        return self._store.purge_dead_letters(checked)

    async def wait_notifications(self) -> list[Notification]:
        await self._enter("wait_notifications")
        # Cancellation can only strike while parked, before anything is taken.
        while not self._inbox.kinds:
            await self._inbox.lot.park()
            self._check_open()
        return self._inbox.take()


class MemoryTransaction(StorageTransaction):
    """A transaction on memory storage: requests and replies saved in it are
    applied when it commits, and the fences of its replies' shards are held
    until it ends. It has no
    SQL: `execute` raises `PersistenceError`, after the entry steps of an
    operation named ``"execute"`` (so the fault hook can make it fail as
    storage would: that failure is the transaction's `failure`)."""

    def __init__(
        self, store: MessageStore, *, enter: Callable[[str], Awaitable[None]]
    ) -> None:
        self.owner = store
        """The store it commits to (`check_transaction` compares it)."""
        self.pending: list[tuple[list[ReplyRecord], float]] = []
        """The replies saved in it, applied at commit."""
        self.saves: list[tuple[list[PersistedRequest], float]] = []
        """The requests saved in it (its outbox), applied at commit."""
        self.fences: set[ShardId] = set()
        """The shards whose fences it holds (those of its replies, durable
        states and cursor moves)."""
        self.states: dict[tuple[str, str], ListedState] = {}
        """The durable states saved in it by entity type and id, applied at
        commit (`._state`)."""
        self.commit_checks: list[Callable[[], None]] = []
        """Run first at commit; one raising `PersistenceError` rolls the
        whole transaction back (e.g. a cursor moved meanwhile)."""
        self.commit_actions: list[Callable[[], None]] = []
        """Applied at commit after its saves, replies and states (the event
        log)."""
        self.finished = False
        self._enter = enter

    def check_usable(self) -> None:
        if self.finished:
            raise trio.ClosedResourceError("the transaction is already finished")

    async def execute(
        self, query: str, params: Sequence[object] = ()
    ) -> list[tuple[Any, ...]]:
        try:
            await self._enter("execute")
        except PersistenceError as exc:  # storage failed, not the statement
            if self.failure is None:
                self.failure = exc
            raise
        raise PersistenceError(
            "MemoryStorage has no SQL; run transactional handlers that execute"
            " statements on a SQL backend such as trio_cluster.storage.PostgresStorage"
        )

    @asynccontextmanager
    async def savepoint(self) -> AsyncIterator[None]:
        """Remember what the transaction holds; if the block raises, drop
        what it saved since (requests, replies, states, the event log's
        writes and checks). Fences taken meanwhile stay held until the
        transaction ends (harmless: they only hold off acquisitions)."""
        self.check_usable()
        await trio.lowlevel.checkpoint()
        marks = (
            len(self.pending),
            len(self.saves),
            len(self.commit_checks),
            len(self.commit_actions),
        )
        states = dict(self.states)
        try:
            yield
        except BaseException:
            del self.pending[marks[0] :]
            del self.saves[marks[1] :]
            del self.commit_checks[marks[2] :]
            del self.commit_actions[marks[3] :]
            self.states.clear()
            self.states.update(states)
            raise
