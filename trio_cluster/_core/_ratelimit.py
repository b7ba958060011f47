"""Rate limits: a token bucket, and fixed windows with a block per key (sans-IO).

Theory of operation. Both are given the time (any monotonic clock, in
seconds) and do no I/O.

* `TokenBucket`: the bucket holds up to ``burst`` tokens and gains ``rate``
  tokens per second; an event takes one. `TokenBucket.take` returns how long
  the caller must wait before its event may happen (0: at once), taking the
  token already, so callers that wait in turn are spaced by ``1 / rate``.
  `TokenBucket.try_take` is the refusing form: it takes a token only if one
  is there.
* `KeyedWindows`: at most ``limit`` events per key (an IP address) in each
  fixed window of ``per`` seconds that starts at the key's first event; the
  event over the limit is refused and, if ``block_for`` is set, the key is
  refused for that long from then on (the connect limit of a public
  server: 10 per minute per address, then a 5-minute block). The table
  holds at most ``max_keys`` keys: past that, the key whose window started
  first is forgotten (a key still blocked is forgotten only when every key
  is), so a flood of addresses costs bounded memory.
"""

from __future__ import annotations

import math
from collections import OrderedDict

import attrs

from .._errors import ConfigError
from ._checks import non_negative_seconds, positive_count, positive_number

__all__ = ["KeyedWindows", "RateLimit", "TokenBucket", "WindowLimit"]


def _positive(_: object, attribute: attrs.Attribute[float], value: object) -> None:
    positive_number(attribute.name, value)


@attrs.frozen
class RateLimit:
    """At most ``per_second`` events per second, with bursts of ``burst``.

    Raises:
        ConfigError: on construction, for a value that is not a positive,
            finite number (``burst`` at least 1).
    """

    per_second: float = attrs.field(validator=_positive)
    burst: float = attrs.field(default=1.0, validator=_positive)

    def __attrs_post_init__(self) -> None:
        if self.burst < 1:
            raise ConfigError(f"burst must be at least 1, got {self.burst!r}")


class TokenBucket:
    """The state of one `RateLimit` (see the module docstring)."""

    def __init__(self, limit: RateLimit, now: float) -> None:
        self._rate = float(limit.per_second)
        self._burst = float(limit.burst)
        self._tokens = self._burst
        self._at = now

    def take(self, now: float) -> float:
        """Take a token for an event at ``now``; the seconds to wait first."""
        if now > self._at:
            self._tokens = min(
                self._burst, self._tokens + (now - self._at) * self._rate
            )
            self._at = now
        self._tokens -= 1
        if self._tokens >= 0:
            return 0.0
        return -self._tokens / self._rate

    @property
    def ahead(self) -> float:
        """How many events ahead of the rate the bucket was at its last
        take (0: none; at most ``burst``)."""
        return self._burst - self._tokens

    def try_take(self, now: float) -> float:
        """Take a token for an event at ``now`` if there is one: 0.0; else
        take nothing and return the seconds until one will be there."""
        if now > self._at:
            self._tokens = min(
                self._burst, self._tokens + (now - self._at) * self._rate
            )
            self._at = now
        if self._tokens >= 1:
            self._tokens -= 1
            return 0.0
        return (1 - self._tokens) / self._rate


def _non_negative(_: object, attribute: attrs.Attribute[float], value: object) -> None:
    non_negative_seconds(attribute.name, value)


def _count(_: object, attribute: attrs.Attribute[int], value: object) -> None:
    positive_count(attribute.name, value)


@attrs.frozen
class WindowLimit:
    """At most ``limit`` events per ``per`` seconds; the event over the limit
    blocks the key for ``block_for`` seconds (0: no block, only the rest of
    the window).

    Raises:
        ConfigError: on construction, for a ``limit`` that is not an int >= 1,
            a ``per`` that is not a positive finite number, or a
            ``block_for`` below 0.
    """

    limit: int = attrs.field(validator=_count)
    per: float = attrs.field(validator=_positive)
    block_for: float = attrs.field(default=0.0, validator=_non_negative)


@attrs.define
class _Window:
    start: float
    count: int
    blocked_until: float


class KeyedWindows:
    """The fixed windows of one `WindowLimit`, per key (see the module
    docstring).

    Raises:
        ConfigError: ``max_keys`` is not an int >= 1.
    """

    def __init__(self, limit: WindowLimit, *, max_keys: int = 100_000) -> None:
        positive_count("max_keys", max_keys)
        self._limit = limit
        self._max_keys = max_keys
        self._windows: OrderedDict[str, _Window] = OrderedDict()
        """By key, oldest window first."""

    def __len__(self) -> int:
        return len(self._windows)

    def blocked_for(self, key: str, now: float) -> float:
        """The seconds ``key`` stays blocked after ``now`` (0.0: it is not
        blocked); nothing is counted."""
        window = self._windows.get(key)
        if window is None or now >= window.blocked_until:
            return 0.0
        return window.blocked_until - now

    def check(self, key: str, now: float) -> float:
        """Count an event of ``key`` at ``now``: 0.0 if it is allowed, else
        the seconds until the key may try again (the event is refused and
        not counted; a refusal over the limit starts the block)."""
        limit = self._limit
        window = self._windows.get(key)
        if window is not None and now < window.blocked_until:
            return window.blocked_until - now
        if (
            window is None
            or now >= window.start + limit.per
            or window.blocked_until > -math.inf  # a block is over: start afresh
        ):
            if window is not None:
                del self._windows[key]
            self._make_room(now)
            self._windows[key] = _Window(now, 1, -math.inf)
            return 0.0
        if window.count < limit.limit:
            window.count += 1
            return 0.0
        if limit.block_for > 0:
            window.blocked_until = now + limit.block_for
            return limit.block_for
        return window.start + limit.per - now

    def _make_room(self, now: float) -> None:
        windows = self._windows
        if len(windows) < self._max_keys:
            return
        for key, window in windows.items():
            if window.blocked_until <= now:
                del windows[key]
                return
        windows.popitem(last=False)  # every key is blocked: the oldest goes
