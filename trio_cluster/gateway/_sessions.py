"""Reliable pushes: a session entity per client session, its un-acked
buffer, acks, redelivery and bounded retries (an entity, and the gateway's
side of a session; Trio driver).

Theory of operation.

* **A session** is named by the client: it sends a random token
  (``?session=...``) when it connects, the same one after every reconnect,
  to any gateway of the cluster. When the gateway has sessions, the socket
  *attaches* to the `Session` entity of that name: it opens the entity's
  ``attach`` stream and forwards each item as a ``push`` frame. A newer
  attach replaces an older one (the client moved: the old socket's stream
  ends), so a push reaches the client wherever it is connected.
* **Binding.** The first attach records the socket's user (the
  ``Gateway.user`` hook's answer for its principal); an attach from
  another user is refused (`SessionTakenError`): a session token is
  not a way into somebody else's pushes.
* **Pushes** (`send_reliable`) are numbered in the session's *epoch* (an
  incarnation of the entity) and kept until acked. Each is sent to the
  attached socket, if any, and again to every socket that attaches later;
  after each ``Session.ack_timeout`` without its ack it is sent again, and
  after ``Session.max_redeliveries`` such timeouts it is given up: the
  caller's `send_reliable` raises `PushFailedError` and the gateway counts
  it. `send_reliable` returns once the client acked it.
* **Clients** ack every push they receive (``{"t": "ack", "epoch": ...,
  "seqs": [...]}``), hand it over once, and drop the copies a redelivery
  sends them (by epoch and sequence number).
* **What is not kept.** The buffer lives in memory: if the session's
  entity stops (its runner dies), the pushes waiting in it fail at their
  callers (as any call to a lost entity), and the client gets a new epoch.
"""

from __future__ import annotations

import logging
import random
import re
import secrets
from collections.abc import AsyncIterator  # noqa: TC003 - handler annotations resolve at runtime
from typing import TYPE_CHECKING, Any, ClassVar, Final, TypeGuard

import attrs
import trio

from .._core._retry import Backoff
from .._entity import Entity
from .._handlers import rpc, stream

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from .._client import EntityClient
    from .._runner import Runner

__all__ = [
    "Ack",
    "Attach",
    "PushFailedError",
    "Pushed",
    "Session",
    "SessionLink",
    "SessionTakenError",
    "send_reliable",
    "valid_session",
]

log = logging.getLogger("trio_cluster.gateway")

_SESSION_NAME: Final = re.compile(r"[A-Za-z0-9_-]{16,64}")


def valid_session(name: str | None) -> TypeGuard[str]:
    """Whether ``name`` is a session token clients may use (16-64 of
    ``A-Z a-z 0-9 _ -``)."""
    return name is not None and _SESSION_NAME.fullmatch(name) is not None


@attrs.define(eq=False, kw_only=True)
class PushFailedError(Exception):
    """A reliable push was not acked after its redeliveries (or its session
    ended before it was)."""

    session: str
    seq: int
    attempts: int

    def __str__(self) -> str:
        return (
            f"push {self.seq} to session {self.session!r} not acked after "
            f"{self.attempts} deliveries"
        )


@attrs.define(eq=False, kw_only=True)
class SessionTakenError(Exception):
    """The session belongs to another user."""

    session: str


@attrs.frozen
class Push:
    data: Any
    user: str | None = None
    """For a push addressed to a user: the session must be that user's."""


@attrs.frozen
class Pushed:
    """One push, as the attached gateway gets it."""

    epoch: str
    seq: int
    data: Any


@attrs.frozen
class Ack:
    epoch: str
    seqs: list[int]


@attrs.frozen
class Attach:
    user: str | None = None


@attrs.define
class _Waiting:
    pushed: Pushed
    acked: trio.Event = attrs.field(factory=trio.Event)


class Session(Entity):
    """A client session's un-acked pushes (see the module docstring).
    Runners that serve gateways with sessions host it."""

    type_name = "trio_cluster.gateway.Session"
    concurrency = 100_000  # every push waits for its ack at once
    ack_timeout: ClassVar[float] = 5.0
    """Seconds to wait for an ack before sending a push again."""
    max_redeliveries: ClassVar[int] = 3
    """Redeliveries before a push is given up (`PushFailedError`)."""
    max_unacked: ClassVar[int] = 1000
    """Pushes waiting for their ack; one more is refused at once."""

    def __init__(self) -> None:
        self.epoch = secrets.token_hex(8)
        self.seq = 0
        self.user: str | None = None
        self.bound = False
        self.waiting: dict[int, _Waiting] = {}
        self.attached: trio.MemorySendChannel[Pushed] | None = None
        self.redelivered = 0
        self.failed = 0

    def _send(self, pushed: Pushed) -> None:
        channel = self.attached
        if channel is None:
            return
        try:
            channel.send_nowait(pushed)
        except (trio.WouldBlock, trio.BrokenResourceError, trio.ClosedResourceError):
            channel.close()  # too slow, or gone: its socket attaches again
            self.attached = None

    def _keep(self) -> None:
        self.keep_alive(self.attached is not None or bool(self.waiting))

    @rpc(errors=[PushFailedError, SessionTakenError])
    async def push(self, msg: Push) -> int:
        """Send ``msg.data`` to the client; return its sequence number once
        acked. A push for ``msg.user`` binds a session bound to no one yet
        to that user.

        Raises:
            PushFailedError: not acked after ``max_redeliveries``, or more
                than ``max_unacked`` pushes wait already.
            SessionTakenError: the push is for a user, and the session is
                another user's (or no user's).
        """
        if msg.user is not None:
            if self.bound and self.user != msg.user:
                raise SessionTakenError(session=self.id)
            self.bound, self.user = True, msg.user
        self.seq += 1
        pushed = Pushed(self.epoch, self.seq, msg.data)
        if len(self.waiting) >= self.max_unacked:
            self.failed += 1
            raise PushFailedError(session=self.id, seq=pushed.seq, attempts=0)
        waiting = self.waiting[pushed.seq] = _Waiting(pushed)
        self._keep()
        try:
            self._send(pushed)
            for attempt in range(1, self.max_redeliveries + 2):
                with trio.move_on_after(self.ack_timeout):
                    await waiting.acked.wait()
                    return pushed.seq
                if attempt <= self.max_redeliveries:
                    self.redelivered += 1
                    self._send(pushed)
            self.failed += 1
            raise PushFailedError(
                session=self.id, seq=pushed.seq, attempts=self.max_redeliveries + 1
            )
        finally:
            self.waiting.pop(pushed.seq, None)
            self._keep()

    @rpc
    async def ack(self, msg: Ack) -> None:
        """The client got these pushes."""
        if msg.epoch != self.epoch:
            return
        for seq in msg.seqs:
            waiting = self.waiting.get(seq)
            if waiting is not None:
                waiting.acked.set()

    @stream(errors=[SessionTakenError])
    async def attach(self, msg: Attach) -> AsyncIterator[Pushed]:
        """The pushes not acked yet, then each new one, until another
        socket attaches (or this one goes).

        Raises:
            SessionTakenError: the session is bound to another user.
        """
        if self.bound and msg.user != self.user:
            raise SessionTakenError(session=self.id)
        self.bound, self.user = True, msg.user
        previous = self.attached
        if previous is not None:
            previous.close()  # the client moved: that socket's stream ends
        send, receive = trio.open_memory_channel[Pushed](self.max_unacked + 16)
        self.attached = send
        for waiting in sorted(self.waiting.values(), key=lambda w: w.pushed.seq):
            send.send_nowait(waiting.pushed)
        self._keep()
        try:
            async with receive:
                async for pushed in receive:
                    yield pushed
        finally:
            if self.attached is send:
                self.attached = None
            self._keep()


async def send_reliable(runner: Runner, session: str, data: Any) -> int:
    """Push ``data`` (plain data) to the client of ``session``, wherever it
    is connected (or once it connects again), and wait for its ack.

    Returns:
        The push's sequence number in the session.

    Raises:
        PushFailedError: not acked after the redeliveries (`Session`'s
            ``ack_timeout`` and ``max_redeliveries``), or too many pushes
            wait for the session already.
        ValueError: ``session`` is not a valid name.
        RunnerUnavailableError, RemoteError...: as any call to an entity
            (the session's entity was lost: the push may or may not have
            reached the client).

    Cancellation: stops waiting; the push stays in the session until acked
    or given up.
    """
    seq: int = await runner.client(Session)(session).push(Push(data))
    return seq


class SessionLink:
    """A socket's attachment to its session: forwards the session's pushes
    to the socket and its acks to the session, attaching again (with
    backoff) when the stream breaks."""

    def __init__(self, sessions: EntityClient[Session], name: str) -> None:
        self.name = name
        self._session = sessions(name)
        self._backoff = Backoff(0.05, 2.0, jitter=0.5)
        self.alongside: Callable[[], Awaitable[None]] | None = None
        """Run while attached (the socket's entry in its user's directory:
        `trio_cluster.gateway._users.DirectoryJoin`)."""

    async def run(
        self,
        user: str | None,
        deliver: Callable[[Pushed], None],
        detached: Callable[[str], None],
    ) -> None:
        """Attach until cancelled; ``deliver(pushed)`` for each push;
        ``detached(reason)``, then return, when the session belongs to
        another user, or its stream ended (another socket attached, or this
        one fell ``max_unacked`` pushes behind). ``alongside`` runs
        meanwhile."""
        async with trio.open_nursery() as nursery:
            if self.alongside is not None:
                nursery.start_soon(self.alongside)
            await self._attach(user, deliver, detached)
            nursery.cancel_scope.cancel()

    async def _attach(
        self,
        user: str | None,
        deliver: Callable[[Pushed], None],
        detached: Callable[[str], None],
    ) -> None:
        failures = 0
        while True:
            try:
                async with self._session.attach(Attach(user)) as items:
                    async for pushed in items:
                        failures = 0
                        deliver(pushed)
                detached(
                    "the session attached to another socket, or this one fell behind"
                )
                return
            except SessionTakenError:
                detached("the session belongs to another user")
                return
            except Exception as exc:
                log.debug("attaching session %s: %r", self.name, exc)
            failures += 1
            unit = random.Random(f"{self.name}/{failures}")  # replays in the simulator
            await trio.sleep(self._backoff.delay(failures - 1, unit.random()))

    async def ack(self, epoch: str, seqs: list[int]) -> None:
        try:
            await self._session.ack(Ack(epoch, seqs))
        except Exception as exc:  # redelivered, acked again
            log.debug("acking %s in session %s: %r", seqs, self.name, exc)
