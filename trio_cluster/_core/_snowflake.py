"""Snowflake ids: 64-bit, time-ordered, unique across the cluster (sans-IO).

Theory of operation: an id packs three numbers into 63 bits, so it fits a
signed PostgreSQL ``bigint`` and sorts by creation time::

    bit 62 ........ 22 | 21 ..... 12 | 11 ..... 0
    milliseconds since | machine id  | sequence
    EPOCH_MS (41 bits) | (10 bits)   | (12 bits)

``EPOCH_MS`` is 2025-01-01T00:00:00Z, so the timestamps last until 2094.
The layout is @effect/cluster's (``reference/effect-cluster.md`` §2.7).

Uniqueness: each live runner has its own machine id (0..1023, handed out by
storage at registration), and one `SnowflakeGenerator` per runner never
repeats a (millisecond, sequence) pair: it keeps the last millisecond it
used and never goes below it, even when the clock steps backwards; after
4096 ids in one millisecond it borrows the next one. When the machine id
changes, the next id starts a fresh millisecond, so ids from one generator
are strictly increasing whatever happens. The clock is an argument
(``now_ms``): this module reads no clock.
"""

from __future__ import annotations

import attrs

__all__ = [
    "EPOCH_MS",
    "MAX_MACHINE_ID",
    "MAX_SEQUENCE",
    "Snowflake",
    "SnowflakeGenerator",
]

EPOCH_MS = 1_735_689_600_000
"""2025-01-01T00:00:00Z in Unix milliseconds: timestamp 0 of every id."""

MAX_MACHINE_ID = (1 << 10) - 1
"""Largest machine id (1023)."""

MAX_SEQUENCE = (1 << 12) - 1
"""Largest sequence number within one millisecond (4095)."""

_MAX_ELAPSED = (1 << 41) - 1
_TIMESTAMP_SHIFT = 22
_MACHINE_SHIFT = 12


def _check_int(name: str, value: object, low: int, high: int) -> int:
    """``value`` itself, if it is an int (not a bool) in ``low..high``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if not low <= value <= high:
        raise ValueError(f"{name} must be in {low}..{high}, got {value}")
    return value


def _check_value(_: object, __: object, value: int) -> None:
    _check_int("snowflake value", value, 0, (1 << 63) - 1)


@attrs.frozen(order=True)
class Snowflake:
    """A decoded snowflake id: ``Snowflake(request_id).timestamp_ms``."""

    value: int = attrs.field(validator=_check_value)
    """The id itself, in ``[0, 2**63)``."""

    @classmethod
    def from_parts(cls, timestamp_ms: int, machine_id: int, sequence: int) -> Snowflake:
        """Pack an id.

        Args:
            timestamp_ms: Unix milliseconds, from `EPOCH_MS` to about 2094.
            machine_id: 0..1023.
            sequence: 0..4095.

        Raises:
            TypeError: an argument is not an int.
            ValueError: an argument is out of range.
        """
        _check_int("timestamp_ms", timestamp_ms, EPOCH_MS, EPOCH_MS + _MAX_ELAPSED)
        _check_int("machine_id", machine_id, 0, MAX_MACHINE_ID)
        _check_int("sequence", sequence, 0, MAX_SEQUENCE)
        elapsed = timestamp_ms - EPOCH_MS
        return cls(
            elapsed << _TIMESTAMP_SHIFT | machine_id << _MACHINE_SHIFT | sequence
        )

    @property
    def timestamp_ms(self) -> int:
        """When the id was made, in Unix milliseconds."""
        return EPOCH_MS + (self.value >> _TIMESTAMP_SHIFT)

    @property
    def machine_id(self) -> int:
        """The machine id of the runner that made the id."""
        return (self.value >> _MACHINE_SHIFT) & MAX_MACHINE_ID

    @property
    def sequence(self) -> int:
        """The id's rank among those its runner made in the same millisecond."""
        return self.value & MAX_SEQUENCE

    def __int__(self) -> int:
        return self.value

    def __str__(self) -> str:
        return str(self.value)


class SnowflakeGenerator:
    """Makes strictly increasing ids for one runner (mutable, pure).

    Args:
        machine_id: 0..1023; settable later, when registration provides it.

    Raises:
        TypeError, ValueError: ``machine_id`` is not an int in 0..1023.
    """

    def __init__(self, machine_id: int) -> None:
        self._machine_id = _check_int("machine_id", machine_id, 0, MAX_MACHINE_ID)
        self._last_elapsed = -1
        """Milliseconds since the epoch of the last id (-1: none yet)."""
        self._sequence = MAX_SEQUENCE
        """Sequence of the last id; MAX_SEQUENCE forces a fresh millisecond."""

    @property
    def machine_id(self) -> int:
        """The machine id put in the ids made from now on."""
        return self._machine_id

    @machine_id.setter
    def machine_id(self, machine_id: int) -> None:
        checked = _check_int("machine_id", machine_id, 0, MAX_MACHINE_ID)
        if checked != self._machine_id:
            self._machine_id = checked
            # A lower machine id in the same millisecond would give a lower
            # id: move on to a fresh millisecond instead.
            self._sequence = MAX_SEQUENCE

    def next_id(self, now_ms: int) -> int:
        """The next id, for the current time ``now_ms`` (Unix milliseconds).

        Returns:
            An id greater than every id this generator returned before.

        Raises:
            TypeError: ``now_ms`` is not an int.
            ValueError: ``now_ms`` is before `EPOCH_MS`, or the ids ran past
                the 41-bit timestamp (year 2094).
        """
        if not isinstance(now_ms, int):
            raise TypeError(f"now_ms must be an int, got {type(now_ms).__name__}")
        elapsed = now_ms - EPOCH_MS
        if elapsed < 0:
            raise ValueError(
                f"now_ms {now_ms} is before the snowflake epoch {EPOCH_MS}"
            )
        if elapsed > self._last_elapsed:
            self._last_elapsed = elapsed
            self._sequence = 0
        elif self._sequence < MAX_SEQUENCE:
            # Same millisecond, or the clock went backwards: keep counting in
            # the last millisecond used.
            self._sequence += 1
        else:
            # 4096 ids in one millisecond: borrow the next one.
            self._last_elapsed += 1
            self._sequence = 0
        if self._last_elapsed > _MAX_ELAPSED:
            raise ValueError("snowflake timestamps are exhausted (past the year 2094)")
        return (
            self._last_elapsed << _TIMESTAMP_SHIFT
            | self._machine_id << _MACHINE_SHIFT
            | self._sequence
        )
