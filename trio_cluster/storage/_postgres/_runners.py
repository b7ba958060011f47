"""The PostgreSQL `RunnerStorage`: registry, shard locks, leases (edge adapter).

Theory of operation: every call is one operation of the session's
`LockSession` (the dedicated lock connection, see `._locks`), so it renews
the server session's ``idle_session_timeout`` lease, runs under the lock
deadline, and on failure ends the session (a new generation holds nothing).

* A shard's lock is the session advisory lock ``(namespace, id)`` where
  ``id`` is its row in ``shards`` (created on first acquisition). `acquire`
  is one statement: try-lock every wanted shard this generation does not hold
  yet (advisory locks are re-entrant, so a held key is never locked twice),
  then bump the epoch of those it got, except those whose ``shards`` row a
  fenced write in flight holds (``SKIP LOCKED``): they are unlocked again and
  left out, so the statement never waits for a row lock. `release`/`release_all` unlock in one
  statement, and concurrent `release` calls share one (`_Release`): a runner
  that stops its shards one by one at shutdown does not send one statement
  per shard. `refresh` is a heartbeat plus the generation's own bookkeeping:
  the same connection still holds what it locked; `refresh_and_list` adds
  the live runners to the heartbeat's statement (the runner's only periodic
  statement).
* A runner is *live*
 while its session holds ``(namespace, -id)``, ``id``
  being its row in ``runners``; `live_runners` and `shard_owners` join
  ``pg_locks``. The registration row outlives a lost generation: the next
  one takes the liveness lock again (`RunnerStorage.register`). Machine ids
  stay reserved for registered rows, live or not; rows of runners that are
  not live and were not heard of for ``max(60 s, 10 leases)`` are deleted by
  the next registration.
* The newest registration of an address wins. The row of a previous
  registration of the address is deleted if its session is gone; if its
  session is still alive (a process that may still be running, e.g. frozen,
  and still minting Snowflake ids with its machine id), the row is
  *displaced* instead: its port becomes ``-id`` (never a real port), it no
  longer counts as a live runner or a shard holder, but it keeps its machine
  id reserved until that session ends, so the newcomer gets a different one.
  The displaced session notices at its next call (it is no longer
  registered).
"""

from __future__ import annotations

import logging
import secrets
from functools import partial
from typing import TYPE_CHECKING, TypeVar

import attrs
import trio

from trio_cluster._core._addresses import RunnerAddress, ShardId
from trio_cluster._errors import PersistenceError
from trio_cluster._storage_abc import RunnerInfo, RunnerStorage, ShardOwner

from .._validation import (
    MACHINE_IDS,
    check_acquire,
    check_refresh,
    check_register,
    check_release,
)
from ._locks import LockSession
from ._runner_queries import RunnerQueries

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Collection, Iterable

    from ._driver._driver import PgConnection
    from ._driver._protocol import Row
    from ._locks import Generation, LockSessionStatistics
    from ._schema import PgNames

__all__ = ["PgRunners"]

log = logging.getLogger("trio_cluster.storage.postgres")

T = TypeVar("T")


@attrs.define(eq=False)
class _Release:
    """One `PgRunners.release` call, waiting for its statement.

    Operations run on the lock connection one at a time, in the order they
    started. When a release call's turn comes, its statement also unlocks
    the shards of the release calls queued behind it with no other
    operation started in between (the same ``barrier``): moving those
    earlier cannot reorder them with anything (an ``acquire`` started in
    between must still find its shard held). At shutdown, the runner
    releases its shards one by one as each stops: this turns hundreds of
    statements into a few.
    """

    shards: list[ShardId]
    barrier: int
    """`PgRunners._barrier` when the call started."""
    taken: bool = False
    """A statement (started, maybe finished) is unlocking these shards."""


class PgRunners(RunnerStorage):
    """One session's `RunnerStorage` on PostgreSQL (see the module docstring).

    Args:
        names: the cluster's names.
        lease_duration: the session's lease (stored with its registration).
        connect: opens a new lock connection (with the lease as its
            ``idle_session_timeout``), for the `LockSession`.
        operation_timeout: deadline of each lock-connection operation.
    """

    def __init__(
        self,
        names: PgNames,
        *,
        lease_duration: float,
        connect: Callable[[], Awaitable[PgConnection]],
        operation_timeout: float,
    ) -> None:
        self._names = names
        self._ns = names.namespace
        self._lock_class = names.namespace & 0xFFFF_FFFF  # classid in pg_locks
        self._q = RunnerQueries.build(names)
        self._lease = lease_duration
        self._token = secrets.token_hex(16)
        self._registration: RunnerInfo | None = None
        self._row_id: int | None = None
        self._shard_ids: dict[ShardId, int] = {}
        self._releases: list[_Release] = []
        """`release` calls whose shards no statement has unlocked yet."""
        self._barrier = 0
        """Lock operations other than `release` started so far."""
        self.locks = LockSession(
            connect,
            operation_timeout=operation_timeout,
            on_new_generation=self._restore_liveness,
        )
        """The session's lock connection (its backend pid is shown by tests)."""

    async def _run(
        self, what: str, operation: Callable[[PgConnection, Generation], Awaitable[T]]
    ) -> T:
        """Run an operation other than `release` on the lock connection."""
        self._barrier += 1
        return await self.locks.run(what, operation)

    def statistics(self) -> LockSessionStatistics:
        """Counters of the lock connection (statements, generations)."""
        return self.locks.statistics()

    async def connect(self) -> None:
        """Open the first lock connection (fails if the server is unreachable)."""
        await self.locks.run("connect", _nothing)

    async def aclose(self) -> None:
        """Unregister, unlock everything and close the lock connection
        (shielded, bounded; see `LockSession.aclose`)."""
        await self.locks.aclose(self._cleanup)

    # ------------------------------------------------------------------
    # Generations

    async def _restore_liveness(self, conn: PgConnection, state: Generation) -> None:
        """Take the liveness lock again (in a new lock session, or if an
        earlier attempt found the previous backend still holding it)."""
        if self._row_id is None or state.live_id == self._row_id:
            return
        result = await conn.execute(
            self._q.restore, [self._ns, self._row_id, self._token]
        )
        if not result.rows:  # taken over by a newer registration, or deleted
            self._registration = self._row_id = None
        elif result.rows[0][0]:
            state.live_id = self._row_id
        # else: the previous backend has not exited yet; retried next call.

    async def _heartbeat(self, conn: PgConnection, state: Generation) -> None:
        if self._row_id is None:
            await conn.execute("SELECT 1")
            return
        result = await conn.execute(self._q.heartbeat, [self._row_id, self._token])
        self._beaten(result.rows[0][0] if result.rows else None)

    def _beaten(self, registered: bool | None) -> None:
        """Note what a heartbeat found (None: no registration row)."""
        if registered is None:  # deleted (e.g. by another registration's gc)
            self._registration = self._row_id = None
        elif not registered:
            # Displaced by a newer registration of our address: no longer
            # registered, but the row (and our machine id) stays reserved
            # while this session lives, so keep heartbeating it.
            self._registration = None

    async def _cleanup(self, conn: PgConnection, state: Generation) -> None:
        """At session exit: unregister and unlock everything."""
        await conn.execute(self._q.close, [self._token, self._names.channel])
        state.held.clear()
        state.live_id = None
        self._registration = self._row_id = None

    # ------------------------------------------------------------------
    # Registry

    async def register(self, runner: RunnerInfo) -> int:
        runner = check_register(runner)
        registered = await self._run(
            "register", lambda conn, state: self._register(runner, conn, state)
        )
        if registered is None:
            raise PersistenceError(
                f"no free machine id: {MACHINE_IDS} runners are registered already"
            )
        return registered

    async def _register(
        self, runner: RunnerInfo, conn: PgConnection, state: Generation
    ) -> int | None:
        address = runner.address
        params: list[object] = [
            address.host,
            address.port,
            list(runner.groups),
            float(runner.weight),
            self._lease,
            self._token,
            self._ns,
            state.live_id or 0,
        ]
        # One transaction, serialized with other registrations by the
        # transaction lock (namespace, 0).
        results = await conn.execute_pipeline(
            [
                ("SELECT pg_advisory_xact_lock($1::int4, 0)", [self._ns]),
                (self._q.register_gc, [self._lock_class, self._token]),
                (
                    self._q.register_takeover,
                    [self._lock_class, address.host, address.port, self._token],
                ),
                (self._q.register, params),
                (self._q.announce, [self._names.channel]),
            ]
        )
        rows = results[-2].rows
        if not rows:
            return None
        row_id, machine_id, live = rows[0]
        if state.live_id is not None and state.live_id != row_id:
            # Our old row was deleted meanwhile: drop its orphaned lock.
            await conn.execute(self._q.unlock, [self._ns, [-state.live_id]])
            state.live_id = None
        if live:
            state.live_id = row_id
        self._row_id = row_id
        self._registration = attrs.evolve(runner, machine_id=machine_id)
        return int(machine_id)

    async def unregister(self) -> None:
        await self._run("unregister", self._unregister)

    async def _unregister(self, conn: PgConnection, state: Generation) -> None:
        await conn.execute(
            self._q.unregister,
            [self._token, self._ns, state.live_id or 0, self._names.channel],
        )
        state.live_id = None
        self._registration = self._row_id = None

    async def _listing(
        self, query: str, conn: PgConnection, state: Generation
    ) -> list[Row]:
        """The rows of a query on the cluster's locks (``self._lock_class``)."""
        await self._restore_liveness(conn, state)
        return (await conn.execute(query, [self._lock_class])).rows

    async def live_runners(self) -> list[RunnerInfo]:
        rows = await self._run("live_runners", partial(self._listing, self._q.live))
        return _runner_infos(rows)

    # ------------------------------------------------------------------
    # Shard locks

    async def acquire(self, shards: Collection[ShardId]) -> dict[ShardId, int]:
        checked = list(dict.fromkeys(check_acquire(shards)))
        return await self._run(
            "acquire", lambda conn, state: self._acquire(checked, conn, state)
        )

    async def _acquire(
        self, shards: list[ShardId], conn: PgConnection, state: Generation
    ) -> dict[ShardId, int]:
        await self._restore_liveness(conn, state)
        acquired = {s: state.held[s][1] for s in shards if s in state.held}
        wanted = [shard for shard in shards if shard not in state.held]
        if not wanted:
            await self._heartbeat(conn, state)
            return acquired
        statements: list[tuple[str, list[object]]] = []
        if any(shard not in self._shard_ids for shard in wanted):
            columns = [[s.group for s in wanted], [s.number for s in wanted]]
            statements.append((self._q.insert_shards, columns))
        owner = None if self._registration is None else str(self._registration.address)
        groups, numbers = [s.group for s in wanted], [s.number for s in wanted]
        statements.append((self._q.lock_shards, [groups, numbers, self._ns, owner]))
        results = await conn.execute_pipeline(statements)
        for group, number, key, epoch in results[-1].rows:
            shard = ShardId(group, number)
            self._shard_ids[shard] = key
            if epoch is not None:
                state.held[shard] = (key, epoch)
                acquired[shard] = epoch
        return acquired

    async def refresh(self, shards: Collection[ShardId]) -> set[ShardId]:
        checked = check_refresh(shards)
        return await self._run(
            "refresh", lambda conn, state: self._refresh(checked, conn, state)
        )

    async def _refresh(
        self, shards: list[ShardId], conn: PgConnection, state: Generation
    ) -> set[ShardId]:
        await self._restore_liveness(conn, state)
        await self._heartbeat(conn, state)
        return {shard for shard in shards if shard in state.held}

    async def refresh_and_list(
        self, shards: Collection[ShardId]
    ) -> tuple[set[ShardId], list[RunnerInfo]]:
        checked = check_refresh(shards)
        return await self._run(
            "refresh", lambda conn, state: self._refresh_and_list(checked, conn, state)
        )

    async def _refresh_and_list(
        self, shards: list[ShardId], conn: PgConnection, state: Generation
    ) -> tuple[set[ShardId], list[RunnerInfo]]:
        await self._restore_liveness(conn, state)
        held = {shard for shard in shards if shard in state.held}
        if self._row_id is None:  # not registered: nothing to heartbeat
            live = await conn.execute(self._q.live, [self._lock_class])
            return held, _runner_infos(live.rows)
        result = await conn.execute(
            self._q.heartbeat_live, [self._lock_class, self._row_id, self._token]
        )
        beat = [row for row in result.rows if row[0]]
        self._beaten(beat[0][1] if beat else None)
        return held, _runner_infos([row[2:] for row in result.rows if not row[0]])

    async def release(self, shards: Collection[ShardId]) -> None:
        """Unlock shards; concurrent calls share statements (see `_Release`).

        On cancellation (or failure) before its statement ran, nothing of
        this call is released by a later one.
        """
        checked = check_release(shards)
        request = _Release(checked, self._barrier)
        self._releases.append(request)
        try:
            await self.locks.run(
                "release",
                lambda conn, state: self._release_batch(request, conn, state),
            )
        finally:
            if not request.taken:
                self._releases.remove(request)

    async def _release_batch(
        self, request: _Release, conn: PgConnection, state: Generation
    ) -> None:
        if request.taken:
            # An earlier call's statement released these shards (and has
            # finished: operations take turns), or its connection was lost
            # with every lock of its generation.
            await trio.lowlevel.checkpoint()
            return
        batch = [r for r in self._releases if r.barrier == request.barrier]
        for taken in batch:
            taken.taken = True
        self._releases = [r for r in self._releases if not r.taken]
        await self._release([s for r in batch for s in r.shards], conn, state)

    async def release_all(self) -> None:
        await self._run(
            "release_all",
            lambda conn, state: self._release(list(state.held), conn, state),
        )

    async def _release(
        self, shards: list[ShardId], conn: PgConnection, state: Generation
    ) -> None:
        await self._restore_liveness(conn, state)
        keys = {state.held[s][0]: s for s in shards if s in state.held}
        if not keys:
            await self._heartbeat(conn, state)
            return
        await conn.execute(self._q.unlock, [self._ns, list(keys)])
        for shard in keys.values():
            del state.held[shard]

    async def wait_session_lost(self) -> None:
        await self.locks.wait_session_lost()

    async def shard_owners(self) -> list[ShardOwner]:
        rows = await self._run("shard_owners", partial(self._listing, self._q.owners))
        owners = [
            ShardOwner(
                ShardId(group, number),
                None if host is None else RunnerAddress(host, port),
                epoch,
            )
            for group, number, epoch, host, port in rows
        ]
        return sorted(owners, key=lambda owner: owner.shard)


def _runner_infos(rows: Iterable[Row]) -> list[RunnerInfo]:
    """Live runners from rows of ``(host, port, groups, weight, machine_id)``,
    sorted by address."""
    runners: list[RunnerInfo] = []
    for host, port, groups, weight, machine_id in rows:
        try:
            address = RunnerAddress(host, port)
        except (TypeError, ValueError) as exc:
            # Not a registration of ours (a hand edit, another program):
            # leave it out rather than fail every caller's listing.
            log.warning("ignoring a registered runner at %r:%r: %s", host, port, exc)
            continue
        runners.append(
            RunnerInfo(
                address=address,
                groups=tuple(groups),
                weight=weight,
                machine_id=machine_id,
            )
        )
    return sorted(runners, key=lambda runner: runner.address)


async def _nothing(conn: PgConnection, state: Generation) -> None:
    await trio.lowlevel.checkpoint()
