"""A circuit breaker: stop calling what keeps failing, probe it later (sans-IO).

Theory of operation: the breaker is *closed* (calls pass) until
``threshold`` calls in a row have failed; then it *opens* for
``cool_down`` seconds, during which `CircuitBreaker.admit` answers how long
to wait instead of letting a call through. When the cool-down is over it is
*half-open*: one call (the probe) is admitted, and the others wait
``probe_wait`` seconds at a time until the probe's outcome is known. A
successful probe closes it; a failed one opens it again for the next
cool-down, twice as long, up to ``max_cool_down``. Any success closes it and
resets the count.

The breaker reads no clock: ``now`` (any monotonic clock, in seconds) is an
argument of every call.
"""

from __future__ import annotations

import enum

import attrs

from .._errors import ConfigError
from ._checks import positive_count, positive_seconds

__all__ = ["BreakerPolicy", "BreakerState", "CircuitBreaker"]


class BreakerState(enum.Enum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


def _positive(_: object, attribute: attrs.Attribute[float], value: object) -> None:
    positive_seconds(attribute.name, value)


def _count(_: object, attribute: attrs.Attribute[int], value: object) -> None:
    positive_count(attribute.name, value)


@attrs.frozen
class BreakerPolicy:
    """When a `CircuitBreaker` opens and for how long.

    Raises:
        ConfigError: on construction, for a ``threshold`` that is not an int
            >= 1, a duration that is not a positive number, or
            ``max_cool_down < cool_down``.
    """

    threshold: int = attrs.field(default=5, validator=_count)
    """Consecutive failures that open the breaker."""
    cool_down: float = attrs.field(default=30.0, validator=_positive)
    """Seconds it stays open the first time."""
    max_cool_down: float = attrs.field(default=600.0, validator=_positive)
    """Longest cool-down (each failed probe doubles it up to this)."""
    probe_wait: float = attrs.field(default=15.0, validator=_positive)
    """How long calls wait while the probe is out (by default the default
    timeout of a webhook attempt, the longest a probe takes)."""

    def __attrs_post_init__(self) -> None:
        if self.max_cool_down < self.cool_down:
            raise ConfigError(
                f"max_cool_down ({self.max_cool_down} s) is below cool_down"
                f" ({self.cool_down} s)"
            )


class CircuitBreaker:
    """The state of one `BreakerPolicy` (see the module docstring)."""

    def __init__(self, policy: BreakerPolicy) -> None:
        self._policy = policy
        self._failures = 0
        self._opened_until: float | None = None
        self._cool_down = policy.cool_down
        self._probing = False

    @property
    def failures(self) -> int:
        """Consecutive failures so far."""
        return self._failures

    def state(self, now: float) -> BreakerState:
        """Closed, open (cooling down) or half-open (probing) at ``now``."""
        if self._opened_until is None:
            return BreakerState.CLOSED
        if now < self._opened_until:
            return BreakerState.OPEN
        return BreakerState.HALF_OPEN

    def admit(self, now: float) -> float:
        """0 if a call may start at ``now`` (a half-open breaker admits it
        as the probe), else the seconds to wait before asking again."""
        state = self.state(now)
        if state is BreakerState.CLOSED:
            return 0.0
        assert self._opened_until is not None
        if state is BreakerState.OPEN:
            return self._opened_until - now
        if self._probing:
            return self._policy.probe_wait
        self._probing = True
        return 0.0

    def succeeded(self) -> None:
        """A call admitted by `admit` succeeded: close."""
        self._failures = 0
        self._opened_until = None
        self._cool_down = self._policy.cool_down
        self._probing = False

    def abandoned(self) -> None:
        """A call admitted by `admit` ended without an outcome (cancelled):
        if it was the probe, the next call may probe instead."""
        self._probing = False

    def failed(self, now: float) -> None:
        """A call admitted by `admit` failed at ``now``."""
        self._failures += 1
        if self._probing:
            self._probing = False
            self._cool_down = min(self._cool_down * 2, self._policy.max_cool_down)
            self._opened_until = now + self._cool_down
        elif self._opened_until is None and self._failures >= self._policy.threshold:
            self._opened_until = now + self._cool_down
