"""Checks of the numbers and times that configure trio_cluster (sans-IO).

Theory of operation: every option or argument that is a duration, a count or
a point in time is checked by one function of this module, so that the same
mistake gets the same message wherever it is made. Each check takes the
name to blame (``"lease_duration"``, ``"limit"``) and the value, returns the
value normalised (a ``float`` for seconds, an ``int`` for counts), and raises
with a message that names the option, what it must be and what it got.

The core is `is_number`: an ``int`` or ``float`` but *not* a ``bool``
(``True`` is an ``int`` subclass, but never a sensible duration or count).

Which exceptions: the caller chooses with ``errors``, a pair of exception
classes (for a value of the wrong type, for a value out of range):

* `CONFIG` (the default): `ConfigError` for both, for options checked eagerly
  when something is configured (`ShardingConfig`, storage constructors);
* `ARGUMENT`: the builtin `TypeError` / `ValueError`, for arguments of calls
  (a storage operation's ``now`` or ``limit``, a session's lease).

Messages, for a name ``n`` and value ``v``:

==================================  ==========================================
check                               message
==================================  ==========================================
`positive_number`                   ``n must be a number, got v`` /
                                    ``n must be a positive, finite number, ...``
`positive_seconds`                  ``n must be a number, got v: give a number
                                    of seconds`` / ``n must be a positive,
                                    finite number of seconds, got v``
`non_negative_seconds`              the same with ``finite number of seconds
                                    >= 0``
`integer`                           ``n must be an int, got v``
`count`, `positive_count`           ``n must be an integer >= m, got v`` (or
                                    ``an integer of at least m bytes``)
`timestamp`                         ``n must be a float (seconds since the
                                    epoch), got v`` / ``n must be finite, ...``
`aware_time`                        ``n must be an aware datetime, got v``
`part_name`                         ``a w name must be 1-100 letters, digits,
                                    '_', '.' or '-', got v`` (for what ``w``)
==================================  ==========================================
"""

from __future__ import annotations

import math
from datetime import datetime
from typing import Final

from .._errors import ConfigError

__all__ = [
    "ARGUMENT",
    "CONFIG",
    "Errors",
    "aware_time",
    "count",
    "integer",
    "is_integer",
    "is_number",
    "non_negative_seconds",
    "part_name",
    "positive_count",
    "positive_number",
    "positive_seconds",
    "timestamp",
]

Errors = tuple[type[Exception], type[Exception]]
"""The exception classes to raise: (wrong type, value out of range)."""

CONFIG: Final[Errors] = (ConfigError, ConfigError)
"""For configuration options: `ConfigError` (a `ValueError`) for both."""

ARGUMENT: Final[Errors] = (TypeError, ValueError)
"""For call arguments: the builtin `TypeError` and `ValueError`."""

_SECONDS_HINT = ": give a number of seconds"
_NAME_CHARS: Final = frozenset(
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.-"
)


def is_number(value: object) -> bool:
    """Whether ``value`` is an int or a float, but not a bool."""
    return isinstance(value, int | float) and not isinstance(value, bool)


def is_integer(value: object) -> bool:
    """Whether ``value`` is an int, but not a bool."""
    return isinstance(value, int) and not isinstance(value, bool)


def _number(name: str, value: object, errors: Errors, hint: str = "") -> float:
    if not is_number(value):
        raise errors[0](f"{name} must be a number, got {value!r}{hint}")
    assert isinstance(value, int | float)
    return value


def positive_number(name: str, value: object, *, errors: Errors = CONFIG) -> float:
    """Check a positive, finite number (e.g. a weight); return it as given."""
    checked = _number(name, value, errors)
    if not (math.isfinite(checked) and checked > 0):
        raise errors[1](f"{name} must be a positive, finite number, got {value!r}")
    return checked


def positive_seconds(name: str, value: object, *, errors: Errors = CONFIG) -> float:
    """Check a duration that must be positive and finite; return it as a float."""
    checked = _number(name, value, errors, _SECONDS_HINT)
    if not (math.isfinite(checked) and checked > 0):
        raise errors[1](
            f"{name} must be a positive, finite number of seconds, got {value!r}"
        )
    return float(checked)


def non_negative_seconds(name: str, value: object, *, errors: Errors = CONFIG) -> float:
    """Check a duration that may be 0 but must be finite; return it as a float."""
    checked = _number(name, value, errors, _SECONDS_HINT)
    if not (math.isfinite(checked) and checked >= 0):
        raise errors[1](
            f"{name} must be a finite number of seconds >= 0, got {value!r}"
        )
    return float(checked)


def integer(name: str, value: object, *, errors: Errors = CONFIG) -> int:
    """Check an int of any value (an id, an epoch); return it."""
    if not is_integer(value):
        raise errors[0](f"{name} must be an int, got {value!r}")
    assert isinstance(value, int)
    return value


def count(
    name: str,
    value: object,
    *,
    minimum: int = 0,
    unit: str | None = None,
    errors: Errors = CONFIG,
) -> int:
    """Check an int of at least ``minimum`` (a size, a limit); return it.

    ``unit`` names what is counted in the message (``"bytes"``).
    """
    if unit is None:
        wanted = f"an integer >= {minimum}"
    else:
        wanted = f"an integer of at least {minimum} {unit}"
    if not is_integer(value):
        raise errors[0](f"{name} must be {wanted}, got {value!r}")
    assert isinstance(value, int)
    if value < minimum:
        raise errors[1](f"{name} must be {wanted}, got {value!r}")
    return value


def positive_count(name: str, value: object, *, errors: Errors = CONFIG) -> int:
    """Check an int of at least 1 (a capacity, a batch size); return it."""
    return count(name, value, minimum=1, errors=errors)


def timestamp(name: str, value: object, *, errors: Errors = CONFIG) -> float:
    """Check a wall-clock time in seconds since the Unix epoch (finite)."""
    if not is_number(value):
        raise errors[0](
            f"{name} must be a float (seconds since the epoch), got {value!r}"
        )
    assert isinstance(value, int | float)
    if not math.isfinite(value):
        raise errors[1](f"{name} must be finite, got {value!r}")
    return float(value)


def aware_time(name: str, value: object, *, errors: Errors = CONFIG) -> datetime:
    """Check a time-zone aware `datetime` (a naive one is ambiguous)."""
    if not isinstance(value, datetime):
        raise errors[0](f"{name} must be an aware datetime, got {value!r}")
    if value.utcoffset() is None:
        raise errors[1](
            f"{name} must be an aware datetime, got the naive {value!r};"
            " give it a tzinfo, e.g. tzinfo=UTC"
        )
    return value


def part_name(what: str, value: object) -> str:
    """Check the name of a queue, topic, subscription or workflow: 1-100
    letters, digits, ``_``, ``.`` or ``-`` (it becomes part of entity ids
    and storage keys); return it.

    Raises:
        ConfigError: it is not (``what`` names the kind in the message).
    """
    if (
        not isinstance(value, str)
        or not value
        or len(value) > 100
        or not set(value) <= _NAME_CHARS
    ):
        raise ConfigError(
            f"a {what} name must be 1-100 letters, digits, '_', '.' or '-', got {value!r}"
        )
    return value
