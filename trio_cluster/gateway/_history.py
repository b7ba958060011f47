"""Coalesced history reads: the sockets of one gateway that resume the same
topic at once share one `Topic.history` call (Trio driver).

Theory of operation. A socket that subscribes with a position needs the
topic's history after it, read *after* the socket was registered with the
hub (its live publications are held from then on: the history read later
covers everything before them). When thousands of clients lose their runner
and resume on this one, they all ask the same topic at once; one call each
would queue them all in the topic's entity, one at a time, and cross the
network once per socket.

`HistoryReads` groups them: a request joins the *open batch* of its topic
and epoch (registering the socket happened before, so any read that starts
after it joined is late enough), and one task per batch makes the read for
the batch's oldest position once the previous read of that topic and epoch
is over. While a read is in flight, the next batch fills: under a storm, a
read serves every socket that arrived during the previous one.
`narrow_history` then gives each socket the answer the topic would have
given its own position (the same items and ``recovered``, from the page
read for an older position of the same epoch, or any position of another
epoch).

Cancellation: a socket that goes away while its batch is read stops
waiting; the read goes on for the others (it runs in the hub's nursery).
A failed read raises its error in every socket of the batch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import trio

from ._topics import History, Position

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from ._topics import Publication

__all__ = ["HistoryReads", "narrow_history"]

_Key = tuple[str, str | None]
"""A topic and the epoch of the positions asked (None: no position)."""


class _Batch:
    """The requests that one read answers."""

    __slots__ = ("done", "error", "oldest", "page")

    def __init__(self) -> None:
        self.oldest: Position | None = None
        """The oldest position asked (None: none was)."""
        self.done = trio.Event()
        self.page: History | None = None
        self.error: Exception | None = None


class HistoryReads:
    """Concurrent history reads of one gateway's topics, coalesced (see the
    module docstring).

    Args:
        read: reads the history of a topic after a position (the
            `Topic.history` call).
        nursery: where the reads run (the hub's).
    """

    def __init__(
        self,
        read: Callable[[str, Position | None], Awaitable[History]],
        nursery: trio.Nursery,
    ) -> None:
        self._read = read
        self._nursery = nursery
        self._open: dict[_Key, _Batch] = {}
        """The batch of each key that has not started its read yet."""
        self._running: dict[_Key, trio.Event] = {}
        """Set when the read in flight for a key is over."""
        self.reads = 0
        """Reads made (for tests and metrics)."""

    async def history(self, topic: str, since: Position | None) -> History:
        """The history of ``topic`` after ``since``, as `Topic.history` would
        answer it, from a read that starts after this call.

        Raises:
            Exception: what the read raised (the topic's runner is
                unavailable, say).

        Cancellation: this caller stops waiting; the read goes on.
        """
        key = (topic, None if since is None else since.epoch)
        batch = self._open.get(key)
        if batch is None:
            batch = self._open[key] = _Batch()
            batch.oldest = since
            self._nursery.start_soon(self._run, key, batch)
        elif (
            since is not None
            and batch.oldest is not None
            and since.offset < batch.oldest.offset
        ):
            batch.oldest = since
        await batch.done.wait()
        if batch.error is not None:
            raise batch.error
        assert batch.page is not None
        return narrow_history(batch.page, batch.oldest, since)

    async def _run(self, key: _Key, batch: _Batch) -> None:
        """Wait for the previous read of ``key``, then read for ``batch``."""
        previous = self._running.get(key)
        if previous is not None:
            await previous.wait()
        else:
            # Let the requests that came in the same scheduler pass join.
            await trio.lowlevel.checkpoint()
        if self._open.get(key) is batch:
            del self._open[key]
        over = self._running[key] = trio.Event()
        try:
            self.reads += 1
            batch.page = await self._read(key[0], batch.oldest)
        except Exception as exc:
            batch.error = exc
        finally:
            batch.done.set()
            over.set()
            if self._running.get(key) is over:
                del self._running[key]


def narrow_history(
    page: History, asked: Position | None, since: Position | None
) -> History:
    """The answer `Topic.history` gives for ``since``, from ``page``, its
    answer for ``asked``: no position, or one of the same epoch as
    ``since`` and no newer."""
    if since is None:
        return History(page.epoch, page.offset, True, [])
    if asked == since:
        return page
    items: list[Publication] = page.items
    if since.epoch != page.epoch:
        # Every kept publication either way; recovered only from nothing.
        return History(page.epoch, page.offset, since.offset == 0 and not items, items)
    if page.recovered:
        # The history held everything after ``asked``: after ``since`` too.
        kept = [item for item in items if item.offset > since.offset]
        return History(page.epoch, page.offset, True, kept)
    # Not recovered for ``asked``: ``items`` is the whole history, whose
    # oldest offset decides for ``since`` as the topic would.
    oldest = items[0].offset if items else page.offset + 1
    kept = [item for item in items if item.offset > since.offset]
    return History(page.epoch, page.offset, since.offset >= oldest - 1, kept)
