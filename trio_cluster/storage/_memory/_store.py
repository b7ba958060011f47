"""The message "table" of `MemoryStorage`: requests, replies, notifications (edge adapter).

Theory of operation: `MessageStore` is the shared, in-memory message store of
one `MemoryStorage`. It is synchronous: the session views of `._messages`
run an operation's entry steps (fault hook, checkpoint, session checks) and
then call it without a checkpoint, so every operation is atomic. It checks
no arguments (`.._validation` did).

Requests are indexed by id, by dedup key and by address. While unprocessed,
a request also sits in its shard's `_ShardQueue`, in one of three states:
READY (in a heap ordered by save order), DELAYED (in a heap ordered by
``deliver_at``) or CLAIMED (claimed at the shard's current epoch, in no heap).
Claiming therefore touches only the requested shards' ready heads, and a
shard's claimed requests are made READY again only when its epoch changes.
Finished requests sit in one retention heap ordered by the ``now`` of their
final reply. Heaps drop entries of deleted requests lazily.

Notifications go to every open session's `Inbox`.

Fences: an open transaction that saved replies *holds* the fence of their
shards until it ends (`hold_fences`), the counterpart of PostgreSQL's share
lock on the shard row; an acquisition leaves such a shard out (`fenced`), so
a shard's epoch never moves under a write that is still to commit.
"""

from __future__ import annotations

import bisect
import collections
import enum
import heapq
from types import MappingProxyType
from typing import TYPE_CHECKING

import attrs
import trio

from trio_cluster._core._addresses import EntityAddress, EntityId
from trio_cluster._errors import StorageRefusedError
from trio_cluster._storage_abc import (
    ClaimBatch,
    ClaimedRequest,
    PersistedRequest,
    ReplyOutcome,
    ReplyQuery,
    ReplyRecord,
    SaveResult,
    StoredChunk,
    StoredReplies,
    StoredRequest,
)
from trio_cluster._storage_retries import DeadLetter, RetryRecord

from .._coalesce import Coalescer

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Sequence

    from trio_cluster._core._addresses import ShardId

__all__ = ["Inbox", "MessageStore"]


class _State(enum.Enum):
    READY = enum.auto()
    DELAYED = enum.auto()
    CLAIMED = enum.auto()
    PROCESSED = enum.auto()
    """Final reply recorded; in the retention heap."""
    GONE = enum.auto()
    """Deleted: any heap entry left for it is garbage."""


@attrs.define(eq=False)
class _Request:
    seq: int
    """Global save order (heap tie-breaker, so requests are never compared)."""
    request: PersistedRequest
    state: _State = _State.GONE
    claimed_epoch: int | None = None
    interrupted: bool = False
    chunks: dict[int, bytes] = attrs.Factory(dict)
    chunk_order: list[int] = attrs.Factory(list)
    """The keys of ``chunks``, sorted."""
    final: bytes | None = None
    acked_sequence: int = -1
    attempts: int = 0
    """Claims of it so far (saved claimed: one)."""
    last_error: str | None = None
    """What ended its previous attempt (`MessageStore.retry_later`)."""


@attrs.define(eq=False)
class _ShardQueue:
    """The unprocessed requests of one shard."""

    pending: dict[int, _Request] = attrs.Factory(dict)
    ready: list[tuple[int, _Request]] = attrs.Factory(list)
    delayed: list[tuple[float, int, _Request]] = attrs.Factory(list)

    def push(self, stored: _Request, state: _State) -> None:
        stored.state = state
        if state is _State.READY:
            heapq.heappush(self.ready, (stored.seq, stored))
        else:
            assert stored.request.deliver_at is not None
            heapq.heappush(
                self.delayed, (stored.request.deliver_at, stored.seq, stored)
            )

    def promote(self, now: float) -> None:
        """Move the delayed requests that are due to the ready heap."""
        while self.delayed and self.delayed[0][0] <= now:
            stored = heapq.heappop(self.delayed)[2]
            if stored.state is _State.DELAYED:
                self.push(stored, _State.READY)

    def head(self, now: float) -> int | None:
        """Save order of the first claimable request (dropping garbage)."""
        while self.ready:
            stored = self.ready[0][1]
            if stored.state is not _State.READY:
                heapq.heappop(self.ready)
            elif (
                stored.request.deliver_at is not None
                and stored.request.deliver_at > now
            ):
                # Promoted by a claimer whose clock is ahead of this one's.
                heapq.heappop(self.ready)
                self.push(stored, _State.DELAYED)
            else:
                return stored.seq
        return None

    def next_deliver_at(self) -> float | None:
        while self.delayed and self.delayed[0][2].state is not _State.DELAYED:
            heapq.heappop(self.delayed)
        return self.delayed[0][0] if self.delayed else None


class Inbox(Coalescer):
    """One session's pending notifications, coalesced by kind, and the
    parking lot its waiter sleeps in."""

    def __init__(self) -> None:
        super().__init__()
        self.lot = trio.lowlevel.ParkingLot()


class MessageStore:
    """The shared message "table" of one `MemoryStorage`.

    Args:
        epoch_of: the current fencing epoch of a shard (None if never acquired).
        inboxes: the inboxes of every open session, for notifications.
    """

    COMPACT_AFTER = 1024
    """Garbage entries in the retention heap before it may be rebuilt."""

    def __init__(
        self,
        *,
        epoch_of: Callable[[ShardId], int | None],
        inboxes: Callable[[], Iterable[Inbox]],
    ) -> None:
        self._epoch_of = epoch_of
        self._inboxes = inboxes
        self._requests: dict[int, _Request] = {}
        self._keys: dict[tuple[EntityAddress, str, str], _Request] = {}
        self._by_address: dict[EntityAddress, dict[int, _Request]] = {}
        self._queues: dict[ShardId, _ShardQueue] = {}
        self._processed: list[tuple[float, int, _Request]] = []
        self._garbage = 0
        self._seq = 0
        self._fences: collections.Counter[ShardId] = collections.Counter()
        self.dead_letters: dict[int, DeadLetter] = {}
        """Request id -> its dead letter."""

    # ------------------------------------------------------------------
    # Fences

    def hold_fences(self, shards: Iterable[ShardId]) -> None:
        """An open transaction saved replies under these shards' epochs."""
        self._fences.update(shards)

    def drop_fences(self, shards: Iterable[ShardId]) -> None:
        """That transaction ended (committed or rolled back)."""
        for shard in shards:
            self._fences[shard] -= 1
            if not self._fences[shard]:
                del self._fences[shard]

    def fenced(self, shard: ShardId) -> bool:
        """Whether an open transaction holds ``shard``'s fence."""
        return shard in self._fences

    def new_epoch(self, shard: ShardId) -> None:
        """``shard`` was acquired again: its claimed requests are claimable."""
        queue = self._queues.get(shard)
        if queue is not None:
            for stored in queue.pending.values():
                if stored.state is _State.CLAIMED:
                    queue.push(stored, _State.READY)

    # ------------------------------------------------------------------
    # Saving and claiming

    def save(
        self, requests: Sequence[PersistedRequest], now: float
    ) -> list[SaveResult]:
        results: list[SaveResult] = []
        saved_shards: dict[ShardId, None] = {}
        earliest: float | None = None
        for request in requests:
            original = self._original(request)
            if original is not None:
                results.append(self._duplicate(original, request))
                continue
            deliver_at = request.deliver_at
            due = deliver_at is None or deliver_at <= now
            claimed = (
                due
                and request.claim_epoch is not None
                and request.claim_epoch == self._epoch_of(request.address.shard)
            )
            self._store(request, claimed=claimed, due=due)
            results.append(
                SaveResult(request.request_id, duplicate=False, claimed=claimed)
            )
            if claimed:
                continue  # its sender delivers it: nobody need claim it
            saved_shards[request.address.shard] = None
            if deliver_at is not None and (earliest is None or deliver_at < earliest):
                earliest = deliver_at
        if saved_shards:
            self._notify(shards=list(saved_shards), deliver_at=earliest)
        return results

    def preview_saves(self, requests: Sequence[PersistedRequest]) -> list[SaveResult]:
        """The results `save` would give now (none saved claimed), changing
        nothing; a request that repeats an earlier one of ``requests`` (its
        id, or its address, tag and primary key) is its duplicate."""
        results: list[SaveResult] = []
        by_id: dict[int, int] = {}
        by_key: dict[tuple[EntityAddress, str, str], int] = {}
        for request in requests:
            original = self._original(request)
            if original is not None:
                results.append(self._duplicate(original, request))
                continue
            key = (
                None
                if request.primary_key is None
                else (request.address, request.tag, request.primary_key)
            )
            earlier = by_id.get(request.request_id)
            if earlier is None and key is not None:
                earlier = by_key.get(key)
            if earlier is not None:
                results.append(SaveResult(earlier, duplicate=True))
                continue
            by_id[request.request_id] = request.request_id
            if key is not None:
                by_key[key] = request.request_id
            results.append(SaveResult(request.request_id, duplicate=False))
        return results

    def _original(self, request: PersistedRequest) -> _Request | None:
        """The stored request ``request`` duplicates (same id, or same
        address, tag and primary key), if any."""
        original = self._requests.get(request.request_id)
        if original is None and request.primary_key is not None:
            original = self._keys.get(
                (request.address, request.tag, request.primary_key)
            )
        return original

    @staticmethod
    def _duplicate(original: _Request, request: PersistedRequest) -> SaveResult:
        # NOTE: a retry of the *same* request id with the same claim epoch gets
        # the answer the first attempt got, so a sender whose first attempt
        # timed out after committing still delivers the request itself.
        claimed = (
            original.request.request_id == request.request_id
            and original.state is _State.CLAIMED
            and original.claimed_epoch == request.claim_epoch
        )
        return SaveResult(
            original.request.request_id,
            duplicate=True,
            claimed=claimed,
            final_reply=original.final,
        )

    def _store(self, request: PersistedRequest, *, claimed: bool, due: bool) -> None:
        if request.metadata and type(request.metadata) is not MappingProxyType:
            # A copy: the saver may change its dict later.
            request = attrs.evolve(
                request, metadata=MappingProxyType(dict(request.metadata))
            )
        self._seq += 1
        stored = _Request(self._seq, request)
        self._requests[request.request_id] = stored
        if request.primary_key is not None:
            self._keys[request.address, request.tag, request.primary_key] = stored
        self._by_address.setdefault(request.address, {})[request.request_id] = stored
        queue = self._queues.get(request.address.shard)
        if queue is None:
            queue = self._queues[request.address.shard] = _ShardQueue()
        queue.pending[request.request_id] = stored
        if claimed:
            stored.state = _State.CLAIMED
            stored.claimed_epoch = request.claim_epoch
            stored.attempts = 1
        else:
            queue.push(stored, _State.READY if due else _State.DELAYED)

    def claim(self, shards: dict[ShardId, int], now: float, limit: int) -> ClaimBatch:
        stale: set[ShardId] = set()
        queues: list[tuple[_ShardQueue, int]] = []
        heads: list[tuple[int, int]] = []
        for shard, epoch in shards.items():
            if self._epoch_of(shard) != epoch:
                stale.add(shard)
                continue
            queue = self._queues.get(shard)
            if queue is None:  # the common case: nothing unprocessed
                continue
            queue.promote(now)
            head = queue.head(now)
            if head is not None:
                heads.append((head, len(queues)))
            queues.append((queue, epoch))
        # Merge the shards' ready heaps by save order: oldest first overall.
        heapq.heapify(heads)
        claimed: list[ClaimedRequest] = []
        while heads and len(claimed) < limit:
            index = heads[0][1]
            queue, epoch = queues[index]
            stored = heapq.heappop(queue.ready)[1]
            stored.state = _State.CLAIMED
            claimed_before = stored.claimed_epoch is not None
            stored.claimed_epoch = epoch
            stored.attempts += 1
            claimed.append(_claimed(stored, epoch, claimed_before=claimed_before))
            head = queue.head(now)
            if head is None:
                heapq.heappop(heads)
            else:
                heapq.heapreplace(heads, (head, index))
        upcoming = [
            at for queue, _ in queues if (at := queue.next_deliver_at()) is not None
        ]
        return ClaimBatch(
            requests=claimed,
            next_deliver_at=min(upcoming, default=None),
            stale_shards=frozenset(stale),
            more=bool(heads),
        )

    # ------------------------------------------------------------------
    # Replies

    def save_replies(
        self, replies: Sequence[ReplyRecord], now: float
    ) -> list[ReplyOutcome]:
        outcomes = [self._save_reply(reply, now) for reply in replies]
        recorded = [
            reply.request_id
            for reply, outcome in zip(replies, outcomes, strict=True)
            if outcome is ReplyOutcome.RECORDED and reply.notify
        ]
        if recorded:
            self._notify(reply_ids=recorded)
        return outcomes

    def preview_replies(self, replies: Sequence[ReplyRecord]) -> list[ReplyOutcome]:
        """The outcomes `save_replies` would give now, changing nothing."""
        outcomes: list[ReplyOutcome] = []
        seen: set[tuple[int, int | None]] = set()
        for reply in replies:
            outcome = self._check_reply(reply)
            key = (reply.request_id, reply.sequence)
            finished = (reply.request_id, None) in seen
            if outcome is ReplyOutcome.RECORDED and (key in seen or finished):
                outcome = ReplyOutcome.DUPLICATE
            if outcome is ReplyOutcome.RECORDED:
                seen.add(key)
            outcomes.append(outcome)
        return outcomes

    def _check_reply(self, reply: ReplyRecord) -> ReplyOutcome:
        """The outcome of saving ``reply`` now."""
        stored = self._requests.get(reply.request_id)
        if stored is None:
            return ReplyOutcome.UNKNOWN_REQUEST
        # A reply naming another shard than the request's does not prove
        # ownership of the request's shard: refuse it like a stale epoch.
        if (
            reply.shard != stored.request.address.shard
            or self._epoch_of(reply.shard) != reply.epoch
        ):
            return ReplyOutcome.STALE_EPOCH
        if stored.state is _State.PROCESSED:
            return ReplyOutcome.DUPLICATE
        if reply.sequence is not None and reply.sequence in stored.chunks:
            return ReplyOutcome.DUPLICATE
        return ReplyOutcome.RECORDED

    def _save_reply(self, reply: ReplyRecord, now: float) -> ReplyOutcome:
        outcome = self._check_reply(reply)
        if outcome is not ReplyOutcome.RECORDED:
            return outcome
        stored = self._requests[reply.request_id]
        if reply.sequence is None:
            self._unqueue(stored)
            stored.state = _State.PROCESSED
            stored.final = reply.payload
            heapq.heappush(self._processed, (now, stored.seq, stored))
            if reply.dead_letter is not None:
                self.dead_letters[reply.request_id] = _dead_letter(
                    stored, reply.dead_letter, now
                )
        else:
            stored.chunks[reply.sequence] = reply.payload
            bisect.insort(stored.chunk_order, reply.sequence)
        return outcome

    # ------------------------------------------------------------------
    # Retries and dead letters

    def retry_later(
        self, retries: Sequence[RetryRecord], now: float
    ) -> list[ReplyOutcome]:
        outcomes: list[ReplyOutcome] = []
        shards: dict[ShardId, None] = {}
        earliest: float | None = None
        for retry in retries:
            outcome = self._check_reply(
                ReplyRecord(retry.request_id, retry.shard, retry.epoch, b"")
            )
            outcomes.append(outcome)
            if outcome is not ReplyOutcome.RECORDED:
                continue
            stored = self._requests[retry.request_id]
            if retry.error is not None:
                stored.last_error = retry.error
            if not retry.started:
                stored.attempts = max(0, stored.attempts - 1)
            stored.claimed_epoch = None  # given back: claimable, unclaimed
            if retry.deliver_at is not None:
                stored.request = attrs.evolve(
                    stored.request, deliver_at=retry.deliver_at
                )
            at = stored.request.deliver_at
            due = at is None or at <= now
            self._queues[retry.shard].push(
                stored, _State.READY if due else _State.DELAYED
            )
            shards[retry.shard] = None
            if at is not None and (earliest is None or at < earliest):
                earliest = at
        if shards:
            self._notify(shards=list(shards), deliver_at=earliest)
        return outcomes

    def list_dead_letters(self, after_id: int | None, limit: int) -> list[DeadLetter]:
        ids = sorted(
            request_id
            for request_id in self.dead_letters
            if after_id is None or request_id > after_id
        )
        return [self.dead_letters[request_id] for request_id in ids[:limit]]

    def replay_dead_letter(
        self, request_id: int, new_request_id: int, now: float
    ) -> bool:
        """Raises `StorageRefusedError` if ``new_request_id`` is taken."""
        letter = self.dead_letters.get(request_id)
        if letter is None or letter.replayed_as is not None:
            return False
        if new_request_id in self._requests:
            raise StorageRefusedError(f"request id {new_request_id} is taken")
        address = EntityAddress(
            letter.entity_type, EntityId(letter.entity_id), letter.shard
        )
        request = PersistedRequest(
            request_id=new_request_id,
            address=address,
            tag=letter.tag,
            payload=letter.payload,
            metadata=letter.metadata,
        )
        self.save([request], now)
        self.dead_letters[request_id] = attrs.evolve(letter, replayed_as=new_request_id)
        return True

    def purge_dead_letters(self, request_ids: Sequence[int]) -> int:
        return sum(
            self.dead_letters.pop(request_id, None) is not None
            for request_id in set(request_ids)
        )

    def replies_for(self, queries: Sequence[ReplyQuery]) -> list[StoredReplies]:
        results: list[StoredReplies] = []
        for query in queries:
            stored = self._requests.get(query.request_id)
            if stored is None:
                results.append(StoredReplies(query.request_id, known=False))
                continue
            start = bisect.bisect_right(stored.chunk_order, query.after_sequence)
            chunks = [
                StoredChunk(seq, stored.chunks[seq])
                for seq in stored.chunk_order[start:]
            ]
            results.append(
                StoredReplies(
                    query.request_id,
                    known=True,
                    chunks=chunks,
                    final=stored.final,
                    acked_sequence=stored.acked_sequence,
                )
            )
        return results

    def ack_chunks(self, acks: Sequence[tuple[int, int]]) -> None:
        for request_id, sequence in acks:
            stored = self._requests.get(request_id)
            if stored is not None and sequence > stored.acked_sequence:
                stored.acked_sequence = sequence

    def interrupt(self, request_ids: Sequence[int]) -> None:
        ids: dict[int, None] = {}
        shards: dict[ShardId, None] = {}
        for request_id in request_ids:
            stored = self._requests.get(request_id)
            if stored is not None and stored.state is not _State.PROCESSED:
                stored.interrupted = True
                ids[request_id] = None
                shards[stored.request.address.shard] = None
        if ids:
            self._notify(shards=list(shards), interrupted=list(ids))

    def scan_unprocessed(self, after_id: int | None, limit: int) -> list[StoredRequest]:
        """The first ``limit`` unprocessed requests after ``after_id`` by id
        (one pass over the unprocessed requests, keeping ``limit`` of them)."""
        candidates = (
            stored
            for queue in self._queues.values()
            for request_id, stored in queue.pending.items()
            if after_id is None or request_id > after_id
        )
        page = heapq.nsmallest(
            limit, candidates, key=lambda stored: stored.request.request_id
        )
        return [_inspected(stored) for stored in page]

    # ------------------------------------------------------------------
    # Deletion

    def clear_address(self, address: EntityAddress) -> int:
        doomed = self._by_address.get(address, {})
        count = len(doomed)
        for stored in list(doomed.values()):
            self._delete(stored)
        self._compact()
        return count

    def delete_processed(self, older_than: float, limit: int) -> int:
        heap = self._processed
        count = 0
        while heap and count < limit:
            processed_at, _, stored = heap[0]
            if stored.state is not _State.PROCESSED:
                heapq.heappop(heap)
                self._garbage -= 1
            elif processed_at < older_than:
                heapq.heappop(heap)
                self._delete(stored)  # counts its (popped) entry as garbage
                self._garbage -= 1
                count += 1
            else:
                break
        return count

    def _unqueue(self, stored: _Request) -> None:
        shard = stored.request.address.shard
        queue = self._queues[shard]
        del queue.pending[stored.request.request_id]
        stored.state = _State.GONE
        if not queue.pending:
            del self._queues[shard]

    def _delete(self, stored: _Request) -> None:
        request = stored.request
        if stored.state is _State.PROCESSED:
            stored.state = _State.GONE
            self._garbage += 1
        else:
            self._unqueue(stored)
        del self._requests[request.request_id]
        if request.primary_key is not None:
            del self._keys[request.address, request.tag, request.primary_key]
        by_address = self._by_address[request.address]
        del by_address[request.request_id]
        if not by_address:
            del self._by_address[request.address]

    def _compact(self) -> None:
        """Rebuild the retention heap once it is mostly garbage."""
        if self._garbage > max(self.COMPACT_AFTER, len(self._processed) // 2):
            self._processed = [
                e for e in self._processed if e[2].state is _State.PROCESSED
            ]
            heapq.heapify(self._processed)
            self._garbage = 0

    def _notify(
        self,
        *,
        shards: Sequence[ShardId] = (),
        deliver_at: float | None = None,
        reply_ids: Sequence[int] = (),
        interrupted: Sequence[int] = (),
    ) -> None:
        for inbox in self._inboxes():
            if interrupted:
                inbox.add_interrupts(interrupted, shards)
            if shards:
                inbox.add_messages(shards, deliver_at)
            if reply_ids:
                inbox.add_replies(reply_ids)
            inbox.lot.unpark_all()


def _claimed(stored: _Request, epoch: int, *, claimed_before: bool) -> ClaimedRequest:
    request = stored.request
    return ClaimedRequest(
        request_id=request.request_id,
        address=request.address,
        tag=request.tag,
        payload=request.payload,
        primary_key=request.primary_key,
        deliver_at=request.deliver_at,
        stream=request.stream,
        interrupted=stored.interrupted,
        next_sequence=stored.chunk_order[-1] + 1 if stored.chunk_order else 0,
        epoch=epoch,
        claimed_before=claimed_before,
        metadata=request.metadata,
        attempts=stored.attempts,
        last_error=stored.last_error,
    )


def _dead_letter(stored: _Request, error: str, now: float) -> DeadLetter:
    request = stored.request
    return DeadLetter(
        request_id=request.request_id,
        shard=request.address.shard,
        entity_type=request.address.entity_type,
        entity_id=request.address.entity_id.value,
        tag=request.tag,
        payload=request.payload,
        primary_key=request.primary_key,
        attempts=stored.attempts,
        error=error,
        dead_at=now,
        metadata=request.metadata,
    )


def _inspected(stored: _Request) -> StoredRequest:
    request = stored.request
    return StoredRequest(
        request_id=request.request_id,
        shard=request.address.shard,
        entity_type=request.address.entity_type,
        entity_id=request.address.entity_id.value,
        tag=request.tag,
        payload=request.payload,
        deliver_at=request.deliver_at,
        stream=request.stream,
        claimed_epoch=stored.claimed_epoch,
        interrupted=stored.interrupted,
    )
