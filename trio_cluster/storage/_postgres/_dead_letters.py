"""Retries and dead letters on PostgreSQL: `DeadLetterStorage` (edge adapter).

`PgDeadLetters` runs the statements of `._retry_queries` on a session's
message pool, one statement per call, and turns their rows into the
contract's results; `PgMessages` hands its `DeadLetterStorage` methods to
it. Dead-lettering itself is part of the save-replies statements (a final
reply with `ReplyRecord.dead_letter` set), not of this module.

Every call validates its arguments with the contract's checks and
checkpoints. Errors: the driver's `PersistenceError` subclasses (a replay
whose new request id is taken fails with a unique violation, which the
driver raises as `StorageRefusedError`); on cancellation the statement is
cancelled (it either committed, as a whole, or not at all).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import attrs

from trio_cluster._core._addresses import ShardId
from trio_cluster._storage_abc import ReplyOutcome
from trio_cluster._storage_retries import DeadLetter

from .._validation import (
    check_dead_letters,
    check_purge_dead_letters,
    check_replay_dead_letter,
    check_retry_later,
)
from ._driver._pool import PgPool
from ._message_parts import any_work, stored_metadata
from ._retry_queries import RetryQueries

if TYPE_CHECKING:
    from collections.abc import Sequence

    from trio_cluster._storage_retries import RetryRecord


__all__ = ["PgDeadLetters"]

_MIN_BIGINT = -(2**63)
_MAX_BIGINT = 2**63 - 1
_OUTCOMES = {
    "u": ReplyOutcome.UNKNOWN_REQUEST,
    "s": ReplyOutcome.STALE_EPOCH,
    "d": ReplyOutcome.DUPLICATE,
}


@attrs.define(eq=False, kw_only=True)
class PgDeadLetters:
    """One session's retries and dead letters.

    Args:
        pool: the session's connection pool for message traffic.
        queries: the statements of the cluster.
        channel: the NOTIFY channel.
    """

    _pool: PgPool
    _q: RetryQueries = attrs.field(alias="queries")
    _channel: str

    async def retry_later(
        self, retries: Sequence[RetryRecord], *, now: float
    ) -> list[ReplyOutcome]:
        """See `DeadLetterStorage.retry_later`.

        Raises:
            TypeError, ValueError: a malformed record (nothing is written).
            PersistenceError: the statement failed (nothing was written).
        """
        checked, now = check_retry_later(retries, now)
        if not await any_work(checked):
            return []
        params: list[object] = [
            list(range(len(checked))),
            [retry.request_id for retry in checked],
            [retry.shard.group for retry in checked],
            [retry.shard.number for retry in checked],
            [retry.epoch for retry in checked],
            [
                None if retry.deliver_at is None else float(retry.deliver_at)
                for retry in checked
            ],
            [retry.error for retry in checked],
            self._channel,
            [retry.started for retry in checked],
        ]
        rows = (await self._pool.execute(self._q.retry_later, params)).rows
        statuses = ["d"] * len(checked)
        given: set[int] = set()
        for kind, number, status in rows:
            if kind == 0:
                statuses[number] = status
            elif kind == 1:
                given.add(number)
        return [
            _OUTCOMES.get(status)
            or (
                ReplyOutcome.RECORDED
                if retry.request_id in given
                # Answered after the statement's snapshot was taken.
                else ReplyOutcome.DUPLICATE
            )
            for retry, status in zip(checked, statuses, strict=True)
        ]

    async def dead_letters(
        self, *, after_id: int | None = None, limit: int
    ) -> list[DeadLetter]:
        """See `DeadLetterStorage.dead_letters`.

        Raises:
            TypeError, ValueError: a malformed argument.
            ValueError: a stored row's call metadata is no JSON object of
                str to str (written by hand or by another program).
            PersistenceError: the statement failed.
        """
        after_id, limit = check_dead_letters(after_id, limit)
        if not await any_work(limit) or (after_id or 0) >= _MAX_BIGINT:
            return []
        params: list[object] = [
            _MIN_BIGINT if after_id is None else max(after_id + 1, _MIN_BIGINT),
            limit,
        ]
        rows = (await self._pool.execute(self._q.dead_letters, params)).rows
        return [_dead_letter(row) for row in rows]

    async def replay_dead_letter(
        self, request_id: int, *, new_request_id: int, now: float
    ) -> bool:
        """See `DeadLetterStorage.replay_dead_letter`.

        Raises:
            TypeError: a malformed argument.
            StorageRefusedError: ``new_request_id`` is taken (nothing changed).
            PersistenceError: the statement failed (nothing changed).
        """
        request_id, new_request_id, now = check_replay_dead_letter(
            request_id, new_request_id, now
        )
        await any_work(1)
        params: list[object] = [request_id, new_request_id, now, self._channel]
        rows = (await self._pool.execute(self._q.replay_dead_letter, params)).rows
        return bool(rows[0][0])

    async def purge_dead_letters(self, request_ids: Sequence[int]) -> int:
        """See `DeadLetterStorage.purge_dead_letters`.

        Raises:
            TypeError: a malformed id.
            PersistenceError: the statement failed (nothing was deleted).
        """
        checked = check_purge_dead_letters(request_ids)
        if not await any_work(checked):
            return 0
        params: list[object] = [checked]
        return (await self._pool.execute(self._q.purge_dead_letters, params)).rowcount


def _dead_letter(row: tuple[Any, ...]) -> DeadLetter:
    """A row of the ``dead_letters`` statement."""
    return DeadLetter(
        request_id=row[0],
        shard=ShardId(row[1], row[2]),
        entity_type=row[3],
        entity_id=row[4],
        tag=row[5],
        payload=row[6],
        primary_key=row[7],
        attempts=row[8],
        error=row[9],
        dead_at=row[10],
        metadata=stored_metadata(row[11]),
        replayed_as=row[12],
    )
