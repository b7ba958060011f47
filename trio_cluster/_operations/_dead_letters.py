"""`DeadLetterQueue`: list, show, replay and purge dead letters (operations).

A persisted request is dead-lettered when its attempts ran out (see
`RetryPolicy`): its caller got `DeadLetteredError`, and storage keeps a copy
of it, a `DeadLetter`, with the error that ended its last attempt. This is
the Python face of ``trio-cluster dlq``: ``runner.dead_letters`` reads the
copies, saves one again as a new request once the cause is fixed
(`replay`), or deletes them (`purge`).

A replayed request is a new request (a new id, made by the runner's own id
generator, so unique cluster-wide), delivered to the same entity and
handler with the same message and call metadata; it has no primary key (the
dead-lettered original still holds it, answered), so replaying twice would
run it twice: a dead letter is replayed at most once (`DeadLetter.replayed_as`).
Its reply is stored as any other; nobody waits for it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final

from .._core._checks import ARGUMENT, count, integer

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable, Sequence

    from .._clock import Clock
    from .._storage_abc import MessageStorage
    from .._storage_retries import DeadLetter

__all__ = ["DeadLetterQueue"]

PAGE: Final = 500
"""Dead letters read per storage call by `all` (and ``dlq purge --all``)."""


class DeadLetterQueue:
    """The cluster's dead letters, through one runner's storage session.

    Args:
        messages: the runner's message storage.
        new_id: makes the id of a replayed request (the runner's generator).
        clock: the wall clock of the replay's save time.

    Every method checkpoints, and raises `PersistenceError` if storage
    failed (nothing is changed then) or `TypeError`/`ValueError` for a bad
    argument. Cancelled during a `replay`, the new request may or may not be
    saved (the dead letter says which: ``replayed_as``).
    """

    def __init__(
        self, messages: MessageStorage, *, new_id: Callable[[], int], clock: Clock
    ) -> None:
        self._messages = messages
        self._new_id = new_id
        self._clock = clock

    async def list(
        self, *, after_id: int | None = None, limit: int = 100
    ) -> list[DeadLetter]:
        """Up to ``limit`` dead letters with ids above ``after_id`` (all if
        None), oldest id first: page with the last id returned."""
        return await self._messages.dead_letters(after_id=after_id, limit=limit)

    async def all(self) -> AsyncIterator[DeadLetter]:
        """Every dead letter, oldest id first, read a page at a time."""
        after: int | None = None
        while True:
            page = await self.list(after_id=after, limit=PAGE)
            for letter in page:
                yield letter
            if len(page) < PAGE:
                return
            after = page[-1].request_id

    async def get(self, request_id: int) -> DeadLetter | None:
        """The dead letter of request ``request_id``, or None."""
        request_id = integer("request_id", request_id, errors=ARGUMENT)
        after = None if request_id <= -(2**63) else request_id - 1
        page = await self.list(after_id=after, limit=1)
        if page and page[0].request_id == request_id:
            return page[0]
        return None

    async def replay(self, request_id: int) -> int | None:
        """Save dead letter ``request_id`` again as a new request; returns its
        id, or None if there is no such dead letter or it was replayed
        already."""
        request_id = integer("request_id", request_id, errors=ARGUMENT)
        new_id = self._new_id()
        replayed = await self._messages.replay_dead_letter(
            request_id, new_request_id=new_id, now=self._clock.now()
        )
        return new_id if replayed else None

    async def purge(self, request_ids: Sequence[int]) -> int:
        """Delete these dead letters; returns how many there were."""
        return await self._messages.purge_dead_letters(list(request_ids))

    async def purge_all(self, *, limit: int | None = None) -> int:
        """Delete every dead letter (at most ``limit``), a page at a time;
        returns how many were deleted."""
        left = None if limit is None else count("limit", limit, errors=ARGUMENT)
        purged = 0
        after: int | None = None
        while left is None or left > 0:
            size = PAGE if left is None else min(PAGE, left)
            page = await self.list(after_id=after, limit=size)
            if not page:
                break
            purged += await self.purge([letter.request_id for letter in page])
            after = page[-1].request_id
            if left is not None:
                left -= len(page)
        return purged
