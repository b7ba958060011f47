"""The storage a simulated cluster's runners see: the real `MemoryStorage`,
observed (test support, edge adapter).

`ObservedStorage` implements `trio_cluster.abc.Storage` by forwarding every
call to a `MemoryStorage` and, when the call returns, handing the request and
its result to the `Checker`. A memory operation does all its work after its
last checkpoint and returns without another one, so the checker sees each
result at the very instant it took effect, before any other task runs: it can
compare it with the backend's current state (epochs, locks) exactly.

Each session is bound to the `Incarnation` of the runner that opened it
(which hears of the runner's served shards as its `RunnerListener`).
"""

from __future__ import annotations

from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import TYPE_CHECKING, Any

import attrs

from trio_cluster.abc import (
    MessageStorage,
    RunnerStorage,
    StateStorage,
    Storage,
    StorageSession,
)
from trio_cluster.storage import MemoryStorage

from ._invariants import Checker, Incarnation

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Collection, Mapping, Sequence

    from trio_cluster import DeadLetter, EntityAddress, ShardId
    from trio_cluster.abc import (
        ClaimBatch,
        ListedState,
        Notification,
        PersistedRequest,
        ReplyOutcome,
        ReplyQuery,
        ReplyRecord,
        RetryRecord,
        RunnerInfo,
        SaveResult,
        ShardOwner,
        StateCount,
        StateOutcome,
        StateQuery,
        StateWrite,
        StorageTransaction,
        StoredReplies,
        StoredRequest,
        StoredState,
    )


__all__ = ["ObservedStorage"]


@attrs.define(eq=False)
class ObservedStorage(Storage):
    """A `MemoryStorage` whose every call is checked by a `Checker`.

    Args:
        inner: the shared memory storage.
        checker: receives every call's request and result.
    """

    inner: MemoryStorage
    _checker: Checker
    next_incarnation: dict[str, Incarnation] = attrs.field(init=False, factory=dict)
    """Set by the cluster before a runner starts: the incarnation that
    the session named after its address belongs to."""

    def open_session(
        self, *, name: str, lease_duration: float
    ) -> AbstractAsyncContextManager[StorageSession]:
        inner = self.inner.open_session(name=name, lease_duration=lease_duration)
        return self._session(name, inner)

    @asynccontextmanager
    async def _session(
        self, name: str, inner: AbstractAsyncContextManager[StorageSession]
    ) -> AsyncIterator[StorageSession]:
        incarnation = self.next_incarnation[name]
        async with inner as session:
            yield StorageSession(
                messages=_Messages(session.messages, self._checker, incarnation),
                runners=_Runners(session.runners, self._checker, incarnation),
                # The event log is not traced by the checker: passed through.
                events=session.events,
            )


@attrs.define(eq=False)
class _Messages(MessageStorage, StateStorage):
    _inner: MessageStorage
    _checker: Checker
    _by: Incarnation
    _in_transactions: dict[int, list[tuple[list[Any], list[Any]]]] = attrs.field(
        init=False, factory=dict
    )
    """Replies saved in each open transaction (by its id), told to the
    checker when it commits."""
    _states_in_transactions: dict[int, list[tuple[Any, Any]]] = attrs.field(
        init=False, factory=dict
    )
    """Durable states saved in each open transaction, likewise."""

    @property
    def notifications_lossless(self) -> bool:  # type: ignore[override]
        return self._inner.notifications_lossless

    # Durable entity state: forwarded (the memory backend keeps it).

    def _states(self) -> StateStorage:
        assert isinstance(self._inner, StateStorage)
        return self._inner

    async def load_state(self, address: EntityAddress) -> StoredState | None:
        return await self._states().load_state(address)

    async def save_state(
        self,
        write: StateWrite,
        *,
        now: float,
        transaction: StorageTransaction | None = None,
    ) -> StateOutcome:
        outcome = await self._states().save_state(
            write, now=now, transaction=transaction
        )
        if transaction is None:
            self._checker.states_saved(self._by, [write], [outcome])
        else:  # in effect at commit: told then (`open_transaction`)
            self._states_in_transactions.setdefault(id(transaction), []).append(
                (write, outcome)
            )
        return outcome

    async def delete_state(self, address: EntityAddress) -> bool:
        return await self._states().delete_state(address)

    async def list_states(
        self,
        query: StateQuery,
        *,
        after: tuple[str, str] | None = None,
        limit: int,
    ) -> list[ListedState]:
        return await self._states().list_states(query, after=after, limit=limit)

    async def count_states(self, query: StateQuery) -> list[StateCount]:
        return await self._states().count_states(query)

    async def save_requests(
        self,
        requests: Sequence[PersistedRequest],
        *,
        now: float,
        transaction: StorageTransaction | None = None,
    ) -> list[SaveResult]:
        results = await self._inner.save_requests(
            requests, now=now, transaction=transaction
        )
        if transaction is None:
            # NOTE: requests saved in a transaction exist at commit; the
            # simulator does not follow them (its probes use none).
            self._checker.saved(self._by, requests, results)
        return results

    async def claim(
        self, shards: Mapping[ShardId, int], *, now: float, limit: int
    ) -> ClaimBatch:
        batch = await self._inner.claim(shards, now=now, limit=limit)
        self._checker.claimed(self._by, shards, batch)
        return batch

    async def save_replies(
        self,
        replies: Sequence[ReplyRecord],
        *,
        now: float,
        transaction: StorageTransaction | None = None,
    ) -> list[ReplyOutcome]:
        outcomes = await self._inner.save_replies(
            replies, now=now, transaction=transaction
        )
        if transaction is None:
            self._checker.replies_saved(self._by, replies, outcomes)
        else:
            # Replies written in a transaction take effect at commit: the
            # checker hears of them then (`open_transaction`).
            self._in_transactions.setdefault(id(transaction), []).append(
                (list(replies), outcomes)
            )
        return outcomes

    @asynccontextmanager
    async def open_transaction(self) -> AsyncIterator[StorageTransaction]:
        async with self._inner.open_transaction() as transaction:
            try:
                yield transaction
            except BaseException:
                self._in_transactions.pop(id(transaction), None)
                self._states_in_transactions.pop(id(transaction), None)
                raise
        # Committed: the memory backend applied its replies with no
        # checkpoint since, so the checker sees them as they took effect.
        for replies, outcomes in self._in_transactions.pop(id(transaction), []):
            self._checker.replies_saved(self._by, replies, outcomes)
        states = self._states_in_transactions.pop(id(transaction), [])
        if states:
            self._checker.states_saved(
                self._by, [w for w, _ in states], [o for _, o in states]
            )

    async def replies_for(self, queries: Sequence[ReplyQuery]) -> list[StoredReplies]:
        return await self._inner.replies_for(queries)

    async def ack_chunks(self, acks: Sequence[tuple[int, int]]) -> None:
        await self._inner.ack_chunks(acks)

    async def interrupt(self, request_ids: Sequence[int]) -> None:
        await self._inner.interrupt(request_ids)

    async def clear_address(self, address: EntityAddress) -> int:
        count = await self._inner.clear_address(address)
        self._checker.cleared(address)
        return count

    async def delete_processed(self, *, older_than: float, limit: int) -> int:
        return await self._inner.delete_processed(older_than=older_than, limit=limit)

    async def scan_unprocessed(
        self, *, after_id: int | None = None, limit: int
    ) -> list[StoredRequest]:
        return await self._inner.scan_unprocessed(after_id=after_id, limit=limit)

    async def retry_later(
        self, retries: Sequence[RetryRecord], *, now: float
    ) -> list[ReplyOutcome]:
        return await self._inner.retry_later(retries, now=now)

    async def dead_letters(
        self, *, after_id: int | None = None, limit: int
    ) -> list[DeadLetter]:
        return await self._inner.dead_letters(after_id=after_id, limit=limit)

    async def replay_dead_letter(
        self, request_id: int, *, new_request_id: int, now: float
    ) -> bool:
        return await self._inner.replay_dead_letter(
            request_id, new_request_id=new_request_id, now=now
        )

    async def purge_dead_letters(self, request_ids: Sequence[int]) -> int:
        return await self._inner.purge_dead_letters(request_ids)

    async def wait_notifications(self) -> list[Notification]:
        return await self._inner.wait_notifications()


@attrs.define(eq=False)
class _Runners(RunnerStorage):
    _inner: RunnerStorage
    _checker: Checker
    _by: Incarnation

    async def register(self, runner: RunnerInfo) -> int:
        return await self._inner.register(runner)

    async def unregister(self) -> None:
        await self._inner.unregister()

    async def live_runners(self) -> list[RunnerInfo]:
        return await self._inner.live_runners()

    async def acquire(self, shards: Collection[ShardId]) -> dict[ShardId, int]:
        epochs = await self._inner.acquire(shards)
        self._checker.acquired(self._by, epochs)
        return epochs

    async def refresh(self, shards: Collection[ShardId]) -> set[ShardId]:
        held = await self._inner.refresh(shards)
        self._checker.refreshed(self._by, list(shards), held)
        return held

    async def refresh_and_list(
        self, shards: Collection[ShardId]
    ) -> tuple[set[ShardId], list[RunnerInfo]]:
        held, live = await self._inner.refresh_and_list(shards)
        self._checker.refreshed(self._by, list(shards), held)
        return held, live

    async def release(self, shards: Collection[ShardId]) -> None:
        await self._inner.release(shards)
        self._checker.released(self._by, list(shards))

    async def release_all(self) -> None:
        await self._inner.release_all()

    async def wait_session_lost(self) -> None:
        await self._inner.wait_session_lost()

    async def shard_owners(self) -> list[ShardOwner]:
        return await self._inner.shard_owners()
