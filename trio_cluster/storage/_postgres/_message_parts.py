"""Parts of the PostgreSQL `MessageStorage` that need no pool (edge adapter).

`dedup_key` hashes a request's dedup identity, `reply_outcomes` turns what
the save-replies statement saw and wrote into `ReplyOutcome` s (the rules of
`MemoryStorage`), `PgTransaction` is the transaction handed to
transactional handlers (`PgMessages.open_transaction`), `any_work` starts
every call and `stored_metadata` reads stored call metadata.
"""

from __future__ import annotations

import hashlib
import json
from contextlib import AsyncExitStack, asynccontextmanager
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

import trio

from trio_cluster._call_metadata import EMPTY_METADATA, metadata_problem
from trio_cluster._errors import PersistenceError
from trio_cluster._storage_abc import (
    PersistedRequest,
    ReplyOutcome,
    ReplyRecord,
    StorageTransaction,
)

from ._driver._errors import is_storage_failure

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Mapping, Sequence, Sized

    from ._driver._driver import PgConnection
    from ._driver._pool import PgPool


__all__ = [
    "PgTransaction",
    "any_work",
    "dedup_key",
    "reply_outcomes",
    "stored_metadata",
]

_SAVEPOINT = "SAVEPOINT trio_cluster_savepoint"
_RELEASE = "RELEASE SAVEPOINT trio_cluster_savepoint"
_ROLLBACK_TO = "ROLLBACK TO SAVEPOINT trio_cluster_savepoint"
# NOTE: one name for every savepoint: PostgreSQL stacks savepoints of the same
# name (RELEASE and ROLLBACK TO take the newest), which is the nesting of
# `savepoint` blocks, and one name keeps one prepared statement of each.

_OUTCOMES = {"u": ReplyOutcome.UNKNOWN_REQUEST, "s": ReplyOutcome.STALE_EPOCH}


def dedup_key(request: PersistedRequest) -> bytes | None:
    """The 128-bit dedup hash of a request's address, tag and primary key."""
    if request.primary_key is None:
        return None
    address = request.address
    fields = (
        address.entity_type,
        address.entity_id.value,
        address.shard.group,
        str(address.shard.number),
        request.tag,
        request.primary_key,
    )
    # Length-prefixed, so no two different field tuples encode alike.
    text = "".join(f"{len(field)}:{field}" for field in fields)
    return hashlib.blake2b(
        text.encode("utf-8", "surrogatepass"), digest_size=16
    ).digest()


def reply_outcomes(
    replies: list[ReplyRecord],
    statuses: list[str],
    written: set[tuple[int, int | None]],
) -> list[ReplyOutcome]:
    """Each reply's outcome, given its status in the statement's snapshot and
    the replies the statement wrote (as `MemoryStorage` decides them: in
    order, the first valid reply per request and sequence, none after the
    request's first valid final reply)."""
    outcomes: list[ReplyOutcome] = []
    taken: set[tuple[int, int | None]] = set()
    finished: set[int] = set()
    for reply, status in zip(replies, statuses, strict=True):
        key = (reply.request_id, reply.sequence)
        if status in _OUTCOMES:
            outcomes.append(_OUTCOMES[status])
        elif status != "v" or key in taken or reply.request_id in finished:
            outcomes.append(ReplyOutcome.DUPLICATE)
        else:
            taken.add(key)
            if reply.sequence is None:
                finished.add(reply.request_id)
            recorded = key in written
            outcomes.append(
                ReplyOutcome.RECORDED if recorded else ReplyOutcome.DUPLICATE
            )
    return outcomes


class PgTransaction(StorageTransaction):
    """A transaction on one pooled connection, for transactional handlers.

    Statements of concurrent tasks take turns. After the transaction ended,
    `execute` raises ``trio.ClosedResourceError``.
    """

    def __init__(self, pool: PgPool, owner: object, stack: AsyncExitStack) -> None:
        self.owner = owner
        self.finished = False
        self._pool = pool
        self._stack = stack
        self._connection: PgConnection | None = None
        self._mutex = trio.StrictFIFOLock()

    @property
    def connection(self) -> PgConnection:
        """Its connection (once `begin` ran).

        Raises:
            trio.ClosedResourceError: it has not begun (no statement yet).
        """
        if self._connection is None:
            raise trio.ClosedResourceError("the transaction has not begun")
        return self._connection

    async def begin(self) -> None:
        """Take a connection of the transaction pool and run ``BEGIN``, unless
        done already (its first statement does it: a transaction that runs
        none holds no connection and commits nothing).

        Raises:
            PersistenceError: ``BEGIN`` failed.
            trio.ClosedResourceError: the transaction already ended.

        Waits (cancellably) while every connection of the pool is in use.
        """
        async with self._mutex:
            await self._begin()

    async def _begin(self) -> PgConnection:
        if self.finished:
            await trio.lowlevel.checkpoint()
            raise trio.ClosedResourceError("the transaction is already finished")
        if self._connection is None:
            conn = await self._stack.enter_async_context(self._pool.connection())
            await self._stack.enter_async_context(conn.transaction())
            self._connection = conn
        return self._connection

    async def execute(
        self, query: str, params: Sequence[object] = ()
    ) -> list[tuple[Any, ...]]:
        """Run one statement in the transaction; return its rows.

        Raises:
            TypeError: ``query`` is not a str.
            PersistenceError: the statement failed (the transaction is then
                aborted: COMMIT rolls back and raises). If storage was at
                fault (`is_storage_failure`), it is also kept as `failure`.
            trio.ClosedResourceError: the transaction already ended.

        On cancellation the statement is cancelled; the transaction is rolled
        back when its block exits.
        """
        if not isinstance(query, str):
            raise TypeError(f"query must be a str, got {query!r}")
        return await self.execute_internal(query, list(params))

    @asynccontextmanager
    async def savepoint(self) -> AsyncIterator[None]:
        """``SAVEPOINT`` ... ``RELEASE SAVEPOINT``, or ``ROLLBACK TO
        SAVEPOINT`` if the block raises (shielded from cancellation, bounded
        by the connection's ``recovery_timeout``); if that rollback fails,
        `failure` is set, so the transaction never commits.

        Raises:
            PersistenceError: ``SAVEPOINT`` or ``RELEASE`` failed.
            trio.ClosedResourceError: the transaction already ended.
        """
        await self.execute_internal(_SAVEPOINT, ())
        try:
            yield
        except BaseException:
            await self._rollback_to_savepoint()
            raise
        await self.execute_internal(_RELEASE, ())

    async def _rollback_to_savepoint(self) -> None:
        bound = self.connection.recovery_timeout  # begun: a savepoint ran
        problem: BaseException | None = None
        with trio.CancelScope(
            shield=True, deadline=trio.current_time() + bound
        ) as scope:
            try:
                await self.execute_internal(_ROLLBACK_TO, ())
            except (PersistenceError, trio.ClosedResourceError) as exc:
                problem = exc
        if scope.cancelled_caught:
            problem = trio.TooSlowError(f"no answer in {bound} s")
        if problem is not None and self.failure is None:
            failure = PersistenceError(
                f"rolling back to a savepoint failed: {problem!r}"
            )
            failure.__cause__ = problem
            self.failure = failure

    async def execute_internal(
        self, query: str, params: Sequence[object]
    ) -> list[tuple[Any, ...]]:
        async with self._mutex:
            conn = await self._begin()
            try:
                return (await conn.execute(query, params)).rows
            except PersistenceError as exc:
                if self.failure is None and is_storage_failure(exc):
                    self.failure = exc
                raise


async def any_work(batch: Sized | int) -> bool:
    """Checkpoint at the start of a call; False if ``batch`` (or a limit) is
    empty, so there is no statement to send."""
    await trio.lowlevel.checkpoint_if_cancelled()
    if batch:  # a limit is checked to be >= 0
        return True
    await trio.lowlevel.cancel_shielded_checkpoint()
    return False


def stored_metadata(text: str | None) -> Mapping[str, str]:
    """Stored call metadata (JSON text, or NULL for none).

    Raises:
        ValueError: it is not a JSON object of str to str within the limits
            (the row is then unreadable: see `ClaimBatch.unreadable`).
    """
    if text is None:
        return EMPTY_METADATA
    value = json.loads(text)
    problem = metadata_problem(value)
    if problem is not None:
        raise ValueError(f"stored call metadata: {problem}")
    return MappingProxyType(value)
