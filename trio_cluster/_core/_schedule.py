"""Webhook retry schedules and ``Retry-After`` (sans-IO).

Theory of operation: a `RetrySchedule` lists the delay before each attempt
of a delivery, the first included (Svix's by default: at once, then 5 s,
5 min, 30 min, 2 h, 5 h, 10 h, 10 h: eight attempts over about 27 hours).
`RetrySchedule.next_delay` says how long after a failed attempt the next one
is due, or None when the schedule is exhausted. Jitter shortens a delay by up
to ``jitter`` of it, from a ``random_unit`` the caller draws (the driver
derives it from the delivery's id, so a retry is reproducible); a
``Retry-After`` the receiver sent pushes the next attempt later, never
earlier than the schedule, and at most to ``max_retry_after``.

This is a schedule of listed delays, not the engine's `RetryPolicy`: a
webhook retry is decided by the HTTP answer (status, ``Retry-After``), which
an exception-driven policy cannot see, so the webhooks part schedules its
retries itself (see `trio_cluster.webhooks`). It reads no clock: times are
arguments.
"""

from __future__ import annotations

import math
from datetime import UTC
from email.utils import parsedate_to_datetime

import attrs

from .._errors import ConfigError
from ._checks import non_negative_seconds

__all__ = ["SVIX_DELAYS", "RetrySchedule", "parse_retry_after"]

SVIX_DELAYS = (0.0, 5.0, 300.0, 1800.0, 7200.0, 18000.0, 36000.0, 36000.0)
"""Svix's schedule: at once, 5 s, 5 min, 30 min, 2 h, 5 h, 10 h, 10 h."""

MAX_ATTEMPTS = 100


def _delays(value: object) -> tuple[float, ...]:
    if not isinstance(value, tuple | list):
        raise ConfigError(f"delays must be a tuple of seconds, got {value!r}")
    if not 1 <= len(value) <= MAX_ATTEMPTS:
        raise ConfigError(
            f"delays must list 1 to {MAX_ATTEMPTS} attempts, got {len(value)}"
        )
    for delay in value:
        if (
            isinstance(delay, bool)
            or not isinstance(delay, int | float)
            or not math.isfinite(delay)
            or delay < 0
        ):
            raise ConfigError(
                f"every delay must be a finite number >= 0 seconds, got {delay!r}"
            )
    return tuple(float(delay) for delay in value)


def _fraction(_: object, attribute: attrs.Attribute[float], value: object) -> None:
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not 0 <= value <= 1
    ):
        raise ConfigError(f"{attribute.name} must be in [0, 1], got {value!r}")


def _seconds(_: object, attribute: attrs.Attribute[float], value: object) -> None:
    non_negative_seconds(attribute.name, value)


@attrs.frozen
class RetrySchedule:
    """The attempts of a webhook delivery: ``delays[i]`` seconds after
    attempt ``i`` failed comes attempt ``i + 1`` (``delays[0]``, the delay of
    the first attempt after sending, is 0 in the default schedule).

    Raises:
        ConfigError: on construction, for an empty or too long ``delays``
            (1 to 100 attempts), a delay that is not a finite number >= 0,
            ``jitter`` outside [0, 1] or a negative ``max_retry_after``.
    """

    delays: tuple[float, ...] = attrs.field(default=SVIX_DELAYS, converter=_delays)
    """Delay before each attempt, the first included."""
    jitter: float = attrs.field(default=0.1, validator=_fraction)
    """Fraction of each retry's delay that may be randomly removed."""
    max_retry_after: float = attrs.field(default=86400.0, validator=_seconds)
    """The longest wait a ``Retry-After`` may impose (one day by default)."""

    @property
    def attempts(self) -> int:
        """Attempts in all."""
        return len(self.delays)

    def next_delay(
        self,
        attempt: int,
        *,
        retry_after: float | None = None,
        random_unit: float = 0.0,
    ) -> float | None:
        """The delay before the attempt after failed attempt ``attempt``
        (1 for the first), or None if it was the last one.

        The listed delay, shortened by up to ``jitter`` of it by
        ``random_unit`` (in [0, 1)), and then at least ``retry_after``
        (capped at ``max_retry_after``).

        Raises:
            ValueError: ``attempt`` below 1, or ``random_unit`` not in [0, 1).
        """
        if attempt < 1:
            raise ValueError(f"attempt must be >= 1, got {attempt}")
        if not 0 <= random_unit < 1:
            raise ValueError(f"random_unit must be in [0, 1), got {random_unit!r}")
        if attempt >= len(self.delays):
            return None
        delay = self.delays[attempt] * (1 - self.jitter * random_unit)
        if retry_after is not None:
            delay = max(delay, min(retry_after, self.max_retry_after))
        return delay


def parse_retry_after(value: str | None, now: float) -> float | None:
    """The seconds a ``Retry-After`` header value asks to wait (delay seconds
    or an HTTP date, RFC 9110 §10.2.3), measured from wall time ``now``; None
    for a missing or malformed value. A date in the past is 0."""
    if value is None:
        return None
    text = value.strip()
    if text.isdigit():
        return float(int(text))
    try:
        when = parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, when.timestamp() - now)
