"""Tests of trio_cluster._core._cron: parsing, errors and next_after."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta, timezone

import pytest
from hypothesis import given, strategies as st

from trio_cluster import ConfigError
from trio_cluster._core._cron import CronSchedule

IST = timezone(timedelta(hours=5, minutes=30))
PST = timezone(timedelta(hours=-8))


def utc(
    year: int,
    month: int,
    day: int,
    hour: int = 0,
    minute: int = 0,
    second: int = 0,
    micro: int = 0,
) -> datetime:
    return datetime(year, month, day, hour, minute, second, micro, tzinfo=UTC)


# --------------------------------------------------------------------------
# Parsing


def test_parse_every_syntax():
    schedule = CronSchedule.parse("*/15 9-17/4 1,15,20-22 jan-mar,Dec 1/2")
    assert schedule.minutes == (0, 15, 30, 45)
    assert schedule.hours == (9, 13, 17)
    assert schedule.days_of_month == (1, 15, 20, 21, 22)
    assert schedule.months == (1, 2, 3, 12)
    # 1/2 is 1-7/2: Monday, Wednesday, Friday and 7 = Sunday.
    assert schedule.days_of_week == (0, 1, 3, 5)
    assert schedule.day_of_month_restricted
    assert schedule.day_of_week_restricted
    assert (
        str(schedule) == schedule.expression == "*/15 9-17/4 1,15,20-22 jan-mar,Dec 1/2"
    )


def test_star_is_the_full_range():
    schedule = CronSchedule.parse("* * * * *")
    assert schedule.minutes == tuple(range(60))
    assert schedule.hours == tuple(range(24))
    assert schedule.days_of_month == tuple(range(1, 32))
    assert schedule.months == tuple(range(1, 13))
    assert schedule.days_of_week == tuple(range(7))
    assert not schedule.day_of_month_restricted
    assert not schedule.day_of_week_restricted


def test_names_are_case_insensitive_and_seven_is_sunday():
    assert CronSchedule.parse("0 0 * * SUN").days_of_week == (0,)
    assert CronSchedule.parse("0 0 * * 7").days_of_week == (0,)
    assert CronSchedule.parse("0 0 * * fri-7").days_of_week == (0, 5, 6)
    assert CronSchedule.parse("0 0 * * Mon-Fri").days_of_week == (1, 2, 3, 4, 5)
    assert CronSchedule.parse("0 0 * jUl-AUG *").months == (7, 8)
    assert CronSchedule.parse("0 0 * * */2").days_of_week == (0, 2, 4, 6)


def test_steps_and_leading_zeros():
    assert CronSchedule.parse("5/20 * * * *").minutes == (5, 25, 45)
    assert CronSchedule.parse("*/100 * * * *").minutes == (0,)
    assert CronSchedule.parse("07 08 09 * *").days_of_month == (9,)


@pytest.mark.parametrize(
    ("macro", "expression"),
    [
        ("@yearly", "0 0 1 1 *"),
        ("@annually", "0 0 1 1 *"),
        ("@monthly", "0 0 1 * *"),
        ("@weekly", "0 0 * * 0"),
        ("@daily", "0 0 * * *"),
        ("@midnight", "0 0 * * *"),
        ("@hourly", "0 * * * *"),
        (" @DAILY ", "0 0 * * *"),
    ],
)
def test_macros(macro, expression):
    schedule = CronSchedule.parse(macro)
    assert schedule == CronSchedule.parse(expression)
    assert str(schedule) == macro


def test_equality_ignores_the_text_but_not_the_day_flags():
    assert CronSchedule.parse("0 0 * * *") == CronSchedule.parse("0  0 */1 * */1")
    # Same sets, but "0-6" restricts the weekday field (either-day matching).
    assert CronSchedule.parse("0 0 1 * *") != CronSchedule.parse("0 0 1 * 0-6")


@pytest.mark.parametrize(
    ("expression", "message"),
    [
        (
            "0 24 * * *",
            "cron field 'hour' value 24 out of range 0-23 in '0 24 \\* \\* \\*'",
        ),
        ("60 * * * *", "'minute' value 60 out of range 0-59"),
        ("* * 0 * *", "'day-of-month' value 0 out of range 1-31"),
        ("* * 32 * *", "'day-of-month' value 32 out of range 1-31"),
        ("* * * 13 *", "'month' value 13 out of range 1-12"),
        ("* * * * 8", "'day-of-week' value 8 out of range 0-7"),
        ("x * * * *", "'minute' value 'x' is not a number in"),
        ("* * * foo *", "'month' value 'foo' is not a number or a month name"),
        ("* * * * funday", "'day-of-week' value 'funday' is not a number or a weekday"),
        ("* * * mon *", "'month' value 'mon' is not a number or a month name"),
        ("* * * * jan", "'day-of-week' value 'jan' is not a number or a weekday"),
        ("-5 * * * *", "'minute' value '' is not a number"),
        ("*-5 * * * *", "'minute' value '\\*' is not a number"),
        ("+5 * * * *", "'minute' value '\\+5' is not a number"),
        ("\u0665 * * * *", "'minute' value '\u0665' is not a number"),
        ("1,,2 * * * *", "'minute' has an empty list item"),
        ("1, * * * *", "'minute' has an empty list item"),
        ("*/0 * * * *", "'minute' step '0' is not an integer >= 1"),
        ("*/x * * * *", "'minute' step 'x' is not an integer >= 1"),
        ("1/2/3 * * * *", "'minute' step '2/3' is not an integer >= 1"),
        ("* 22-2 * * *", "'hour' range 22-2 is backwards; write it as 22-23,0-2"),
        ("* * * * 5-1", "'day-of-week' range 5-1 is backwards"),
        ("* * * *", "has 4 fields; write 5"),
        ("* * * * * *", "has 6 fields; write 5"),
        ("", "has 0 fields"),
        ("@reboot", "unknown cron macro '@reboot'; use one of @yearly"),
        ("0 0 30 2 *", "never matches: day-of-month 30 never occurs in month 2"),
        (
            "0 0 31 2,4,jun * ",
            "never matches: day-of-month 31 never occurs in month 2,4,6",
        ),
        ("0 0 30 2 */2", "never matches"),
    ],
)
def test_parse_errors_name_the_field_and_the_problem(expression, message):
    with pytest.raises(ConfigError, match=message):
        CronSchedule.parse(expression)


def test_parse_refuses_a_non_string():
    with pytest.raises(ConfigError, match="a cron expression is a string, got 5"):
        CronSchedule.parse(5)  # type: ignore[arg-type]


def test_either_day_matching_makes_feb_30_possible():
    assert CronSchedule.parse("0 0 29 2 *").days_of_month == (29,)
    # Either-day matching: every Monday of February matches, so this fires.
    schedule = CronSchedule.parse("0 0 30 2 mon")
    assert schedule.next_after(utc(2025, 1, 1)) == utc(2025, 2, 3)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        (
            "minutes",
            [60],
            r"cron minute values must be a non-empty set of integers in 0-59",
        ),
        ("hours", [], r"cron hour values must be a non-empty set"),
        ("days_of_month", [0], r"day-of-month values .* in 1-31"),
        ("months", [1.0], r"month values .* in 1-12"),
        ("days_of_week", [7], r"day-of-week values .* in 0-6"),
    ],
)
def test_direct_construction_is_validated(field, value, message):
    fields = {
        "minutes": [0],
        "hours": [0],
        "days_of_month": [1],
        "months": [1],
        "days_of_week": [0],
    }
    fields[field] = value
    with pytest.raises(ConfigError, match=message):
        CronSchedule(
            "direct",
            **fields,
            day_of_month_restricted=True,
            day_of_week_restricted=False,
        )


def test_direct_construction_sorts_and_deduplicates():
    schedule = CronSchedule(
        "direct",
        [30, 0, 30],
        {12},
        range(1, 3),
        [1],
        range(7),
        day_of_month_restricted=True,
        day_of_week_restricted=False,
    )
    assert schedule.minutes == (0, 30)
    assert schedule.days_of_month == (1, 2)
    assert schedule.next_after(utc(2025, 1, 1, 12, 0)) == utc(2025, 1, 1, 12, 30)


# --------------------------------------------------------------------------
# next_after


@pytest.mark.parametrize(
    ("expression", "after", "expected"),
    [
        ("* * * * *", utc(2025, 6, 7, 12, 0, 0), utc(2025, 6, 7, 12, 1)),
        ("* * * * *", utc(2025, 6, 7, 12, 0, 59, 999_999), utc(2025, 6, 7, 12, 1)),
        ("*/15 * * * *", utc(2025, 6, 7, 12, 14, 59), utc(2025, 6, 7, 12, 15)),
        ("*/15 * * * *", utc(2025, 6, 7, 12, 15), utc(2025, 6, 7, 12, 30)),
        ("0 * * * *", utc(2025, 12, 31, 23, 30), utc(2026, 1, 1, 0, 0)),
        ("30 9 * * mon-fri", utc(2025, 6, 6, 9, 30), utc(2025, 6, 9, 9, 30)),
        ("0 0 1 * *", utc(2025, 1, 31, 12), utc(2025, 2, 1)),
        ("0 0 31 * *", utc(2025, 4, 1), utc(2025, 5, 31)),
        ("0 0 29 2 *", utc(2025, 1, 1), utc(2028, 2, 29)),
        ("0 12 * 3 *", utc(2025, 3, 31, 12), utc(2026, 3, 1, 12)),
        ("59 23 31 12 *", utc(2025, 12, 31, 23, 58), utc(2025, 12, 31, 23, 59)),
        ("@yearly", utc(2025, 1, 1), utc(2026, 1, 1)),
        ("@weekly", utc(2025, 6, 7), utc(2025, 6, 8)),
        # Vixie: both day fields restricted, so the 13th OR a Friday.
        ("0 0 13 * fri", utc(2025, 6, 7), utc(2025, 6, 13)),
        ("0 0 13 * fri", utc(2025, 6, 13), utc(2025, 6, 20)),
        ("0 0 13 * fri", utc(2025, 7, 12), utc(2025, 7, 13)),
        # A day field that starts with * is unrestricted: both must match.
        ("0 0 */2 * fri", utc(2025, 6, 7), utc(2025, 6, 13)),
        ("0 0 13 * */1", utc(2025, 6, 7), utc(2025, 6, 13)),
        ("0 0 13 * */1", utc(2025, 6, 13), utc(2025, 7, 13)),
        # */5 is 0-7/5: Sunday and Friday; AND semantics.
        ("0 0 13 * */5", utc(2025, 7, 1), utc(2025, 7, 13)),
        ("0 0 13 * */5", utc(2025, 7, 13), utc(2026, 2, 13)),
        # Days 1, 13 and 25 that are Fridays.
        ("0 0 */12 * 5", utc(2025, 7, 1), utc(2025, 7, 25)),
        # Feb 29 that is also a Sunday: 2088, then 40 years later.
        ("0 0 29 2 */7", utc(2088, 3, 1), utc(2128, 2, 29)),
    ],
)
def test_next_after_examples(expression, after, expected):
    assert CronSchedule.parse(expression).next_after(after) == expected


def test_next_after_converts_other_time_zones_and_returns_utc():
    schedule = CronSchedule.parse("0 12 * * *")
    # 17:00 in India is 11:30 UTC.
    result = schedule.next_after(datetime(2025, 6, 7, 17, 0, tzinfo=IST))
    assert result == utc(2025, 6, 7, 12, 0)
    assert result.tzinfo is UTC
    assert schedule.next_after(datetime(2025, 6, 7, 4, 0, tzinfo=PST)) == utc(
        2025, 6, 8, 12
    )


def test_next_after_refuses_naive_datetimes():
    with pytest.raises(ValueError, match="aware datetime"):
        CronSchedule.parse("* * * * *").next_after(datetime(2025, 1, 1))


def test_next_after_stops_at_the_end_of_datetime():
    schedule = CronSchedule.parse("* * * * *")
    assert schedule.next_after(utc(9999, 12, 31, 23, 58)) == utc(9999, 12, 31, 23, 59)
    with pytest.raises(ValueError, match="no instant after 9999-12-31T23:59:00"):
        schedule.next_after(utc(9999, 12, 31, 23, 59))


def test_feb_29_falls_on_every_weekday_in_a_gregorian_cycle():
    # The 400-year bound of next_after relies on this calendar fact: any
    # (month, day) that exists occurs on every weekday within 400 years.
    weekdays = {
        date(year, 2, 29).weekday()
        for year in range(2000, 2400, 4)
        if year % 100 or year % 400 == 0
    }
    assert weekdays == set(range(7))


def test_next_after_chains():
    schedule = CronSchedule.parse("0 */6 * * *")
    instant = utc(2025, 1, 1)
    seen = []
    for _ in range(5):
        instant = schedule.next_after(instant)
        seen.append(instant.hour)
    assert seen == [6, 12, 18, 0, 6]


# --------------------------------------------------------------------------
# Property: next_after against a brute-force reference

MONTH_NAMES = ["jan", "feb", "mar", "apr", "may", "jun"]
MONTH_NAMES += ["jul", "aug", "sep", "oct", "nov", "dec"]
WEEKDAY_NAMES = ["sun", "mon", "tue", "wed", "thu", "fri", "sat"]
FIELDS = [
    (0, 59, {}),
    (0, 23, {}),
    (1, 31, {}),
    (1, 12, dict(enumerate(MONTH_NAMES, 1))),
    (0, 7, dict(enumerate(WEEKDAY_NAMES))),
]


@st.composite
def fields(
    draw: st.DrawFn, low: int, high: int, names: dict[int, str]
) -> tuple[str, set[int]]:
    """A field's text and the set of values it denotes."""

    def show(value: int) -> str:
        if value in names and draw(st.booleans()):
            name = names[value]
            return draw(st.sampled_from([name, name.upper(), name.title()]))
        return str(value)

    texts: list[str] = []
    values: set[int] = set()
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["*", "*", "*/s", "a", "a", "a-b", "a-b/s", "a/s"]))
        first = draw(st.integers(low, high))
        last = draw(st.integers(first, high))
        step = draw(st.integers(1, high - low + 1))
        texts.append(
            {
                "*": "*",
                "*/s": f"*/{step}",
                "a": show(first),
                "a-b": f"{show(first)}-{show(last)}",
                "a-b/s": f"{show(first)}-{show(last)}/{step}",
                "a/s": f"{show(first)}/{step}",
            }[kind]
        )
        values |= {
            "*": set(range(low, high + 1)),
            "*/s": set(range(low, high + 1, step)),
            "a": {first},
            "a-b": set(range(first, last + 1)),
            "a-b/s": set(range(first, last + 1, step)),
            "a/s": set(range(first, high + 1, step)),
        }[kind]
    if high == 7:
        values = {value % 7 for value in values}
    return ",".join(texts), values


@st.composite
def expressions(draw: st.DrawFn) -> tuple[str, list[set[int]]]:
    parts = [draw(fields(*spec)) for spec in FIELDS]
    return " ".join(text for text, _ in parts), [values for _, values in parts]


def reference_day_matches(
    day: date, sets: list[set[int]], dom_star: bool, dow_star: bool
) -> bool:
    _, _, doms, months, dows = sets
    if day.month not in months:
        return False
    in_dom = day.day in doms
    in_dow = day.isoweekday() % 7 in dows
    if dom_star or dow_star:
        return in_dom and in_dow
    return in_dom or in_dow


def reference_next(
    after: datetime, sets: list[set[int]], dom_star: bool, dow_star: bool, days: int
) -> datetime | None:
    """Minute by minute, skipping only whole days that do not match."""
    minutes, hours = sets[0], sets[1]
    start = after.astimezone(UTC).replace(second=0, microsecond=0) + timedelta(
        minutes=1
    )
    day = start.date()
    for _ in range(days):
        if reference_day_matches(day, sets, dom_star, dow_star):
            instant = datetime(day.year, day.month, day.day, tzinfo=UTC)
            while instant.date() == day:
                if (
                    instant >= start
                    and instant.hour in hours
                    and instant.minute in minutes
                ):
                    return instant
                instant += timedelta(minutes=1)
        day += timedelta(days=1)
    return None


WINDOW_DAYS = 3 * 366


@given(
    expression=expressions(),
    after=st.datetimes(
        min_value=datetime(2000, 1, 1),
        max_value=datetime(2090, 12, 31),
        timezones=st.sampled_from([UTC, IST, PST]),
    ),
)
def test_next_after_matches_brute_force(expression, after):
    text, sets = expression
    parts = text.split()
    dom_star, dow_star = parts[2].startswith("*"), parts[4].startswith("*")
    try:
        schedule = CronSchedule.parse(text)
    except ConfigError as error:
        # Only schedules that can never fire are refused.
        message = str(error)
        assert "never matches" in message
        assert dom_star or dow_star
        longest = [0, 31, 29, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31]
        assert not any(day <= longest[month] for month in sets[3] for day in sets[2])
        return
    assert [set(values) for values in attrs_sets(schedule)] == sets
    expected = reference_next(after, sets, dom_star, dow_star, WINDOW_DAYS)
    result = schedule.next_after(after)
    assert result > after
    assert result.second == result.microsecond == 0
    assert result.tzinfo is UTC
    if expected is not None:
        assert result == expected
    else:
        window_end = after.astimezone(UTC) + timedelta(days=WINDOW_DAYS - 1)
        assert result > window_end
        assert reference_day_matches(result.date(), sets, dom_star, dow_star)
        assert result.hour in sets[1]
        assert result.minute in sets[0]


def attrs_sets(schedule: CronSchedule) -> list[tuple[int, ...]]:
    return [
        schedule.minutes,
        schedule.hours,
        schedule.days_of_month,
        schedule.months,
        schedule.days_of_week,
    ]
