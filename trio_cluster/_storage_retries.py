"""The storage contract's attempts, retries and dead letters (interface).

A persisted request is handed to its handler once per *attempt*. Storage
counts the attempts: one each time a request is claimed, or saved already
claimed by its sender (`ClaimedRequest.attempts`), so that a request whose
handler kills its runner, and not only one whose handler raises, is counted
across failovers and restarts. From the handler's `RetryPolicy`, the runtime
decides what becomes of an attempt that failed:

* `DeadLetterStorage.retry_later` gives the request back for a later
  attempt: unclaimed, due at a given time, with the error that ended this
  attempt (`ClaimedRequest.last_error` of the next claim);
* a final reply written with `ReplyRecord.dead_letter` set moves the request
  to the *dead letters* (a copy of it, with its attempts and last error),
  atomically with that reply (the `DeadLetteredError` its caller gets).

Dead letters stay until purged: `DeadLetterStorage.dead_letters` lists
them, `replay_dead_letter` saves one again as a new request, and
`purge_dead_letters` deletes them. Retention of processed requests
(`MessageStorage.delete_processed`) leaves them alone.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from types import MappingProxyType
from typing import TYPE_CHECKING

import attrs

from ._core._addresses import ShardId

if TYPE_CHECKING:
    from collections.abc import Sequence

    from ._storage_abc import ReplyOutcome

__all__ = ["MAX_ERROR_TEXT", "DeadLetter", "DeadLetterStorage", "RetryRecord"]

MAX_ERROR_TEXT = 2000
"""The longest error text storage keeps (`RetryRecord.error`,
`ReplyRecord.dead_letter`); the runtime shortens longer ones."""


@attrs.frozen
class RetryRecord:
    """Give one claimed request back for a later attempt (see
    `DeadLetterStorage.retry_later`)."""

    request_id: int
    shard: ShardId
    epoch: int
    """Epoch under which the caller owns the shard (fencing, as for replies)."""
    deliver_at: float | None
    """When the next attempt may be claimed (wall-clock seconds); None: as
    the request's own ``deliver_at`` allows (it was due: it was claimed)."""
    error: str | None
    """What ended this attempt: kept as the request's last error (at most
    `MAX_ERROR_TEXT` characters); None keeps the last error as it is."""
    started: bool = True
    """False: the claimed request was given back without running (its shard
    stopped before its turn came), so its claim is taken back from its
    attempts count."""


@attrs.frozen
class DeadLetter:
    """A request moved to the dead letters, as stored."""

    request_id: int
    """The dead-lettered request's id: its dead letter's id."""
    shard: ShardId
    entity_type: str
    entity_id: str
    """The stored entity id, unchecked (as `StoredRequest.entity_id`)."""
    tag: str
    """The handler's wire name."""
    payload: bytes
    """The encoded message."""
    primary_key: str | None
    attempts: int
    """Its attempts count when it was dead-lettered: the attempts it had,
    plus the claim that found them spent for one dead-lettered without
    running (`DeadLetteredError.attempts` counts only those that ran)."""
    error: str
    """What ended its last attempt."""
    dead_at: float
    """When it was dead-lettered (wall-clock seconds)."""
    metadata: Mapping[str, str] = attrs.field(default=MappingProxyType({}), hash=False)
    """Its call metadata."""
    replayed_as: int | None = None
    """The id of the request `replay_dead_letter` saved from it, if any."""


class DeadLetterStorage(ABC):
    """Retries and dead letters: part of every `MessageStorage`."""

    @abstractmethod
    async def retry_later(
        self, retries: Sequence[RetryRecord], *, now: float
    ) -> list[ReplyOutcome]:
        """Give claimed requests back for a later attempt, fenced by epoch
        like replies; one outcome per record, in order.

        A request without a final reply, in a shard still at ``epoch``, is
        made unclaimed (its next claim is no redelivery: ``claimed_before``
        is False) and claimable again from the record's ``deliver_at`` on (its attempts count
        stays, the next claim adds one; one less for a record not
        ``started``, never below zero), with ``error`` as its last error
        unless it is None (`ReplyOutcome.RECORDED`); every session is notified
        (`MessagesAvailable`) of its shard and ``deliver_at``. A request with
        a final reply is left alone (`ReplyOutcome.DUPLICATE`); a stale epoch
        or an unknown request changes nothing (`STALE_EPOCH`,
        `UNKNOWN_REQUEST`).
        """

    @abstractmethod
    async def dead_letters(
        self, *, after_id: int | None = None, limit: int
    ) -> list[DeadLetter]:
        """Read up to ``limit`` dead letters with ``request_id > after_id``
        (all if None), in ascending ``request_id`` order; read-only."""

    @abstractmethod
    async def replay_dead_letter(
        self, request_id: int, *, new_request_id: int, now: float
    ) -> bool:
        """Save dead letter ``request_id`` again as a new request with id
        ``new_request_id``: same address, handler, payload and metadata, no
        primary key (the original, answered, still holds it), due now,
        unclaimed, no attempts yet. The dead letter is kept, marked
        `DeadLetter.replayed_as`; the shard's owner is notified.

        Returns False (and changes nothing) if there is no such dead letter,
        or it was replayed already.

        Raises:
            StorageRefusedError: ``new_request_id`` is taken.
        """

    @abstractmethod
    async def purge_dead_letters(self, request_ids: Sequence[int]) -> int:
        """Delete these dead letters; returns how many there were."""
