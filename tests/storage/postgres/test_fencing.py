"""Strict fencing on PostgreSQL: no write under a stale epoch commits after the
successor's acquisition committed (issue 11, item 4).

Each test forces one interleaving of a fenced write (connection A: a reply, a
claim, a request saved already claimed, a transactional reply) with the
successor's acquisition of the shard (connection B: the runners' own lock
statement, held uncommitted in an explicit transaction), without relying on
timing: every "then" waits until the server shows the previous step done or
blocked on a lock (``pg_stat_activity``). Where the write must be held between
its snapshot and its commit, a third connection (C) holds a row lock the write
needs, as any concurrent writer could.

Real server, real time; every connection is named uniquely, so the lock
waits observed are this test's own.
"""

from __future__ import annotations

import uuid
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

import attrs
import pytest
import trio

from tests.pg_fixture import LEASE, TIMEOUT, unique_prefix, wait_blocked
from trio_cluster.abc import (
    ReplyOutcome,
    StateOutcome,
    StateStorage,
    StateWrite,
    StorageSession,
    StoredState,
)
from trio_cluster.storage import PostgresStorage
from trio_cluster.storage._postgres._driver._driver import PgConnection
from trio_cluster.storage._postgres._queries import MessageQueries
from trio_cluster.storage._postgres._runner_queries import RunnerQueries
from trio_cluster.testing import (
    BASE_TIME,
    SHARD,
    acquire_shards,
    entity_address,
    final_reply,
    persisted_request,
    replies_of,
    saved_and_claimed,
)

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Awaitable, Callable

    from tests.pg_fixture import PgSchema

pytestmark = pytest.mark.postgres


class _Rollback(Exception):
    """Leave a transaction without committing (as the runtime does after a
    refused reply)."""


@attrs.define
class Race:
    """The connections of one race, and the storage session of the old owner."""

    schema: PgSchema
    storage: PostgresStorage
    old: StorageSession
    """The old owner: it holds `SHARD` at `epoch`, then releases it (e.g. its
    lease lapsed) but still writes under that epoch."""
    name: str
    """The old owner's session name (its pools' ``application_name`` s)."""
    watcher: PgConnection
    """Reads ``pg_stat_activity``."""
    epoch: int = 0

    @property
    def messages_table(self) -> str:
        return self.storage.names.messages

    async def connect(self, role: str) -> tuple[PgConnection, str]:
        application_name = f"{self.name} {role}"
        conn = await PgConnection.connect(
            self.schema.dsn, application_name=application_name
        )
        return conn, application_name

    async def begin_acquisition(self, conn: PgConnection) -> int:
        """On ``conn``: ``BEGIN``, then the successor's acquisition of `SHARD`
        (the statement `PgRunners.acquire` runs), left uncommitted. Returns
        the epoch it bumped the shard to."""
        await conn.execute("BEGIN", prepare=False)
        names = self.storage.names
        lock_shards = RunnerQueries.build(names).lock_shards
        params = [[SHARD.group], [SHARD.number], names.namespace, "successor"]
        [(group, number, _, epoch)] = (await conn.execute(lock_shards, params)).rows
        assert (group, number) == (SHARD.group, SHARD.number)
        assert epoch == self.epoch + 1, "the successor must get the shard"
        return int(epoch)

    async def wait_blocked(
        self, application_name: str, done: Callable[[], bool] = lambda: False
    ) -> None:
        """Wait until the session ``application_name`` waits for a lock (or
        ``done()``, for a write that did not wait)."""
        await wait_blocked(self.watcher, application_name, done)

    async def request_row(self, request_id: int) -> tuple[Any, ...] | None:
        rows = (
            await self.watcher.execute(
                f"SELECT claimed_epoch, processed_at FROM {self.messages_table}"
                " WHERE request_id = $1",
                [request_id],
            )
        ).rows
        return rows[0] if rows else None


@asynccontextmanager
async def race(schema: PgSchema) -> AsyncIterator[Race]:
    name = f"fence-{uuid.uuid4().hex[:12]}"
    storage = PostgresStorage(schema.dsn, table_prefix=unique_prefix())
    async with (
        storage.open_session(name=name, lease_duration=LEASE) as old,
        await PgConnection.connect(
            schema.dsn, application_name=f"{name} watcher"
        ) as watcher,
    ):
        yield Race(schema, storage, old, name, watcher)


@attrs.define
class Background:
    """A call running in the background (`background`)."""

    finished: trio.Event = attrs.Factory(trio.Event)
    value: Any = None
    """What it returned, once `finished` is set."""

    def done(self) -> bool:
        return self.finished.is_set()


async def background(
    nursery: trio.Nursery, call: Callable[[], Awaitable[Any]]
) -> Background:
    """Start ``call`` in ``nursery``."""
    handle = Background()

    async def run() -> None:
        handle.value = await call()
        handle.finished.set()

    nursery.start_soon(run)
    return handle


@pytest.mark.parametrize("requests", [1, 2], ids=["one-row", "batch"])
async def test_reply_racing_the_acquisition_is_refused(
    pg_schema: PgSchema, requests: int
) -> None:
    """A reply whose statement read the shard before the successor's
    acquisition committed is refused, even if it then had to wait (here for
    the request's row lock) until after that commit. With two replies, the
    batch statement (its shard row locked by a lookup per row)."""
    ids = range(1, requests + 1)
    with trio.fail_after(TIMEOUT):
        async with race(pg_schema) as r, trio.open_nursery() as nursery:
            for i in ids:
                r.epoch = await saved_and_claimed(r.old, persisted_request(i))
            await r.old.runners.release([SHARD])
            holder, _ = await r.connect("C")
            successor, _ = await r.connect("B")
            async with holder, successor:
                await holder.execute("BEGIN", prepare=False)
                await holder.execute(
                    f"SELECT 1 FROM {r.messages_table} WHERE request_id = 1 FOR UPDATE"
                )
                await r.begin_acquisition(successor)
                reply = await background(
                    nursery,
                    lambda: r.old.messages.save_replies(
                        [final_reply(i, r.epoch, b"late") for i in ids], now=BASE_TIME
                    ),
                )
                await r.wait_blocked(f"trio_cluster {r.name}")
                await successor.execute("COMMIT", prepare=False)
                await holder.execute("ROLLBACK", prepare=False)
                await reply.finished.wait()
            assert reply.value == [ReplyOutcome.STALE_EPOCH] * requests
            for i in ids:
                assert (await replies_of(r.old.messages, i)).final is None
                assert await r.request_row(i) == (r.epoch, None)


async def test_claimed_save_racing_the_acquisition_is_saved_unclaimed(
    pg_schema: PgSchema,
) -> None:
    """A request saved already claimed (by the shard's owner, for itself) in
    a statement that read the shard before the successor's acquisition
    committed is stored unclaimed, for the successor to claim."""
    with trio.fail_after(TIMEOUT):
        async with race(pg_schema) as r, trio.open_nursery() as nursery:
            r.epoch = await saved_and_claimed(r.old, claim=False)
            await r.old.runners.release([SHARD])
            holder, _ = await r.connect("C")
            successor, _ = await r.connect("B")
            async with holder, successor:
                # C: an uncommitted insert of the same request id, which the
                # save must wait for (ON CONFLICT) before it can insert.
                await holder.execute("BEGIN", prepare=False)
                await holder.execute(
                    f"INSERT INTO {r.messages_table} (request_id, shard_group,"
                    " shard_number, entity_type, entity_id, tag, payload)"
                    " VALUES (1, $1, $2, 'Counter', 'e1', 'increment', '\\x00')",
                    [SHARD.group, SHARD.number],
                )
                await r.begin_acquisition(successor)
                save = await background(
                    nursery,
                    lambda: r.old.messages.save_requests(
                        [persisted_request(1, claim_epoch=r.epoch)], now=BASE_TIME
                    ),
                )
                await r.wait_blocked(f"trio_cluster {r.name}")
                await successor.execute("COMMIT", prepare=False)
                await holder.execute("ROLLBACK", prepare=False)
                await save.finished.wait()
            [result] = save.value
            assert (result.request_id, result.duplicate, result.claimed) == (
                1,
                False,
                False,
            )
            assert await r.request_row(1) == (None, None)


async def test_claim_racing_the_acquisition_claims_nothing(
    pg_schema: PgSchema,
) -> None:
    """A claim whose statement read the shard before the successor's
    acquisition committed, and commits after it, claims nothing and reports
    the shard stale. (The claim never waits for a lock once it has read, so
    its window before commit is widened with an explicit transaction around
    the storage's own claim statement.)"""
    with trio.fail_after(TIMEOUT):
        async with race(pg_schema) as r, trio.open_nursery() as nursery:
            r.epoch = await saved_and_claimed(r.old, persisted_request(1), claim=False)
            await r.old.runners.release([SHARD])
            claimer, claimer_name = await r.connect("A")
            successor, _ = await r.connect("B")
            async with claimer, successor:
                await r.begin_acquisition(successor)
                claim = MessageQueries.build(r.storage.names).claim
                params = [[SHARD.group], [SHARD.number], [r.epoch], BASE_TIME, 10]
                await claimer.execute("BEGIN", prepare=False)
                rows = await background(nursery, lambda: claimer.execute(claim, params))
                await r.wait_blocked(claimer_name, rows.done)
                await successor.execute("COMMIT", prepare=False)
                await rows.finished.wait()
                await claimer.execute("COMMIT", prepare=False)
            kinds = [(row[0], row[3], row[4]) for row in rows.value.rows]
            assert (0, SHARD.group, SHARD.number) not in kinds  # nothing claimed
            assert (1, SHARD.group, SHARD.number) in kinds  # reported stale
            assert await r.request_row(1) == (None, None)


async def test_transactional_reply_racing_the_acquisition_is_refused(
    pg_schema: PgSchema,
) -> None:
    """A transactional handler's reply, saved while the successor's
    acquisition is in flight, is refused once that acquisition commits; the
    runtime then rolls the handler's writes back."""
    with trio.fail_after(TIMEOUT):
        async with race(pg_schema) as r, trio.open_nursery() as nursery:
            r.epoch = await saved_and_claimed(r.old, persisted_request(1))
            await r.old.runners.release([SHARD])
            await r.watcher.execute("CREATE TABLE side_effects (v int)")
            successor, _ = await r.connect("B")
            outcome: list[ReplyOutcome] = []
            async with successor:
                try:
                    async with r.old.messages.open_transaction() as transaction:
                        await transaction.execute("INSERT INTO side_effects VALUES (1)")
                        await r.begin_acquisition(successor)
                        reply = await background(
                            nursery,
                            lambda: r.old.messages.save_replies(
                                [final_reply(1, r.epoch)],
                                now=BASE_TIME,
                                transaction=transaction,
                            ),
                        )
                        await r.wait_blocked(f"trio_cluster tx {r.name}", reply.done)
                        await successor.execute("COMMIT", prepare=False)
                        await reply.finished.wait()
                        outcome = reply.value
                        if outcome == [ReplyOutcome.STALE_EPOCH]:
                            raise _Rollback
                        # Committing now records a stale reply (and the
                        # handler's write) after the successor's acquisition.
                except _Rollback:
                    pass
            assert outcome == [ReplyOutcome.STALE_EPOCH]
            assert (await replies_of(r.old.messages, 1)).final is None
            assert (await r.watcher.execute("SELECT count(*) FROM side_effects")).rows[
                0
            ][0] == 0


@pytest.mark.parametrize("requests", [1, 2], ids=["one-row", "batch"])
async def test_acquisition_leaves_out_a_shard_with_a_write_in_flight(
    pg_schema: PgSchema, requests: int
) -> None:
    """The other order: a fenced write that read the shard first holds the
    successor off until it commits. The acquisition neither waits for it (a
    lock statement that waits past its deadline would cost the successor its
    whole lock session) nor bumps the epoch: it leaves the shard out, and
    gets it at its next attempt, after the write. With two replies, the
    batch statement."""
    ids = range(1, requests + 1)
    with trio.fail_after(TIMEOUT):
        async with race(pg_schema) as r, trio.open_nursery() as nursery:
            for i in ids:
                r.epoch = await saved_and_claimed(r.old, persisted_request(i))
            await r.old.runners.release([SHARD])
            holder, _ = await r.connect("C")
            async with (
                holder,
                r.storage.open_session(
                    name=f"{r.name}-new", lease_duration=LEASE
                ) as new,
            ):
                await holder.execute("BEGIN", prepare=False)
                await holder.execute(
                    f"SELECT 1 FROM {r.messages_table} WHERE request_id = 1 FOR UPDATE"
                )
                reply = await background(
                    nursery,
                    lambda: r.old.messages.save_replies(
                        [final_reply(i, r.epoch, b"in time") for i in ids],
                        now=BASE_TIME,
                    ),
                )
                await r.wait_blocked(f"trio_cluster {r.name}")
                assert await new.runners.acquire([SHARD]) == {}
                await holder.execute("ROLLBACK", prepare=False)
                await reply.finished.wait()
                assert reply.value == [ReplyOutcome.RECORDED] * requests
                assert await new.runners.acquire([SHARD]) == {SHARD: r.epoch + 1}
            for i in ids:
                assert (await replies_of(r.old.messages, i)).final == b"in time"


async def test_state_batch_losing_a_race_of_first_saves_is_a_conflict(
    pg_schema: PgSchema,
) -> None:
    """Two first saves of one entity: the batch whose insert had to wait for
    the other's commit finds the row at version 1, writes nothing for it and
    reports a conflict; its other write is saved (the batch statement reports
    the rows it wrote, and the storage matches them to the writes)."""
    with trio.fail_after(TIMEOUT):
        async with race(pg_schema) as r, trio.open_nursery() as nursery:
            epoch = (await acquire_shards(r.old.runners, SHARD))[SHARD]
            store = r.old.messages
            assert isinstance(store, StateStorage)
            writes = [
                StateWrite(
                    address=entity_address(name),
                    epoch=epoch,
                    expected_version=0,
                    payload=name.encode(),
                )
                for name in ("x", "y")
            ]
            holder, _ = await r.connect("C")
            async with holder:
                await holder.execute("BEGIN", prepare=False)
                await holder.execute(
                    f"INSERT INTO {r.storage.names.entity_state} (entity_type,"
                    " entity_id, shard_group, shard_number, epoch, version,"
                    " payload, saved_at) VALUES ('Counter', 'x', $1, $2, $3, 1,"
                    " 'theirs', 0)",
                    [SHARD.group, SHARD.number, epoch],
                )
                saves = await background(
                    nursery, lambda: store.save_states(writes, now=BASE_TIME)
                )
                await r.wait_blocked(f"trio_cluster {r.name}")
                await holder.execute("COMMIT", prepare=False)
                await saves.finished.wait()
            assert saves.value == [StateOutcome.CONFLICT, StateOutcome.SAVED]
            theirs, mine = [await store.load_state(w.address) for w in writes]
            assert theirs == StoredState(b"theirs", 1, epoch)
            assert mine == StoredState(b"y", 1, epoch)
