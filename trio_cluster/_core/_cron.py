"""Cron schedules: parse 5-field expressions, find the next instant (sans-IO).

Theory of operation: `CronSchedule.parse` turns ``"minute hour day-of-month
month day-of-week"`` into five sorted tuples of allowed values, plus two
flags that say whether each day field is *restricted* (does not start with
``*``). A field is a comma-separated list of items, each of which is ``*``,
``a``, ``a-b``, ``*/s``, ``a-b/s`` or ``a/s`` (``a`` up to the field's last
value, in steps of ``s``). Months and weekdays may be given by English
three-letter names (``jan``..``dec``, ``sun``..``sat``, any case). Weekdays
run 0-7 where both 0 and 7 are Sunday, as in Vixie cron (so ``*`` is 0-7
and ``1/2`` is Monday, Wednesday, Friday and Sunday). The macros
``@yearly @annually @monthly @weekly @daily @midnight @hourly`` stand for
their usual expressions.

Day matching follows Vixie cron (``man 5 crontab``): when both day fields are
restricted, a day matches if *either* matches; otherwise both must match (an
unrestricted field matches every day, or its step set such as ``*/2``).

`CronSchedule.next_after` walks the calendar field by field in UTC: it jumps
to the next allowed month, then scans that month's days, then the allowed
hours and minutes, carrying into the next day, month or year when a field
runs out. A schedule that can never fire (``0 0 30 2 *``) is refused when it
is built; every other schedule matches within one 400-year Gregorian cycle,
which bounds the search.
"""

from __future__ import annotations

import bisect
import calendar
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime

import attrs

from .._errors import ConfigError

__all__ = ["CronSchedule"]

_MONTHS = {
    name.lower(): number for number, name in enumerate(calendar.month_abbr) if name
}
_WEEKDAYS = {"sun": 0, "mon": 1, "tue": 2, "wed": 3, "thu": 4, "fri": 5, "sat": 6}
_MACROS = {
    **dict.fromkeys(("@yearly", "@annually"), "0 0 1 1 *"),
    "@monthly": "0 0 1 * *",
    "@weekly": "0 0 * * 0",
    **dict.fromkeys(("@daily", "@midnight"), "0 0 * * *"),
    "@hourly": "0 * * * *",
}
_LONGEST_MONTH = (0, 31, 29, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31)
_LAST_YEAR = 9999
_CYCLE_YEARS = 400


@attrs.frozen
class _Field:
    name: str
    low: int
    high: int
    names: Mapping[str, int]
    kind: str

    def value(self, text: str, expression: str) -> int:
        if text.isascii() and text.isdigit():
            number = int(text)
        elif text.lower() in self.names:
            number = self.names[text.lower()]
        else:
            raise _error(self, f"value {text!r} is not a number{self.kind}", expression)
        if not self.low <= number <= self.high:
            raise _error(
                self, f"value {number} out of range {self.low}-{self.high}", expression
            )
        return number


_FIELDS = (
    _Field("minute", 0, 59, {}, ""),
    _Field("hour", 0, 23, {}, ""),
    _Field("day-of-month", 1, 31, {}, ""),
    _Field("month", 1, 12, _MONTHS, " or a month name (jan..dec)"),
    _Field("day-of-week", 0, 7, _WEEKDAYS, " or a weekday name (sun..sat)"),
)


def _error(field: _Field, problem: str, expression: str) -> ConfigError:
    return ConfigError(f"cron field {field.name!r} {problem} in {expression!r}")


def _parse_item(item: str, field: _Field, expression: str) -> range:
    if not item:
        raise _error(field, "has an empty list item", expression)
    base, slash, step_text = item.partition("/")
    step = 1
    if slash:
        if not (step_text.isascii() and step_text.isdigit()) or int(step_text) < 1:
            raise _error(
                field, f"step {step_text!r} is not an integer >= 1", expression
            )
        step = int(step_text)
    if base == "*":
        return range(field.low, field.high + 1, step)
    first_text, dash, last_text = base.partition("-")
    first = field.value(first_text, expression)
    if dash:
        last = field.value(last_text, expression)
    else:
        last = field.high if slash else first
    if last < first:
        raise _error(
            field,
            f"range {base} is backwards; write it as {first}-{field.high},"
            f"{field.low}-{last}",
            expression,
        )
    return range(first, last + 1, step)


def _parse_field(text: str, field: _Field, expression: str) -> frozenset[int]:
    values: set[int] = set()
    for item in text.split(","):
        values.update(_parse_item(item, field, expression))
    if field.names is _WEEKDAYS:
        values = {value % 7 for value in values}  # 7 is Sunday again
    return frozenset(values)


def _join(values: tuple[int, ...]) -> str:
    return ",".join(map(str, values))


def _sorted_tuple(values: Iterable[int]) -> tuple[int, ...]:
    return tuple(sorted(set(values)))


def _first_at_least(values: tuple[int, ...], low: int) -> int | None:
    index = bisect.bisect_left(values, low)
    return values[index] if index < len(values) else None


@attrs.frozen
class CronSchedule:
    """A parsed cron expression, in UTC. Build it with `CronSchedule.parse`.

    Two schedules are equal when they fire at the same instants, whatever
    their text (``@daily == 0 0 * * *``).

    Raises:
        ConfigError: a value set is empty or out of range, or the schedule
            can never fire.
    """

    expression: str = attrs.field(eq=False)
    """The text the schedule was parsed from."""
    minutes: tuple[int, ...] = attrs.field(converter=_sorted_tuple)
    """Allowed minutes, 0-59."""
    hours: tuple[int, ...] = attrs.field(converter=_sorted_tuple)
    """Allowed hours, 0-23."""
    days_of_month: tuple[int, ...] = attrs.field(converter=_sorted_tuple)
    """Allowed days of the month, 1-31."""
    months: tuple[int, ...] = attrs.field(converter=_sorted_tuple)
    """Allowed months, 1-12."""
    days_of_week: tuple[int, ...] = attrs.field(converter=_sorted_tuple)
    """Allowed days of the week, 0-6 with 0 = Sunday."""
    day_of_month_restricted: bool = attrs.field(kw_only=True)
    """The day-of-month field did not start with ``*``."""
    day_of_week_restricted: bool = attrs.field(kw_only=True)
    """The day-of-week field did not start with ``*``."""

    def __attrs_post_init__(self) -> None:
        values = attrs.astuple(self, recurse=False)[1:6]
        for field, allowed in zip(_FIELDS, values, strict=True):
            high = 6 if field.names is _WEEKDAYS else field.high
            if not allowed or not all(
                type(value) is int and field.low <= value <= high for value in allowed
            ):
                raise ConfigError(
                    f"cron {field.name} values must be a non-empty set of integers"
                    f" in {field.low}-{high}, got {allowed!r} for {self.expression!r}"
                )
        if not self._either_day_matches and not any(
            day <= _LONGEST_MONTH[month]
            for month in self.months
            for day in self.days_of_month
        ):
            raise ConfigError(
                f"cron expression {self.expression!r} never matches: day-of-month"
                f" {_join(self.days_of_month)} never occurs in month {_join(self.months)}"
            )

    @property
    def _either_day_matches(self) -> bool:
        return self.day_of_month_restricted and self.day_of_week_restricted

    @classmethod
    def parse(cls, expression: str) -> CronSchedule:
        """Parse a 5-field cron expression or a macro such as ``@daily``.

        Raises:
            ConfigError: the expression is malformed, naming the field and the
                problem, e.g. ``cron field 'hour' value 24 out of range 0-23
                in '0 24 * * *'``; or it can never match (``0 0 30 2 *``).
        """
        if not isinstance(expression, str):
            raise ConfigError(f"a cron expression is a string, got {expression!r}")
        text = expression.strip()
        if text.startswith("@"):
            if text.lower() not in _MACROS:
                raise ConfigError(
                    f"unknown cron macro {text!r}; use one of {', '.join(_MACROS)}"
                )
            text = _MACROS[text.lower()]
        parts = text.split()
        if len(parts) != len(_FIELDS):
            raise ConfigError(
                f"cron expression {expression!r} has {len(parts)} fields; write 5"
                " (minute hour day-of-month month day-of-week) or a macro like @daily"
            )
        values = [
            _parse_field(part, field, expression)
            for part, field in zip(parts, _FIELDS, strict=True)
        ]
        return cls(
            expression,
            *values,
            day_of_month_restricted=not parts[2].startswith("*"),
            day_of_week_restricted=not parts[4].startswith("*"),
        )

    def __str__(self) -> str:
        return self.expression

    def next_after(self, after: datetime) -> datetime:
        """The first instant of the schedule strictly after ``after``.

        Args:
            after: an aware datetime, in any time zone.

        Returns:
            An aware UTC datetime with zero seconds and microseconds.

        Raises:
            ValueError: ``after`` is naive, or no instant exists before the
                year 10000.
        """
        if after.utcoffset() is None:
            raise ValueError(f"next_after needs an aware datetime, got {after!r}")
        start = after.astimezone(UTC)
        year, month, day, hour = start.year, start.month, start.day, start.hour
        minute = start.minute + 1
        limit = min(_LAST_YEAR, start.year + _CYCLE_YEARS)
        # Each step either returns or moves to the first candidate of a later
        # month, day or hour; a value past its field's end (minute 60, hour
        # 24, day 32, month 13) finds nothing and carries.
        while year <= limit:
            next_month = _first_at_least(self.months, month)
            if next_month is None:
                year, month, day, hour, minute = year + 1, 1, 1, 0, 0
                continue
            if next_month != month:
                month, day, hour, minute = next_month, 1, 0, 0
            next_day = self._first_day(year, month, day)
            if next_day is None:
                month, day, hour, minute = month + 1, 1, 0, 0
                continue
            if next_day != day:
                day, hour, minute = next_day, 0, 0
            next_hour = _first_at_least(self.hours, hour)
            if next_hour is None:
                day, hour, minute = day + 1, 0, 0
                continue
            if next_hour != hour:
                hour, minute = next_hour, 0
            next_minute = _first_at_least(self.minutes, minute)
            if next_minute is None:
                hour, minute = hour + 1, 0
                continue
            return datetime(year, month, day, hour, next_minute, tzinfo=UTC)
        raise ValueError(
            f"cron expression {self.expression!r} has no instant after"
            f" {after.isoformat()} before the year {limit + 1}"
        )

    def _first_day(self, year: int, month: int, day: int) -> int | None:
        """The first matching day of the month from ``day`` on, if any."""
        first_weekday, length = calendar.monthrange(year, month)
        for candidate in range(day, length + 1):
            in_month = candidate in self.days_of_month
            # calendar counts Monday as 0, cron counts Sunday as 0.
            in_week = (first_weekday + candidate) % 7 in self.days_of_week
            if self._either_day_matches:
                if in_month or in_week:
                    return candidate
            elif in_month and in_week:
                return candidate
        return None
