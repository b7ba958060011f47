"""Pushes addressed to users: to every session of a user, on any gateway
(Trio driver).

Theory of operation.

* **The directory.** A user's sessions are found through the presence of
  the user's *directory*, an internal topic (`user_topic`). On a gateway
  with sessions and a ``user`` hook, each socket of a user joins its
  directory's presence with its session token as its data (`DirectoryJoin`,
  run by the socket's session link) and leaves it when it closes. The
  topic's presence does the rest: the entries of a gateway whose runner
  dies go with its follow stream, and they come back by themselves when
  the directory's entity starts again elsewhere (see
  `trio_cluster.gateway._presence`).
* **Sending.** `send_to_users` reads the directories of the users, then
  pushes to each session found as `send_reliable` does (numbered, acked,
  redelivered, bounded: see `trio_cluster.gateway._sessions`), all at
  once, and reports which sessions acked and which failed. The push names
  its user: a session bound to another user refuses it (a directory entry
  is no way into somebody else's pushes).
* **Reserved.** Directories are topics whose names start with
  `USER_TOPIC_PREFIX`: clients can neither subscribe to them nor list
  their presence (their entries are session tokens), whatever the
  gateway's ``topics`` allows.

What is reached: the sessions with a socket attached when the directory is
read. A client between two sockets at that moment (it reconnects) is not
in it; the answer says who was.
"""

from __future__ import annotations

import logging
import random
from typing import TYPE_CHECKING, Any, Final

import attrs
import trio

from .._core._retry import Backoff
from .._errors import ClusterError, UnknownEntityTypeError
from ._sessions import Push, PushFailedError, Session, SessionTakenError
from ._topics import presence

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable

    from .._runner import Runner
    from ._connection import ClientConnection
    from ._hub import TopicHub

__all__ = [
    "USER_TOPIC_PREFIX",
    "DirectoryJoin",
    "UserPushes",
    "client_topics",
    "send_to_users",
    "user_topic",
]

log = logging.getLogger("trio_cluster.gateway")

USER_TOPIC_PREFIX: Final = "trio_cluster.user:"
"""Topic names of the user directories (reserved)."""


def user_topic(user: str) -> str:
    """The name of ``user``'s directory topic."""
    return USER_TOPIC_PREFIX + user


def client_topics(allowed: Callable[[str], bool] | None) -> Callable[[str], bool]:
    """The topic names clients may use: those ``allowed`` (a gateway's
    ``topics``; None: none) but the user directories."""

    def allows(name: str) -> bool:
        return (
            allowed is not None
            and not name.startswith(USER_TOPIC_PREFIX)
            and allowed(name)
        )

    return allows


@attrs.frozen
class UserPushes:
    """What `send_to_users` did."""

    sessions: dict[str, list[str]]
    """The sessions found for each user (sorted)."""
    acked: dict[str, int]
    """``{session: sequence number}`` of the sessions that acked the push."""
    failed: dict[str, Exception]
    """``{session: error}`` of those that did not: `PushFailedError` (not
    acked after the redeliveries), `SessionTakenError` (the session is
    another user's now), or a cluster error (its session's entity was lost:
    the client may or may not have it)."""


async def send_to_users(runner: Runner, users: Iterable[str], data: Any) -> UserPushes:
    """Push ``data`` (plain data) reliably to every session of each of
    ``users`` that has a socket attached, on any gateway of the cluster;
    return once each push is acked or failed.

    Raises:
        ValueError: a user whose directory name is not a valid entity id
            (empty, or over 255 characters with the prefix).
        RunnerUnavailableError, EntityNotAssignedError...: a directory
            could not be read (as any call to an entity); nothing was
            sent then.

    Cancellation: stops waiting; pushes sent stay in their sessions until
    acked or given up.
    """
    sessions: dict[str, list[str]] = {}
    for user in dict.fromkeys(users):
        entries = await presence(runner, user_topic(user))
        sessions[user] = sorted(
            {
                entry["session"]
                for entry in entries.values()
                if isinstance(entry, dict) and isinstance(entry.get("session"), str)
            }
        )
    acked: dict[str, int] = {}
    failed: dict[str, Exception] = {}

    async def push(session: str, user: str) -> None:
        try:
            handle = runner.client(Session)(session)
            acked[session] = await handle.push(Push(data, user))
        except (PushFailedError, SessionTakenError, ClusterError) as exc:
            failed[session] = exc

    async with trio.open_nursery() as nursery:
        for user, found in sessions.items():
            for session in found:
                nursery.start_soon(push, session, user)
    return UserPushes(sessions=sessions, acked=acked, failed=failed)


class DirectoryJoin:
    """A socket's entry in its user's directory: made by the gateway for a
    socket with a session and a user, run by its session link."""

    def __init__(
        self, hub: TopicHub, connection: ClientConnection, user: str, session: str
    ) -> None:
        self._hub = hub
        self._connection = connection
        self._topic = user_topic(user)
        self._session = session
        self._backoff = Backoff(0.05, 2.0, jitter=0.5)

    async def run(self) -> None:
        """Join the directory, retrying (with backoff) while its topic
        cannot be reached; return once joined (the socket leaves it when it
        closes: the hub forgets its subscriptions)."""
        failures = 0
        while True:
            try:
                await self._hub.subscribe(
                    self._connection, self._topic, None, {"session": self._session}
                )
                return
            except UnknownEntityTypeError:
                log.warning(
                    "users' sessions cannot be found (send_to_users): the runners"
                    " do not host trio_cluster.gateway.Topic"
                )
                return
            except ClusterError as exc:
                log.debug("joining the directory %s: %r", self._topic, exc)
            failures += 1
            unit = random.Random(
                f"{self._session}/{failures}"
            )  # replays in the simulator
            await trio.sleep(self._backoff.delay(failures - 1, unit.random()))
