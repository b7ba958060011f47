"""A token bucket: at most ``rate`` events per second, bursts of ``burst`` (sans-IO).

Theory of operation: the bucket holds up to ``burst`` tokens and gains
``rate`` tokens per second; an event takes one. `TokenBucket.take` is given
the time (any monotonic clock, in seconds) and returns how long the caller
must wait before its event may happen (0: at once), taking the token
already, so callers that wait in turn are spaced by ``1 / rate``. It does no
I/O and reads no clock.
"""

from __future__ import annotations

import math

import attrs

from .._errors import ConfigError

__all__ = ["RateLimit", "TokenBucket"]


def _positive(_: object, attribute: attrs.Attribute[float], value: object) -> None:
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or value <= 0
    ):
        raise ConfigError(f"{attribute.name} must be a positive number, got {value!r}")


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
