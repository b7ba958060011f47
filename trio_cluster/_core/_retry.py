"""Retry schedules: capped exponential backoff with optional jitter (sans-IO).

Theory of operation: a `Backoff` is a frozen policy; the delay before retry
number ``attempt`` (0 for the first retry) is::

    min(maximum, initial * factor ** attempt) * (1 - jitter * random_unit)

Randomness is an argument: the driver draws ``random_unit`` from its own
random source (uniform in [0, 1)), so tests and simulations stay
deterministic. With ``jitter = 0`` the schedule is fully deterministic; with
``jitter = j`` every delay falls in ``[(1 - j) * d, d]``, which spreads out
the retries of many runners that failed at the same moment. Huge attempt
numbers are fine: the delay saturates at ``maximum`` instead of overflowing.

Policies usually come from `ShardingConfig`, so invalid ones raise
`ConfigError`.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import attrs

from .._errors import ConfigError
from ._hashing import stable_hash64

if TYPE_CHECKING:
    from collections.abc import Iterable, Iterator

__all__ = [
    "DEFAULT_RETRY_BACKOFF",
    "MAX_ATTEMPTS_LIMIT",
    "Backoff",
    "RetryPolicy",
    "spread",
]

_MAX_EXPONENT = 1 << 64


def _number(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"backoff {name} must be a number, got {value!r}")
    if not math.isfinite(value):
        raise ConfigError(f"backoff {name} must be finite, got {value!r}")
    return float(value)


def _check_positive(_: object, attribute: attrs.Attribute[float], value: float) -> None:
    if not _number(attribute.name, value) > 0:
        raise ConfigError(
            f"backoff {attribute.name} must be > 0 seconds, got {value!r}"
        )


def _check_factor(_: object, attribute: attrs.Attribute[float], value: float) -> None:
    if not _number(attribute.name, value) >= 1:
        raise ConfigError(
            f"backoff factor must be >= 1 (1 retries at a constant rate), got {value!r}"
        )


def _check_jitter(_: object, attribute: attrs.Attribute[float], value: float) -> None:
    if not 0 <= _number(attribute.name, value) <= 1:
        raise ConfigError(
            f"backoff jitter must be in [0, 1] (a fraction of the delay), got {value!r}"
        )


@attrs.frozen
class Backoff:
    """Capped exponential backoff: ``Backoff(0.1, 10.0)`` waits 0.1, 0.2, 0.4
    ... up to 10 seconds.

    Raises:
        ConfigError: on construction, for a value that is not a finite number,
            ``initial`` or ``maximum`` not positive, ``maximum < initial``,
            ``factor < 1`` or ``jitter`` outside [0, 1].
    """

    initial: float = attrs.field(validator=_check_positive)
    """Delay before the first retry, in seconds."""

    maximum: float = attrs.field(validator=_check_positive)
    """Longest delay, in seconds; at least ``initial``."""

    factor: float = attrs.field(default=2.0, validator=_check_factor)
    """Growth of the delay from one attempt to the next (>= 1)."""

    jitter: float = attrs.field(default=0.0, validator=_check_jitter)
    """Fraction of each delay that may be randomly removed (0: none)."""

    def __attrs_post_init__(self) -> None:
        if self.maximum < self.initial:
            raise ConfigError(
                f"backoff maximum ({self.maximum} s) is below initial"
                f" ({self.initial} s); raise the maximum or lower the initial delay"
            )

    def delay(self, attempt: int, random_unit: float = 0.0) -> float:
        """The delay before retry number ``attempt``, in seconds.

        Args:
            attempt: 0 for the first retry, 1 for the second, and so on.
            random_unit: a uniform random number in [0, 1), drawn by the
                caller; only used when ``jitter`` is not 0.

        Returns:
            ``min(maximum, initial * factor ** attempt) * (1 - jitter * random_unit)``.

        Raises:
            TypeError: ``attempt`` is not an int.
            ValueError: ``attempt`` is negative, or ``random_unit`` is not in
                [0, 1).
        """
        if isinstance(attempt, bool) or not isinstance(attempt, int):
            raise TypeError(f"attempt must be an int, got {type(attempt).__name__}")
        if attempt < 0:
            raise ValueError(f"attempt must be >= 0, got {attempt}")
        if not 0 <= random_unit < 1:
            raise ValueError(f"random_unit must be in [0, 1), got {random_unit!r}")
        try:
            # Clamping the exponent keeps ``1.0 ** huge`` from failing to
            # convert ``huge`` to a float; any factor above 1 has saturated
            # long before 2**64 attempts.
            growth = float(self.factor) ** min(attempt, _MAX_EXPONENT)
        except OverflowError:
            growth = math.inf
        capped = min(self.maximum, self.initial * growth)
        return capped * (1 - self.jitter * random_unit)

    def delays(self, random_units: Iterable[float]) -> Iterator[float]:
        """The delays of successive retries, one per random unit.

        ``delays(itertools.repeat(0.0))`` is the deterministic schedule;
        a driver passes ``iter(rng.random, None)``-like streams for jitter.

        Raises:
            ValueError: a random unit is not in [0, 1) (when it is reached).
        """
        for attempt, random_unit in enumerate(random_units):
            yield self.delay(attempt, random_unit)


DEFAULT_RETRY_BACKOFF = Backoff(0.1, 10.0, jitter=0.5)
"""The backoff of `RetryPolicy` unless told otherwise: 0.1, 0.2, 0.4... s
up to 10 s, each delay shortened by up to half at random."""

MAX_ATTEMPTS_LIMIT = 1000
"""The most attempts a `RetryPolicy` may allow."""


def _check_attempts(_: object, attribute: attrs.Attribute[int], value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"max_attempts must be an int, got {value!r}")
    if not 1 <= value <= MAX_ATTEMPTS_LIMIT:
        raise ConfigError(
            f"max_attempts must be between 1 and {MAX_ATTEMPTS_LIMIT}, got {value!r}"
        )


def _check_backoff(
    _: object, attribute: attrs.Attribute[Backoff], value: object
) -> None:
    if not isinstance(value, Backoff):
        raise ConfigError(f"backoff must be a Backoff, got {value!r}")


def _exception_types(value: object) -> tuple[type[Exception], ...]:
    if isinstance(value, type):
        value = (value,)
    if not isinstance(value, tuple | list | frozenset | set):
        raise ConfigError(
            f"non_retryable must be a tuple of exception classes, got {value!r}"
        )
    types = tuple(value)
    for cls in types:
        if not isinstance(cls, type) or not issubclass(cls, Exception):
            raise ConfigError(
                f"non_retryable must contain Exception subclasses, got {cls!r}"
            )
    return types


@attrs.frozen
class RetryPolicy:
    """How often a persisted request is attempted before it is dead-lettered.

    An *attempt* is one hand-over of the request to its handler: storage
    counts one each time the request is claimed (or saved already claimed
    by its sender), so an attempt that ended with its runner (killed, out of
    memory, a lost lease) counts like one that raised. When an attempt's
    handler raises an exception it did not declare, the request is attempted
    again after ``backoff.delay(attempt - 1)`` unless it has had
    ``max_attempts`` attempts or the exception is ``non_retryable``; then it
    is dead-lettered: its final reply is `DeadLetteredError` and a copy of it
    is kept with the dead letters (``trio-cluster dlq``). A request claimed
    for an attempt beyond ``max_attempts`` (its earlier attempts all ended
    with their runner) is dead-lettered without running.

    Declared errors (the handler's ``errors=``) are replies, never retried.

    Raises:
        ConfigError: on construction, for ``max_attempts`` not an int in
            [1, 1000], a ``backoff`` that is not a `Backoff`, or
            ``non_retryable`` not a tuple of Exception subclasses.
    """

    max_attempts: int = attrs.field(default=3, validator=_check_attempts)
    """Attempts in all, the first included (1: never retried)."""
    backoff: Backoff = attrs.field(
        default=DEFAULT_RETRY_BACKOFF, validator=_check_backoff
    )
    """The delay before each retry (and, as an entity type's
    ``defect_retry``, before each restart of a crashed entity)."""
    non_retryable: tuple[type[Exception], ...] = attrs.field(
        default=(), converter=_exception_types
    )
    """Exceptions (and their subclasses) that dead-letter the request at once."""

    def retries(self, attempt: int, error: BaseException | None) -> bool:
        """Whether a request whose attempt number ``attempt`` (1 for the
        first) failed with ``error`` (None: its runner stopped) gets
        another attempt."""
        if attempt >= self.max_attempts:
            return False
        return error is None or not self.is_final(error)

    def is_final(self, error: BaseException) -> bool:
        """Whether ``error`` is ``non_retryable``: the handler's final
        answer (its request is dead-lettered at once)."""
        return isinstance(error, self.non_retryable)


def spread(key: str) -> float:
    """A number in [0, 1) derived from ``key``, for the ``random_unit`` of a
    jittered delay that must be reproducible: the same key (a request's id
    and attempt, an entity's address and crash count) always gets the same
    delay, in a simulation too, while different keys spread evenly."""
    return stable_hash64(key) / 2**64
