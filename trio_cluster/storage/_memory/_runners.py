"""The runner half of `MemoryStorage`: sessions, registry, shard locks (edge adapter).

Theory of operation: a `Session` is one runner's session on a
`MemoryStorage` (its status, lease, held shards, registration and inbox).
`RunnerTable` holds the registry and the shard locks shared by every
session, and works synchronously; each session's `MemoryRunners` view runs
an operation's entry steps (fault hook, checkpoint, lease bookkeeping, see
`._storage`) and then calls one table method, so every operation is atomic.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

import attrs
import trio

from trio_cluster._core._addresses import ShardId
from trio_cluster._errors import PersistenceError
from trio_cluster._storage_abc import RunnerInfo, RunnerStorage, ShardOwner

from .._validation import (
    MACHINE_IDS,
    check_acquire,
    check_refresh,
    check_register,
    check_release,
)
from ._store import Inbox

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Collection

__all__ = ["MemoryRunners", "RunnerTable", "Session"]


@attrs.define(eq=False)
class Session:
    """One runner's session on a `MemoryStorage`."""

    name: str
    lease_duration: float
    last_heartbeat: float
    status: Literal["open", "closed", "killed"] = "open"
    """"closed" once its ``async with`` exited, "killed" by `kill_session`."""
    expired: bool = False
    held: set[ShardId] = attrs.Factory(set)
    registration: RunnerInfo | None = None
    displaced_id: int | None = None
    """The machine id of a registration a newer one of the same address
    replaced: reserved while this session is open (it may still mint ids)."""
    inbox: Inbox = attrs.Factory(Inbox)
    lost: trio.Event = attrs.Factory(trio.Event)
    """Set when this generation of the session loses its locks."""
    renewed: trio.Event = attrs.Factory(trio.Event)
    """Set when a new generation starts (after a lost one)."""

    def check_open(self) -> None:
        if self.status == "closed":
            raise trio.ClosedResourceError(f"storage session {self.name!r} is closed")
        if self.status == "killed":
            raise PersistenceError(f"storage session {self.name!r} was killed")

    @property
    def live(self) -> bool:
        return self.status == "open" and not self.expired


@attrs.define(eq=False)
class _ShardLock:
    """Who holds a shard, and its fencing epoch."""

    holder: Session | None = None
    epoch: int = 0


class RunnerTable:
    """The runner registry and the shard locks of one `MemoryStorage`.

    Shared by every session and synchronous: a session's `MemoryRunners`
    runs an operation's entry steps, then one method of this table.

    Args:
        sessions: the storage's open sessions, by name (shared, not copied).
        on_acquired: called with each shard acquired at a new epoch.
        fenced: whether a write still to commit holds a shard's fence (its
            epoch must not move: `acquire` leaves the shard out).
    """

    def __init__(
        self,
        sessions: dict[str, Session],
        *,
        on_acquired: Callable[[ShardId], None],
        fenced: Callable[[ShardId], bool],
    ) -> None:
        self._sessions = sessions
        self._handed_out: dict[int, int] = {}
        """When each machine id was last handed out (a registration count)."""
        self._registrations = 0
        self._locks: dict[ShardId, _ShardLock] = {}
        self._on_acquired = on_acquired
        self._fenced = fenced

    def epoch_of(self, shard: ShardId) -> int | None:
        """The current fencing epoch of ``shard`` (None if never acquired)."""
        lock = self._locks.get(shard)
        return None if lock is None else lock.epoch

    def expire(self, session: Session) -> None:
        """End ``session``'s lease: free its locks, mark its runner not live."""
        session.expired = True
        session.lost.set()
        for shard in session.held:
            self._locks[shard].holder = None
        session.held.clear()

    def heartbeat(self, session: Session, now: float) -> None:
        """Expire every lapsed lease, then renew ``session``'s (starting a
        new generation if it had lapsed)."""
        for other in self._sessions.values():
            if not other.expired and now - other.last_heartbeat > other.lease_duration:
                self.expire(other)
        if session.expired:
            session.expired = False
            session.lost = trio.Event()  # a new generation
            session.renewed.set()
            session.renewed = trio.Event()
        session.last_heartbeat = now

    def register(self, session: Session, runner: RunnerInfo) -> int:
        # Ids of expired (but open) sessions stay reserved: such a session may
        # come back to life and must not then share its id with a newcomer.
        others = [
            other
            for other in self._sessions.values()
            if other is not session and other.registration is not None
        ]
        for other in others:
            if (
                other.registration is not None
                and other.registration.address == runner.address
            ):
                # The newest registration wins; the displaced one keeps its
                # machine id reserved while its session is open.
                other.displaced_id = other.registration.machine_id
                other.registration = None
        used = {
            other.registration.machine_id
            for other in others
            if other.registration is not None
        } | {
            other.displaced_id
            for other in self._sessions.values()
            if other is not session and other.displaced_id is not None
        }
        if session.registration is not None:  # re-registering keeps the id
            machine_id = session.registration.machine_id
        else:
            # The free id handed out longest ago (never: the smallest first).
            # A runner that registers in the millisecond another one left
            # must not get its id: both would mint the same request ids (on
            # a virtual clock, that millisecond can last a whole test).
            handed_out = self._handed_out
            machine_id = min(
                (i for i in range(MACHINE_IDS) if i not in used),
                key=lambda i: (handed_out.get(i, -1), i),
                default=None,
            )
        if machine_id is None:
            raise PersistenceError(
                f"no free machine id: {MACHINE_IDS} runners are registered already"
            )
        self._registrations += 1
        self._handed_out[machine_id] = self._registrations
        session.registration = attrs.evolve(runner, machine_id=machine_id)
        session.displaced_id = None
        self.announce()
        return machine_id

    def announce(self) -> None:
        """Tell every session the registry changed (`RunnersChanged`); a
        session that ends without unregistering (killed) is not announced,
        as on PostgreSQL."""
        for session in self._sessions.values():
            session.inbox.add_runners_changed()
            session.inbox.lot.unpark_all()

    def live_runners(self) -> list[RunnerInfo]:
        live = [
            s.registration
            for s in self._sessions.values()
            if s.live and s.registration is not None
        ]
        # By address (host, port), without attrs' slow generated ordering.
        return sorted(live, key=lambda r: (r.address.host, r.address.port))

    def acquire(self, session: Session, shards: list[ShardId]) -> dict[ShardId, int]:
        held: dict[ShardId, int] = {}
        for shard in shards:
            lock = self._locks.get(shard)
            if lock is None:
                lock = self._locks[shard] = _ShardLock()
            if lock.holder is None and not self._fenced(shard):
                lock.holder = session
                lock.epoch += 1
                session.held.add(shard)
                self._on_acquired(shard)
            if lock.holder is session:
                held[shard] = lock.epoch
        return held

    def release(self, session: Session, shards: list[ShardId]) -> None:
        for shard in shards:
            if shard in session.held:
                session.held.remove(shard)
                self._locks[shard].holder = None

    def shard_owners(self) -> list[ShardOwner]:
        owners: list[ShardOwner] = []
        for shard in sorted(self._locks):
            lock = self._locks[shard]
            registration = None if lock.holder is None else lock.holder.registration
            address = None if registration is None else registration.address
            owners.append(ShardOwner(shard, address, lock.epoch))
        return owners


class MemoryRunners(RunnerStorage):
    """One session's `RunnerStorage` view on a `MemoryStorage`'s runner table.

    Args:
        table: the storage's registry and locks.
        session: the session this view belongs to.
        enter: runs an operation's entry steps (session checks, fault hook,
            checkpoint, lease bookkeeping), given the operation's name.
    """

    def __init__(
        self,
        table: RunnerTable,
        session: Session,
        *,
        enter: Callable[[str], Awaitable[None]],
    ) -> None:
        self._table = table
        self._session = session
        self._enter = enter
        self._reported: trio.Event | None = None

    async def wait_session_lost(self) -> None:
        # Report each generation's loss once: after a loss, wait for the next
        # generation to start before waiting for its loss.
        while self._session.lost is self._reported:
            await self._session.renewed.wait()
        lost = self._session.lost
        await lost.wait()
        self._reported = lost

    async def register(self, runner: RunnerInfo) -> int:
        runner = check_register(runner)
        await self._enter("register")
        return self._table.register(self._session, runner)

    async def unregister(self) -> None:
        await self._enter("unregister")
        self._session.registration = None
        self._table.announce()

    async def live_runners(self) -> list[RunnerInfo]:
        await self._enter("live_runners")
        return self._table.live_runners()

    async def acquire(self, shards: Collection[ShardId]) -> dict[ShardId, int]:
        checked = check_acquire(shards)
        await self._enter("acquire")
        return self._table.acquire(self._session, checked)

    async def refresh(self, shards: Collection[ShardId]) -> set[ShardId]:
        checked = check_refresh(shards)
        await self._enter("refresh")
        return {shard for shard in checked if shard in self._session.held}

    async def refresh_and_list(
        self, shards: Collection[ShardId]
    ) -> tuple[set[ShardId], list[RunnerInfo]]:
        # One operation (its entry steps run the lease bookkeeping first, so
        # the listing leaves out the sessions whose leases lapsed).
        checked = check_refresh(shards)
        await self._enter("refresh")
        held = {shard for shard in checked if shard in self._session.held}
        return held, self._table.live_runners()

    async def release(self, shards: Collection[ShardId]) -> None:
        checked = check_release(shards)
        await self._enter("release")
        self._table.release(self._session, checked)

    async def release_all(self) -> None:
        await self._enter("release_all")
        self._table.release(self._session, list(self._session.held))

    async def shard_owners(self) -> list[ShardOwner]:
        await self._enter("shard_owners")
        return self._table.shard_owners()
