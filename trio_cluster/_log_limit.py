"""Warnings a peer can trigger, bounded: rate-limited and aggregated.

A peer chooses what it sends, so it chooses how often a runner logs about
it: one frame of ten thousand malformed envelopes must not write ten
thousand warnings, nor copy a hostile payload into the logs in full (issue
12, item 8). `LogLimiter` logs the first ``burst`` occurrences of each
(peer, kind) in full, then at most one summary line per ``interval``::

    ... and 9995 more malformed envelopes from 127.0.0.1:7001 in the last 10 s

Every argument of a logged message (its ``%s`` or ``%r``) is cut to
``max_length`` characters, with control characters escaped (a payload cannot
forge log lines). It keeps no task and no thread: a summary is written by the next occurrence after the
interval, or by `LogLimiter.flush` (when the peer's connection ends, say).
The clock is an argument, so tests drive it with ``MockClock``.

It is shared by the transports, the engine and the gateway, and imports
nothing of the package.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Hashable
from typing import Final

import attrs
import trio

__all__ = ["LogLimiter", "shorten"]

MAX_LENGTH: Final = 200
"""Characters of one logged value, by default."""


def shorten(value: object, limit: int = MAX_LENGTH) -> str:
    """``str(value)`` on one line (control characters escaped), cut to
    ``limit`` characters with a note of how many were left out."""
    text = str(value)
    if len(text) > limit:
        text = f"{text[:limit]}... ({len(text) - limit} more characters)"
    if not text.isprintable():
        text = text.encode("unicode_escape").decode("ascii")
    return text


class _Short:
    """A logged argument: ``%s`` and ``%r`` render it `shorten`-ed."""

    __slots__ = ("_limit", "_value")

    def __init__(self, value: object, limit: int) -> None:
        self._value = value
        self._limit = limit

    def __str__(self) -> str:
        return shorten(self._value, self._limit)

    def __repr__(self) -> str:
        return shorten(repr(self._value), self._limit)


def _shortened(value: object, limit: int) -> object:
    """``value`` as logged: numbers as they are (``%d`` needs them), the
    rest wrapped in `_Short`."""
    if value is None or type(value) in (int, float, bool):
        return value
    return _Short(value, limit)


@attrs.define(eq=False)
class _Count:
    since: float
    """Start of the current summary window."""
    last: float
    """The latest occurrence."""
    logged: int = 0
    """Occurrences logged in full since the key was (re)started."""
    suppressed: int = 0
    """Occurrences not logged since ``since``."""


@attrs.define(eq=False, kw_only=True)
class LogLimiter:
    """Logs what peers cause, a few times in full per (peer, kind), then as
    one summary line per interval.

    Args:
        logger: where lines go.
        burst: occurrences of a (peer, kind) logged in full before the rest
            is summarized; again after the key was quiet for an interval.
        interval: seconds between two summary lines of one key.
        max_length: characters kept of each argument of a logged message.
        max_keys: keys remembered at most; the oldest is summarized and
            forgotten to make room (a flood of distinct peers stays bounded).
        clock: seconds, monotonic; ``trio.current_time`` by default (then
            the limiter is used inside ``trio.run`` only).

    Counting stays the caller's: this decides only what is written.
    """

    logger: logging.Logger
    burst: int = 10
    interval: float = 10.0
    max_length: int = MAX_LENGTH
    max_keys: int = 1024
    clock: Callable[[], float] = trio.current_time
    _counts: dict[tuple[Hashable, str], _Count] = attrs.field(init=False, factory=dict)

    def warning(self, peer: Hashable, kind: str, message: str, *args: object) -> bool:
        """Log ``message % args`` at WARNING (arguments shortened), unless
        this (peer, kind) is over its burst; ``kind`` names the occurrences
        in the plural for the summary ("malformed envelopes"). Returns
        whether the line was written."""
        return self.log(logging.WARNING, peer, kind, message, *args)

    def log(
        self, level: int, peer: Hashable, kind: str, message: str, *args: object
    ) -> bool:
        """`warning` at ``level``. Returns whether the line was written."""
        now = self.clock()
        key = (peer, kind)
        count = self._counts.get(key)
        if count is not None:
            if count.suppressed and now - count.since >= self.interval:
                self._summarize(key, count, now)
            elif not count.suppressed and now - count.last >= self.interval:
                del self._counts[key]  # quiet for an interval: start afresh
                count = None
        if count is None:
            if len(self._counts) >= self.max_keys:
                oldest = next(iter(self._counts))
                self._summarize(oldest, self._counts.pop(oldest), now)
            count = self._counts[key] = _Count(since=now, last=now)
        count.last = now
        if count.logged >= self.burst:
            count.suppressed += 1
            return False
        count.logged += 1
        if self.logger.isEnabledFor(level):
            self.logger.log(
                level, message, *(_shortened(arg, self.max_length) for arg in args)
            )
        return True

    def flush(self, peer: Hashable | None = None) -> None:
        """Write the summary of every key of ``peer`` (of every peer if
        None) with occurrences not logged yet, and forget those keys."""
        now = self.clock()
        for key in [key for key in self._counts if peer is None or key[0] == peer]:
            self._summarize(key, self._counts.pop(key), now)

    def _summarize(self, key: tuple[Hashable, str], count: _Count, now: float) -> None:
        if count.suppressed:
            peer, kind = key
            self.logger.warning(
                "... and %d more %s from %s in the last %.0f s",
                count.suppressed,
                kind,
                shorten(peer, self.max_length),
                max(now - count.since, 0.0),
            )
        count.suppressed = 0
        count.since = now
