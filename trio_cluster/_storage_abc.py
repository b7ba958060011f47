"""The storage contract: records and ABCs every backend implements (interface).

Two services make up a backend, both opened per runner through
`Storage.open_session`:

* `MessageStorage`: the durable mailbox. Persisted requests are saved
  (deduplicated by address, handler and primary key), *claimed* by the owner of
  their shard, answered with replies (stream chunks, then one final reply), and
  eventually deleted by retention.
* `RunnerStorage`: the runner registry and the shard leases. A runner's session
  holds its shard locks; when the session ends (clean close, crash, lapsed
  lease), the locks are freed. Each acquisition of a shard increments the
  shard's **fencing epoch**.

Fencing: writes that depend on owning a shard (claiming messages, saving
replies, claiming on save) carry the epoch under which the shard was acquired,
and the backend refuses them when the shard's epoch has moved on. A runner that
lost its shard can therefore never record a reply over its successor. The
check is strict: no write under an epoch takes effect after the acquisition
that moved the shard past it (a write racing the acquisition either takes
effect first or is refused; an acquisition leaves out a shard whose epoch a
write still to commit depends on, e.g. one saved in an open transaction).

Every method is batch-first, so a backend can turn a batch into one statement;
the runner coalesces concurrent callers into batches (group commit). Payloads
are opaque bytes: storage never sees user types.

Times are wall-clock seconds since the Unix epoch as floats, from the runner's
clock (which may be virtual in tests), passed in explicitly.

Errors: a backend raises `PersistenceError` (with the driver's exception as
``__cause__``) for any storage failure; no driver exception type escapes.
Misuse (an argument of the wrong type or value) raises `TypeError` /
`ValueError` before anything is stored: every backend checks its arguments
with the contract's checks, one ``check_<operation>`` per method in
`trio_cluster.storage._validation`, so the messages are the same whatever
the backend. A write the backend refuses for the data it carries (a value it
cannot hold, a violated constraint) raises `StorageRefusedError` (a
`PersistenceError`), again with nothing of the batch stored. For both, the
runtime writes the batch's items apart, so that only the item at fault
fails; a plain `PersistenceError` fails the whole batch.
"""

from __future__ import annotations

import enum
from abc import ABC, abstractmethod
from collections.abc import Mapping
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

import attrs

from ._core._addresses import EntityAddress, RunnerAddress, ShardId
from ._errors import ClusterError, PersistenceError
from ._storage_events import EventStorage
from ._storage_retries import DeadLetterStorage

if TYPE_CHECKING:
    from collections.abc import Collection, Sequence
    from contextlib import AbstractAsyncContextManager


__all__ = [
    "ClaimBatch",
    "ClaimedRequest",
    "MessageStorage",
    "MessagesAvailable",
    "Notification",
    "NotificationsMissed",
    "PersistedRequest",
    "RepliesAvailable",
    "ReplyOutcome",
    "ReplyQuery",
    "ReplyRecord",
    "RequestsInterrupted",
    "RunnerInfo",
    "RunnerStorage",
    "RunnersChanged",
    "SaveResult",
    "ShardOwner",
    "Storage",
    "StorageSession",
    "StorageTransaction",
    "StoredChunk",
    "StoredReplies",
    "StoredRequest",
    "UnreadableRequest",
]


# --------------------------------------------------------------------------
# Message records


@attrs.frozen
class PersistedRequest:
    """A persisted request as the sender stores it."""

    request_id: int
    """Snowflake id chosen by the sender; unique cluster-wide."""
    address: EntityAddress
    tag: str
    """Handler name on the entity type (its wire name)."""
    payload: bytes
    """The encoded message."""
    primary_key: str | None = None
    """Dedup key. Two requests with the same address, tag and primary key are
    the same request: the second is not stored (see `SaveResult`)."""
    deliver_at: float | None = None
    """Do not deliver before this wall-clock time (seconds since the epoch)."""
    stream: bool = False
    """A stream request: replies are numbered chunks, then one final reply."""
    claim_epoch: int | None = None
    """Fast path: the sender owns the shard at this epoch and will deliver the
    request itself, so store it already claimed. If the epoch is stale the
    request is stored unclaimed and `SaveResult.claimed` is False. Ignored when
    ``deliver_at`` is in the future relative to ``now``."""
    metadata: Mapping[str, str] = attrs.field(default=MappingProxyType({}), hash=False)
    """The call metadata the request carries (`trio_cluster.with_metadata`,
    and the tracer's trace context): stored with it and handed back by
    `MessageStorage.claim`, so the handler sees it whichever runner claims
    the request. At most 34 entries of str to str, 5120 characters of keys
    and values in all; a backend refuses other values (``ValueError``)."""


@attrs.frozen
class SaveResult:
    """Outcome of saving one `PersistedRequest`."""

    request_id: int
    """The id of the stored request: the sender's own id, or for a duplicate,
    the id of the original request."""
    duplicate: bool
    """An earlier request had the same address, tag and primary key."""
    claimed: bool = False
    """The request was stored claimed at the sender's ``claim_epoch``."""
    final_reply: bytes | None = None
    """For a duplicate whose original is finished: its final reply."""


@attrs.frozen
class ClaimedRequest:
    """A request handed to the owner of its shard by `MessageStorage.claim`."""

    request_id: int
    address: EntityAddress
    tag: str
    payload: bytes
    primary_key: str | None
    deliver_at: float | None
    stream: bool
    interrupted: bool
    """Its sender asked for it to be interrupted: record an interrupted reply
    without running it."""
    next_sequence: int
    """For streams: the number of chunks already recorded (resume point)."""
    epoch: int
    """The epoch it was claimed under."""
    claimed_before: bool = False
    """It had been claimed (or saved claimed) under an earlier epoch and is
    claimed again unfinished: an earlier delivery did not finish (a failover,
    a restart, a shard that moved with work still queued)."""
    metadata: Mapping[str, str] = attrs.field(default=MappingProxyType({}), hash=False)
    """The `PersistedRequest.metadata` it was saved with."""
    attempts: int = 1
    """Its attempts so far, this one included: one per claim, or save
    claimed (see `trio_cluster._storage_retries`)."""
    last_error: str | None = None
    """What ended its previous attempt, if `retry_later` recorded it."""


@attrs.frozen
class ClaimBatch:
    """Result of one claim."""

    requests: list[ClaimedRequest]
    """In storage order: per entity, the order the requests were saved in."""
    next_deliver_at: float | None
    """Earliest ``deliver_at`` after ``now`` of an unprocessed request in the
    claimed shards, for the owner's timer; None if there is none."""
    stale_shards: frozenset[ShardId] = frozenset()
    """Shards skipped because the given epoch is no longer current."""
    more: bool = False
    """The batch hit ``limit``: claim again soon."""
    unreadable: list[UnreadableRequest] = attrs.field(factory=list)
    """Requests claimed (like those of ``requests``) whose stored fields
    cannot be read back as a `ClaimedRequest`, e.g. an entity id that is not
    a valid `EntityId`. The claimer answers each with its ``error`` as the
    final reply; a backend never raises for one bad row."""


@attrs.frozen
class UnreadableRequest:
    """A claimed request that cannot be read back (see
    `ClaimBatch.unreadable`): enough to record its final reply."""

    request_id: int
    shard: ShardId
    epoch: int
    """The epoch it was claimed under."""
    error: ClusterError
    """What is wrong with it: `InvalidIdError` for an entity id, else
    `MalformedMessageError`. Recorded as its reply."""


@attrs.frozen
class ReplyRecord:
    """A reply to record: a stream chunk (``sequence`` set) or the final reply."""

    request_id: int
    shard: ShardId
    epoch: int
    """Epoch under which the replying runner owns the shard (fencing)."""
    payload: bytes
    sequence: int | None = None
    """Chunk number (0, 1, ...) of a stream; None for the final reply."""
    dead_letter: str | None = None
    """For a final reply: dead-letter the request with this error text (at
    most `MAX_ERROR_TEXT` characters) as its last error. If the reply is
    recorded, a `DeadLetter` copy of the request is stored with it, in the
    same write (see `trio_cluster._storage_retries`), replacing one stored
    under the same request id (its id reused after retention)."""
    notify: bool = True
    """False: nobody but the recording runner waits for this reply (a
    request without a primary key, saved claimed by its caller's runner,
    whose reply that runner records itself), so its `RepliesAvailable` may
    be left out. A hint, as every notification is: a backend may send it
    anyway."""


class ReplyOutcome(enum.Enum):
    """What happened to one `ReplyRecord`."""

    RECORDED = "recorded"
    DUPLICATE = "duplicate"
    """A final reply (or that chunk) was already recorded; nothing changed."""
    STALE_EPOCH = "stale_epoch"
    """Refused: the shard's epoch moved on (fencing)."""
    UNKNOWN_REQUEST = "unknown_request"
    """No such request (deleted by `clear_address` or retention)."""


@attrs.frozen
class ReplyQuery:
    """Ask for the replies of one request, chunks after ``after_sequence``."""

    request_id: int
    after_sequence: int = -1


@attrs.frozen
class StoredChunk:
    """One stored item of a reply (a stream's items, before its final reply)."""

    sequence: int
    """The item's position in the reply, from 0."""
    payload: bytes
    """The encoded item."""


@attrs.frozen
class StoredReplies:
    """The recorded replies of one request."""

    request_id: int
    known: bool
    """False if storage has no such request (never saved, or deleted)."""
    chunks: list[StoredChunk] = attrs.field(factory=list)
    final: bytes | None = None
    acked_sequence: int = -1
    """highest chunk sequence acknowledged with ack_chunks, -1 if none"""


@attrs.frozen
class StoredRequest:
    """An unprocessed request as `MessageStorage.scan_unprocessed` reads it
    back, for inspection: the stored fields as they are, so that a row no
    `EntityAddress` can be made of (written by hand or by another program)
    is reported rather than refused."""

    request_id: int
    shard: ShardId
    entity_type: str
    entity_id: str
    """The stored entity id, unchecked."""
    tag: str
    payload: bytes
    deliver_at: float | None
    stream: bool
    claimed_epoch: int | None
    """The epoch it was last claimed at (being handled, or to be claimed
    again by the shard's next owner); None if it was never claimed."""
    interrupted: bool


# Notifications: hints that something changed; delivery is best effort and
# every consumer must also work from polling.


@attrs.frozen
class MessagesAvailable:
    """Requests were saved unclaimed (or interrupted) in these shards: their
    owner should claim.

    Requests stored already claimed (`SaveResult.claimed`: their sender owns
    the shard and delivers them itself) and duplicates cause no
    notification: nobody needs to claim them, and an owner woken for them
    would only run a claim that finds nothing."""

    shards: frozenset[ShardId]
    deliver_at: float | None = None
    """Earliest ``deliver_at`` among them, if any had one."""


@attrs.frozen
class RepliesAvailable:
    """Replies were recorded for these requests."""

    request_ids: frozenset[int]


@attrs.frozen
class RequestsInterrupted:
    """Senders asked for these requests to be interrupted."""

    request_ids: frozenset[int]
    shards: frozenset[ShardId]


@attrs.frozen
class RunnersChanged:
    """A runner registered, registered again (say, to leave) or
    unregistered: the live runners are worth reading again now. A runner
    whose session ended (a killed process) is not announced: each lease
    refresh lists the live runners (`RunnerStorage.refresh_and_list`)."""


@attrs.frozen
class NotificationsMissed:
    """Notifications may have been lost before this one (the backend's
    channel to the database was down meanwhile): whatever they could have
    said must be read again (every served shard claimed, every awaited reply
    fetched). Only backends whose `MessageStorage.notifications_lossless` is
    true send it: then it is the only way a notification is ever lost."""


Notification = (
    MessagesAvailable
    | RepliesAvailable
    | RequestsInterrupted
    | RunnersChanged
    | NotificationsMissed
)


class StorageTransaction(ABC):
    """A storage transaction, given to transactional handlers through
    ``trio_cluster.current_transaction()``: the handler's own writes commit
    atomically with its reply."""

    failure: PersistenceError | None = None
    """Set by the backend when a statement of this transaction failed because
    of storage rather than because of the statement: the connection was lost,
    or the server aborted the transaction (a serialization failure, a
    deadlock, a shutdown). The transaction can then never commit, and running
    the handler again may well succeed: the runtime retries the request, as
    after a failed commit, whatever the handler did with the error, instead
    of recording the handler's outcome as its reply. A statement that is
    itself at fault (a syntax error, a violated constraint) leaves it None:
    the handler's error is its outcome, like any bug in a handler."""

    @abstractmethod
    async def execute(
        self, query: str, params: Sequence[object] = ()
    ) -> list[tuple[Any, ...]]:
        """Run one SQL statement (``$1``-style parameters) in the transaction
        and return its rows (an empty list for statements without rows).

        Raises:
            PersistenceError: the statement failed (the transaction is then
                rolled back at the end of the handler; if storage was at
                fault, `failure` is set), or this backend has no SQL.
        """

    def savepoint(self) -> AbstractAsyncContextManager[None]:
        """A savepoint: what the block writes in the transaction (SQL through
        `execute`, requests saved in it, replies, states, events) is kept
        in the transaction when the block exits normally, and undone alone
        when it raises or is cancelled (the exception propagates), the rest
        of the transaction going on. Savepoints nest; the writes of
        concurrent tasks in one transaction are not told apart (give the
        block the transaction to itself).

        Raises:
            PersistenceError: the savepoint could not be made or released
                (as for `execute`), or this backend has none (the default).
                When the block raised and undoing its writes failed, the
                block's exception propagates and `failure` is set: the
                transaction can then never commit.
        """
        raise PersistenceError(
            f"{type(self).__name__} has no savepoints: implement"
            " StorageTransaction.savepoint in this storage backend"
        )


class MessageStorage(DeadLetterStorage):
    """Durable requests and replies. See the module docstring for fencing,
    and `trio_cluster._storage_retries` for attempts and dead letters."""

    @abstractmethod
    async def save_requests(
        self,
        requests: Sequence[PersistedRequest],
        *,
        now: float,
        transaction: StorageTransaction | None = None,
    ) -> list[SaveResult]:
        """Store requests, one `SaveResult` per request, in order.

        A request with a primary key that matches a stored request (same
        address, tag and key), or an earlier request of the same batch, is a
        duplicate: it is not stored, and the result names the original.
        A request stored claimed has had one attempt; one stored unclaimed,
        none. A request whose ``request_id`` is already stored is a duplicate of
        itself (saving is idempotent under retries); if it is still claimed at
        the given ``claim_epoch``, the result says ``claimed=True`` again, so a
        sender whose first attempt committed but timed out still delivers it.

        Every session is notified (`MessagesAvailable`) of the shards of the
        requests stored unclaimed; not of those stored claimed, nor of
        duplicates.

        With ``transaction`` (from `open_transaction` on this storage: the
        *transactional outbox*), the requests are saved inside it: they
        exist, and are notified, when it commits, and not at all if it rolls
        back. They cannot be saved claimed (a ``claim_epoch`` is refused
        with ``ValueError``: they are claimed once committed). The results
        are those the saves will have if it commits.
        """

    @abstractmethod
    async def claim(
        self, shards: Mapping[ShardId, int], *, now: float, limit: int
    ) -> ClaimBatch:
        """Claim up to ``limit`` deliverable requests of the given shards.

        ``shards`` maps each shard to the epoch the caller holds it at. A
        request is deliverable when it has no final reply, its ``deliver_at``
        is None or ``<= now``, and it was not claimed at this epoch already.
        Claimed requests are marked with the epoch, so they are not returned
        again until the shard's epoch changes (a new owner re-claims all),
        and their attempts count grows by one (`ClaimedRequest.attempts`).
        Shards whose epoch is stale are skipped and reported.
        """

    @abstractmethod
    async def save_replies(
        self,
        replies: Sequence[ReplyRecord],
        *,
        now: float,
        transaction: StorageTransaction | None = None,
    ) -> list[ReplyOutcome]:
        """Record replies (fenced by epoch), one outcome per reply, in order.

        A final reply marks its request processed at ``now`` (retention counts
        from there). At most one final reply and one chunk per sequence number
        is ever recorded for a request; a chunk sent after the final reply is
        a `ReplyOutcome.DUPLICATE`.

        With ``transaction`` (from `open_transaction` on this storage), the
        replies are written inside it: they take effect when it commits, and
        not at all if it rolls back. The outcomes are those the writes will
        have if it commits (a commit that fails raises from the transaction).
        """

    @abstractmethod
    def open_transaction(self) -> AbstractAsyncContextManager[StorageTransaction]:
        """Open a storage transaction for a transactional handler.

        It commits when the block exits normally and rolls back when it exits
        with an exception or is cancelled. Commit failures raise
        `PersistenceError` from the exit.
        """

    @abstractmethod
    async def replies_for(self, queries: Sequence[ReplyQuery]) -> list[StoredReplies]:
        """The recorded replies for each query, in order (chunks ascending)."""

    @abstractmethod
    async def ack_chunks(self, acks: Sequence[tuple[int, int]]) -> None:
        """Mark chunks of ``(request_id, sequence)`` and all earlier chunks of
        that request as received by the caller."""

    @abstractmethod
    async def interrupt(self, request_ids: Sequence[int]) -> None:
        """Ask for unfinished requests to be interrupted. The owner records an
        interrupted reply; finished or unknown requests are left alone.

        A request already claimed at the current epoch is not claimed again,
        so its owner learns of the interruption from `RequestsInterrupted`
        (or, after a failover, from ``ClaimedRequest.interrupted``).
        """

    @abstractmethod
    async def clear_address(self, address: EntityAddress) -> int:
        """Delete every request and reply of one entity; returns the number of
        requests deleted."""

    @abstractmethod
    async def delete_processed(self, *, older_than: float, limit: int) -> int:
        """Retention: delete up to ``limit`` finished requests (and their
        replies) whose final reply was recorded before ``older_than``."""

    @abstractmethod
    async def scan_unprocessed(
        self, *, after_id: int | None = None, limit: int
    ) -> list[StoredRequest]:
        """Read up to ``limit`` unprocessed requests (no final reply yet,
        claimed or not, due or not), those with ``request_id > after_id``
        (all if None), in ascending ``request_id`` order.

        Read-only: it claims, locks and changes nothing, and costs one page
        of memory; page through the table by passing the last id returned
        as the next ``after_id`` (a request saved meanwhile with a smaller id
        than the page's last is not seen). For inspection tools such as
        ``trio-cluster check-messages``, not for the runtime.
        """

    @abstractmethod
    async def wait_notifications(self) -> list[Notification]:
        """Wait for and return the next notifications (at least one).

        Notifications include those caused by this session's own writes.
        On cancellation nothing is lost that was not already returned.
        """

    notifications_lossless: bool = False
    """Whether every write another session must act on is notified (a
    request becoming claimable, a reply, an interrupt), and any loss is
    announced by `NotificationsMissed`. The runtime then never polls storage
    while nothing happens; otherwise (the default, for backends that cannot
    promise it) it also claims every ``storage_poll_interval``."""


# --------------------------------------------------------------------------
# Runner records


@attrs.frozen
class RunnerInfo:
    """A runner as registered in storage."""

    address: RunnerAddress
    groups: tuple[str, ...]
    weight: float = 1.0
    machine_id: int | None = None
    """Snowflake machine id, unique among registered runners (0..1023); set by
    `RunnerStorage.register`."""


@attrs.frozen
class ShardOwner:
    """Who holds a shard, as storage sees it (for status and tests)."""

    shard: ShardId
    runner: RunnerAddress | None
    epoch: int


class RunnerStorage(ABC):
    """Runner registry and shard leases, bound to one runner's lock session.

    The session holds the shard locks: when it ends, for whatever reason, they
    are freed. Every call renews the session; a session with no call for its
    lease duration is ended by the backend (the database's idle-session
    timeout). A shard that was never acquired has epoch 0, which is stale for
    every claim and reply.
    """

    @abstractmethod
    async def register(self, runner: RunnerInfo) -> int:
        """Register (or re-register) this session's runner; returns its
        Snowflake machine id (0..1023), unique among live runners.

        A registration is live while its session is: if the backend has to
        open a new lock session (the old one ended), liveness is restored on
        the next call, but no shard lock is (`refresh` reports them gone).
        """

    @abstractmethod
    async def unregister(self) -> None:
        """Remove this session's runner from the registry."""

    @abstractmethod
    async def live_runners(self) -> list[RunnerInfo]:
        """Registered runners whose sessions are alive, sorted by address."""

    @abstractmethod
    async def acquire(self, shards: Collection[ShardId]) -> dict[ShardId, int]:
        """Try to lock shards; returns those now held, with their epoch.

        Each shard newly acquired gets ``epoch = previous epoch + 1``; a shard
        this session already holds is returned with its current epoch; a shard
        held by another session is left out, and so is one that a fenced
        write still to commit depends on (see fencing above; it is free again
        once that write ends). Never waits for either.
        """

    @abstractmethod
    async def refresh(self, shards: Collection[ShardId]) -> set[ShardId]:
        """Heartbeat the session and report which of ``shards`` it still holds."""

    async def refresh_and_list(
        self, shards: Collection[ShardId]
    ) -> tuple[set[ShardId], list[RunnerInfo]]:
        """`refresh`, then `live_runners`: the held shards and the live
        runners, as of this heartbeat.

        The runtime calls this on every lease refresh instead of polling the
        live runners: a runner that died or left is noticed at the next
        heartbeat with no statement of its own. Backends should override it
        to do both in one operation (PostgreSQL: one statement); this default
        makes two calls. Errors: as for `refresh` and `live_runners`."""
        held = await self.refresh(shards)
        return held, await self.live_runners()

    @abstractmethod
    async def release(self, shards: Collection[ShardId]) -> None:
        """Unlock shards (those not held are ignored)."""

    @abstractmethod
    async def release_all(self) -> None:
        """Unlock every shard this session holds."""

    @abstractmethod
    async def wait_session_lost(self) -> None:
        """Return as soon as the backend knows that this session's locks are
        gone (its connection died, or its lease expired), and not before.

        The runner stops serving its shards at once when this returns, rather
        than at its next refresh: a backend that frees locks the moment a
        connection dies (PostgreSQL) would otherwise let another runner take
        them while this one still serves. Waiting again waits for the loss of
        the next session (the one the next call opens). Cancellation-safe.
        """

    @abstractmethod
    async def shard_owners(self) -> list[ShardOwner]:
        """Every shard that was ever acquired, with its holder and epoch."""


# --------------------------------------------------------------------------
# Backend entry point


@attrs.frozen
class StorageSession:
    """One runner's open connection to a storage backend."""

    messages: MessageStorage
    runners: RunnerStorage
    events: EventStorage | None = None
    """The durable event log, if the backend has one (see
    `trio_cluster._storage_events`)."""


class Storage(ABC):
    """A storage backend: something runners open sessions on."""

    @abstractmethod
    def open_session(
        self, *, name: str, lease_duration: float
    ) -> AbstractAsyncContextManager[StorageSession]:
        """Open one runner's session.

        Args:
            name: shown by the backend (e.g. PostgreSQL ``application_name``).
            lease_duration: the session ends if not refreshed for this long.

        On exit (and on cancellation) the session is closed and every lock it
        holds is released.
        """
