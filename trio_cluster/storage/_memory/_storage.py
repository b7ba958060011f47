"""`MemoryStorage`: the storage contract kept in process memory (edge adapter).

One `MemoryStorage` is one shared "database". Every runner of a process (in
tests, the simulator and the demo) opens its own session on it, exactly as it
would open its own connection to PostgreSQL, so a cluster in one process
behaves like a real one. This module opens and ends the sessions and runs
the entry steps of every operation; the runner registry and the shard locks
live in `._runners`, the message "table" in `._store`, each session's
view on it in `._messages`, and durable entity state in `._state`.

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

from contextlib import AbstractAsyncContextManager, asynccontextmanager
from functools import partial
from typing import TYPE_CHECKING

import trio

from trio_cluster._errors import PersistenceError
from trio_cluster._storage_abc import (
    ShardOwner,
    Storage,
    StorageSession,
)
from trio_cluster._storage_webhooks import WebhookStorageProvider

from .._validation import check_open_session
from ._events import EventStore, MemoryEvents
from ._messages import MemoryMessages
from ._runners import MemoryRunners, RunnerTable, Session
from ._state import StateTable
from ._store import Inbox, MessageStore
from ._webhooks import MemoryWebhooks, WebhookTables

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Awaitable, Callable

    from trio_cluster._core._addresses import ShardId

__all__ = ["MemoryStorage"]


class MemoryStorage(Storage, WebhookStorageProvider):
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
        self._sessions: dict[str, Session] = {}
        self._runners = RunnerTable(
            self._sessions, on_acquired=self._new_epoch, fenced=self._fenced
        )
        self._messages = MessageStore(
            epoch_of=self._runners.epoch_of, inboxes=self._inboxes
        )
        self._states = StateTable(self._runners.epoch_of)
        self._events = EventStore(self._runners.epoch_of)
        self._webhooks = WebhookTables()

    def _new_epoch(self, shard: ShardId) -> None:
        self._messages.new_epoch(shard)

    def _fenced(self, shard: ShardId) -> bool:
        return self._messages.fenced(shard)

    def _epoch_of(self, shard: ShardId) -> int | None:
        """The current epoch of ``shard`` (read by the simulator's checks)."""
        return self._runners.epoch_of(shard)

    def epoch_of(self, shard: ShardId) -> int | None:
        """The current fencing epoch of ``shard`` (None if never acquired).

        A read-only view for tests and the simulator's checks; it does not
        run the fault hook and does not checkpoint.
        """
        return self._runners.epoch_of(shard)

    def has_request(self, request_id: int) -> bool:
        """Whether the persisted request ``request_id`` is stored (retention
        and ``clear_address`` delete requests).

        A read-only view for tests and the simulator's checks; it does not
        run the fault hook and does not checkpoint.
        """
        return request_id in self._messages._requests

    def _shard_owners(self) -> list[ShardOwner]:
        """Every shard ever acquired (read by the simulator's tests)."""
        return self._runners.shard_owners()

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
        lease = check_open_session(name, lease_duration)
        self._check_name_free(name)
        return self._session(name, lease)

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
        session = Session(name, lease_duration, trio.current_time())
        self._sessions[name] = session
        messages = MemoryMessages(
            self._messages,
            states=self._states,
            enter=partial(self._enter, session),
            inbox=session.inbox,
            check_open=session.check_open,
        )
        try:
            runners = MemoryRunners(
                self._runners, session, enter=partial(self._enter_leases, session)
            )
            events = MemoryEvents(
                self._events,
                messages=self._messages,
                enter=partial(self._enter, session),
            )
            yield StorageSession(messages=messages, runners=runners, events=events)
        finally:
            if session.status == "open":
                session.status = "closed"
                registered = session.registration is not None
                self._end(session)
                if registered:
                    self._runners.announce()  # as PostgreSQL's unregistering close

    @asynccontextmanager
    async def open_webhook_storage(self, *, name: str) -> AsyncIterator[MemoryWebhooks]:
        """Open a connection to this storage's webhook endpoints and attempts
        (see `trio_cluster.abc.WebhookStorageProvider`); ``name`` is what the
        fault hook is given as the session name. Nothing to close on exit."""
        if not isinstance(name, str):
            raise TypeError(f"name must be a str, got {name!r}")
        await self._call_hook(name, "open_webhook_storage")
        await trio.lowlevel.checkpoint()
        yield MemoryWebhooks(self._webhooks, partial(self._enter_webhooks, name))

    async def _enter_webhooks(self, name: str, operation: str) -> None:
        await self._call_hook(name, operation)
        await trio.lowlevel.checkpoint()

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
        self._runners.expire(self._find(name))

    def _find(self, name: str) -> Session:
        try:
            return self._sessions[name]
        except KeyError:
            raise KeyError(f"no open storage session named {name!r}") from None

    def _end(self, session: Session) -> None:
        del self._sessions[session.name]
        self._runners.expire(session)
        session.registration = None
        session.inbox.lot.unpark_all()

    async def _call_hook(self, name: str, operation: str) -> None:
        hook = self.fault_hook
        if hook is not None:
            try:
                await hook(name, operation)
            except Exception as exc:
                raise PersistenceError(
                    f"{operation} failed in storage session {name!r}: {exc!r}"
                ) from exc

    async def _enter(self, session: Session, operation: str) -> None:
        """Start an operation: session checks, fault hook, checkpoint."""
        session.check_open()
        await self._call_hook(session.name, operation)
        await trio.lowlevel.checkpoint()
        session.check_open()  # it may have been killed meanwhile

    async def _enter_leases(self, session: Session, operation: str) -> None:
        """Start a `RunnerStorage` operation: also expire every lapsed lease,
        then heartbeat ``session`` (a new generation if its lease lapsed)."""
        await self._enter(session, operation)
        self._runners.heartbeat(session, trio.current_time())
