"""`MemoryStorage`: the storage contract kept in process memory (edge adapter).

One `MemoryStorage` is one shared "database". Every runner of a process (in
tests, the simulator and the demo) opens its own session on it, exactly as it
would open its own connection to PostgreSQL, so a cluster in one process
behaves like a real one. This module holds the sessions, the runner registry
and the shard locks; the message "table" lives in `_memory_messages`.

Theory of operation: every operation runs the optional fault hook, then
checkpoints, and then does all its work synchronously, so each operation is
atomic (the moral equivalent of one transaction).

Leases are evaluated lazily with `trio.current_time` (so ``MockClock`` works):
whenever any session touches the lock or registry state, every session whose
`RunnerStorage` was not called for longer than its lease duration is expired:
its locks are freed and its runner is not live. Its next `RunnerStorage` call
starts a new *generation*, like a reconnect: the registration is live again,
the locks are not (`refresh` reports them gone).
"""

from __future__ import annotations

import math
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from functools import partial
from typing import TYPE_CHECKING, Literal

import attrs
import trio

from trio_cluster._core._addresses import ShardId
from trio_cluster._errors import PersistenceError
from trio_cluster._storage_abc import (
    RunnerInfo,
    RunnerStorage,
    ShardOwner,
    Storage,
    StorageSession,
)

from .._validation import MACHINE_IDS, RUNNER_FIELDS, check_fields, check_items
from ._messages import Inbox, MemoryMessages, MessageStore

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Awaitable, Callable, Collection

__all__ = ["MemoryStorage"]


@attrs.define(eq=False)
class _Session:
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
    holder: _Session | None = None
    epoch: int = 0


class MemoryStorage(Storage):
    """An in-process storage backend shared by every runner of the process.

    Open one session per runner with `open_session`. It behaves as the
    contract of `trio_cluster.abc.Storage` says; leases are measured with
    `trio.current_time`, so they run on virtual time under ``MockClock``.

    Fault injection, for tests and the simulator:

    * `kill_session` ends a session as if its process was killed;
    * `expire_session` ends a session's lease as if it was not refreshed;
    * `fault_hook`, when set, is awaited as ``await hook(session_name,
      operation_name)`` at the start of every operation of every session
      (``operation_name`` is the method's name, or ``"open_session"``). An
      exception it raises (other than `trio.Cancelled`) fails the operation
      with `PersistenceError`, with that exception as ``__cause__``; sleeping
      in it makes the operation hang until the caller's deadline. A
      transaction's statements are operations too, named ``"execute"`` (a
      failure there is the transaction's ``failure``).
    """

    def __init__(self) -> None:
        self.fault_hook: Callable[[str, str], Awaitable[None]] | None = None
        """Awaited at the start of every operation (see the class docstring)."""
        self._sessions: dict[str, _Session] = {}
        self._locks: dict[ShardId, _ShardLock] = {}
        self._messages = MessageStore(epoch_of=self._epoch_of, inboxes=self._inboxes)

    def _epoch_of(self, shard: ShardId) -> int | None:
        lock = self._locks.get(shard)
        return None if lock is None else lock.epoch

    def _inboxes(self) -> list[Inbox]:
        return [session.inbox for session in self._sessions.values()]

    # ------------------------------------------------------------------
    # Sessions

    def open_session(
        self, *, name: str, lease_duration: float
    ) -> AbstractAsyncContextManager[StorageSession]:
        """Open one runner's session (see `Storage.open_session`).

        Args:
            name: unique among the open sessions of this storage; used by
                `kill_session`, `expire_session` and `fault_hook`.
            lease_duration: seconds without a `RunnerStorage` call after which
                the session's locks are freed and its runner is not live.

        Raises:
            TypeError: ``name`` is not a str or ``lease_duration`` not a number.
            ValueError: ``lease_duration`` is not positive and finite, or a
                session named ``name`` is already open.

        On exit (also on cancellation or an error in the body) the session is
        closed: its locks are freed, its runner unregistered, and further
        calls on it raise `trio.ClosedResourceError`.
        """
        if not isinstance(name, str):
            raise TypeError(f"session name must be a str, got {name!r}")
        if isinstance(lease_duration, bool) or not isinstance(
            lease_duration, int | float
        ):
            raise TypeError(
                f"lease_duration must be a number of seconds, got {lease_duration!r}"
            )
        if not 0 < lease_duration < math.inf:
            raise ValueError(
                f"lease_duration must be positive and finite, got {lease_duration!r}"
            )
        self._check_name_free(name)
        return self._session(name, float(lease_duration))

    def _check_name_free(self, name: str) -> None:
        if name in self._sessions:
            raise ValueError(f"a storage session named {name!r} is already open")

    @asynccontextmanager
    async def _session(
        self, name: str, lease_duration: float
    ) -> AsyncIterator[StorageSession]:
        await self._call_hook(name, "open_session")
        await trio.lowlevel.checkpoint()
        self._check_name_free(name)  # again: another task may have won the race
        session = _Session(name, lease_duration, trio.current_time())
        self._sessions[name] = session
        messages = MemoryMessages(
            self._messages,
            enter=partial(self._enter, session),
            inbox=session.inbox,
            check_open=session.check_open,
        )
        try:
            yield StorageSession(
                messages=messages, runners=_MemoryRunners(self, session)
            )
        finally:
            if session.status == "open":
                session.status = "closed"
                self._end(session)

    def kill_session(self, name: str) -> None:
        """End the open session ``name`` as if its process was SIGKILLed.

        Its locks are freed and its runner is unregistered; every further call
        on it (including a pending `wait_notifications`) raises
        `PersistenceError`. Leaving its ``async with`` block is still fine.

        Raises:
            KeyError: no open session has that name.
        """
        session = self._find(name)
        session.status = "killed"
        self._end(session)

    def expire_session(self, name: str) -> None:
        """End the lease of the open session ``name`` now, as if it had not
        been refreshed in time (e.g. its database session was lost).

        Its locks are freed and its runner is not live, until the session's
        next `RunnerStorage` call starts a new generation.

        Raises:
            KeyError: no open session has that name.
        """
        self._expire(self._find(name))

    def _find(self, name: str) -> _Session:
        try:
            return self._sessions[name]
        except KeyError:
            raise KeyError(f"no open storage session named {name!r}") from None

    def _end(self, session: _Session) -> None:
        del self._sessions[session.name]
        self._expire(session)
        session.registration = None
        session.inbox.lot.unpark_all()

    def _expire(self, session: _Session) -> None:
        session.expired = True
        session.lost.set()
        for shard in session.held:
            self._locks[shard].holder = None
        session.held.clear()

    async def _call_hook(self, name: str, operation: str) -> None:
        hook = self.fault_hook
        if hook is not None:
            try:
                await hook(name, operation)
            except Exception as exc:
                raise PersistenceError(
                    f"{operation} failed in storage session {name!r}: {exc!r}"
                ) from exc

    async def _enter(self, session: _Session, operation: str) -> None:
        """Start an operation: session checks, fault hook, checkpoint."""
        session.check_open()
        await self._call_hook(session.name, operation)
        await trio.lowlevel.checkpoint()
        session.check_open()  # it may have been killed meanwhile

    async def _enter_leases(self, session: _Session, operation: str) -> None:
        """Start a `RunnerStorage` operation: also expire every lapsed lease,
        then heartbeat ``session`` (a new generation if its lease lapsed)."""
        await self._enter(session, operation)
        now = trio.current_time()
        for other in self._sessions.values():
            if not other.expired and now - other.last_heartbeat > other.lease_duration:
                self._expire(other)
        if session.expired:
            session.expired = False
            session.lost = trio.Event()  # a new generation
            session.renewed.set()
            session.renewed = trio.Event()
        session.last_heartbeat = now

    # ------------------------------------------------------------------
    # Registry and locks (used by _MemoryRunners)

    def _register(self, session: _Session, runner: RunnerInfo) -> int:
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
            machine_id = next((i for i in range(MACHINE_IDS) if i not in used), None)
        if machine_id is None:
            raise PersistenceError(
                f"no free machine id: {MACHINE_IDS} runners are registered already"
            )
        session.registration = attrs.evolve(runner, machine_id=machine_id)
        session.displaced_id = None
        return machine_id

    def _live_runners(self) -> list[RunnerInfo]:
        live = [
            s.registration
            for s in self._sessions.values()
            if s.live and s.registration is not None
        ]
        # By address (host, port), without attrs' slow generated ordering.
        return sorted(live, key=lambda r: (r.address.host, r.address.port))

    def _acquire(self, session: _Session, shards: list[ShardId]) -> dict[ShardId, int]:
        held: dict[ShardId, int] = {}
        for shard in shards:
            lock = self._locks.get(shard)
            if lock is None:
                lock = self._locks[shard] = _ShardLock()
            if lock.holder is None:
                lock.holder = session
                lock.epoch += 1
                session.held.add(shard)
                self._messages.new_epoch(shard)
            if lock.holder is session:
                held[shard] = lock.epoch
        return held

    def _release(self, session: _Session, shards: list[ShardId]) -> None:
        for shard in shards:
            if shard in session.held:
                session.held.remove(shard)
                self._locks[shard].holder = None

    def _shard_owners(self) -> list[ShardOwner]:
        owners: list[ShardOwner] = []
        for shard in sorted(self._locks):
            lock = self._locks[shard]
            registration = None if lock.holder is None else lock.holder.registration
            address = None if registration is None else registration.address
            owners.append(ShardOwner(shard, address, lock.epoch))
        return owners


class _MemoryRunners(RunnerStorage):
    """One session's `RunnerStorage` view on a `MemoryStorage`."""

    def __init__(self, storage: MemoryStorage, session: _Session) -> None:
        self._storage = storage
        self._session = session
        self._reported: trio.Event | None = None

    async def _enter(self, operation: str) -> None:
        await self._storage._enter_leases(self._session, operation)

    async def wait_session_lost(self) -> None:
        # Report each generation's loss once: after a loss, wait for the next
        # generation to start before waiting for its loss.
        while self._session.lost is self._reported:
            await self._session.renewed.wait()
        lost = self._session.lost
        await lost.wait()
        self._reported = lost

    async def register(self, runner: RunnerInfo) -> int:
        if not isinstance(runner, RunnerInfo):
            raise TypeError(f"runner must be a RunnerInfo, got {runner!r}")
        check_fields(runner, RUNNER_FIELDS)
        check_items(runner.groups, str, "RunnerInfo.groups")
        await self._enter("register")
        return self._storage._register(self._session, runner)

    async def unregister(self) -> None:
        await self._enter("unregister")
        self._session.registration = None

    async def live_runners(self) -> list[RunnerInfo]:
        await self._enter("live_runners")
        return self._storage._live_runners()

    async def acquire(self, shards: Collection[ShardId]) -> dict[ShardId, int]:
        checked = check_items(shards, ShardId, "shards")
        await self._enter("acquire")
        return self._storage._acquire(self._session, checked)

    async def refresh(self, shards: Collection[ShardId]) -> set[ShardId]:
        checked = check_items(shards, ShardId, "shards")
        await self._enter("refresh")
        return {shard for shard in checked if shard in self._session.held}

    async def release(self, shards: Collection[ShardId]) -> None:
        checked = check_items(shards, ShardId, "shards")
        await self._enter("release")
        self._storage._release(self._session, checked)

    async def release_all(self) -> None:
        await self._enter("release_all")
        self._storage._release(self._session, list(self._session.held))

    async def shard_owners(self) -> list[ShardOwner]:
        await self._enter("shard_owners")
        return self._storage._shard_owners()
