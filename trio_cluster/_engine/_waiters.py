"""Who waits for the final reply of a persisted request (Trio driver).

Callers in this process wait on a `Waiter` each (several may wait for one
request: the original sender and duplicates attached by primary key). Other
runners that sent a request served here asked for its final reply directly
(``reply_to``), so it reaches them without a storage round trip. `resolve`
wakes both kinds; storage notifications and polling are the fallback for
whatever this misses (see `_notices`).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Final

import trio

from .._errors import RunnerUnavailableError
from .._errors._closed import RunnerClosedError
from ..serialization._replies import Exit
from ._wire import Kind

if TYPE_CHECKING:
    from collections.abc import Iterator

    from .._core._addresses import RunnerAddress
    from .._transport_abc import Endpoint

__all__ = ["ReplyWaiters", "Waiter", "send_directly"]

log = logging.getLogger("trio_cluster.persisted")

_MAX_REPLY_TO: Final = 100_000
"""Most remote waiters remembered (the oldest are forgotten; they then get
their reply from storage)."""


class Waiter:
    """One caller in this process waiting for a final reply."""

    __slots__ = ("event", "exit", "payload")

    def __init__(self) -> None:
        self.event = trio.Event()
        self.payload: bytes | None = None
        """The encoded final reply, once known (None if the runner shut
        down first)."""
        self.exit: Exit | None = None
        """The reply as an `Exit`, when it is known without decoding."""


class ReplyWaiters:
    """The callers and peers waiting for final replies, by request id.

    Args:
        endpoint: this runner's transport endpoint, if it has one (to send
            final replies to the peers that asked for them).
    """

    def __init__(self, *, endpoint: Endpoint | None) -> None:
        self._endpoint = endpoint
        self._waiters: dict[int, list[Waiter]] = {}
        self._reply_to: dict[int, RunnerAddress] = {}
        """Requests another runner waits for: send it the final reply."""
        self._owners: dict[int, RunnerAddress] = {}
        """Requests callers here wait for, with the runner asked to send
        their final reply directly: the only one it is taken from."""

    def __contains__(self, request_id: int) -> bool:
        """Whether a caller in this process waits for ``request_id``."""
        return request_id in self._waiters

    def __len__(self) -> int:
        """Requests waited for (by local callers, or for remote ones)."""
        return len(self._waiters)

    def __iter__(self) -> Iterator[int]:
        """The requests callers in this process wait for."""
        return iter(self._waiters)

    @property
    def waiting(self) -> int:
        """Callers in this process waiting for a reply."""
        return sum(len(waiters) for waiters in self._waiters.values())

    def register(self, request_id: int) -> Waiter:
        """A caller starts waiting for ``request_id``."""
        waiter = Waiter()
        self._waiters.setdefault(request_id, []).append(waiter)
        return waiter

    def unregister(self, request_id: int, waiter: Waiter) -> None:
        """A caller stops waiting (it gave up, or it never needed to)."""
        waiters = self._waiters.get(request_id)
        if waiters is not None:
            if waiter in waiters:
                waiters.remove(waiter)
            if not waiters:
                del self._waiters[request_id]
                self._owners.pop(request_id, None)

    def expect_from(self, request_id: int, owner: RunnerAddress) -> None:
        """``owner`` was asked to send the final reply of ``request_id``
        directly (while a caller here waits for it)."""
        if request_id in self._waiters:
            self._owners[request_id] = owner

    def pushed(self, peer: RunnerAddress, request_id: int, payload: bytes) -> bool:
        """``peer`` sent the final reply of ``request_id`` directly: resolve
        it if ``peer`` is the runner asked for it, for a reply still awaited.
        Else (a forged or stray reply) it is ignored: False; the reply then
        comes from storage, which alone is authoritative."""
        if self._owners.get(request_id) != peer:
            return False
        self.resolve(request_id, payload, None)
        return True

    def reply_to(self, request_id: int, peer: RunnerAddress) -> None:
        """``peer`` waits for the final reply of ``request_id``."""
        if len(self._reply_to) >= _MAX_REPLY_TO:
            del self._reply_to[next(iter(self._reply_to))]  # forget the oldest
        self._reply_to[request_id] = peer

    def resolve(self, request_id: int, payload: bytes, exit_: Exit | None) -> None:
        """The final reply of ``request_id`` is known: wake its waiters."""
        self._owners.pop(request_id, None)
        for waiter in self._waiters.pop(request_id, ()):
            waiter.payload = payload
            waiter.exit = exit_
            waiter.event.set()
        peer = self._reply_to.pop(request_id, None)
        if peer is not None:
            send_directly(
                self._endpoint, peer, [Kind.PERSISTED_REPLY, request_id, payload]
            )

    def release_all(self) -> None:
        """The runner stops: wake the callers still waiting for a reply (they
        waited forever: found by the simulator's failover example). Their
        requests stay stored and are still answered."""
        for waiters in self._waiters.values():
            for waiter in waiters:
                waiter.exit = Exit(
                    error=RunnerClosedError(
                        "the runner shut down while the call waited for its"
                        " reply; the request is stored and will be answered"
                        " (send it again, with its primary key, for the reply)"
                    )
                )
                waiter.event.set()
        self._waiters.clear()
        self._owners.clear()


def send_directly(
    endpoint: Endpoint | None, peer: RunnerAddress, envelope: list[Any]
) -> bool:
    """Send ``envelope`` to ``peer`` now, if this runner has an endpoint and
    the peer is reachable; False if not (storage then carries the news)."""
    if endpoint is None:
        return False
    try:
        endpoint.send_nowait(peer, envelope)
    except RunnerUnavailableError as exc:
        log.debug("could not notify %s directly (storage will): %s", peer, exc)
        return False
    return True
