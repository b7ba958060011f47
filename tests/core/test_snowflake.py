"""Tests of trio_cluster._core._snowflake: layout, ordering, generator."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from hypothesis import given, strategies as st

from trio_cluster import Snowflake as PublicSnowflake
from trio_cluster._core._snowflake import (
    EPOCH_MS,
    MAX_MACHINE_ID,
    MAX_SEQUENCE,
    Snowflake,
    SnowflakeGenerator,
)

LAST_MS = EPOCH_MS + 2**41 - 1
T0 = EPOCH_MS + 1_000_000


def test_epoch_is_2025_01_01_utc():
    assert datetime(2025, 1, 1, tzinfo=UTC).timestamp() * 1000 == EPOCH_MS


def test_public_reexport():
    assert PublicSnowflake is Snowflake


def test_layout():
    flake = Snowflake.from_parts(EPOCH_MS + 5, 3, 7)
    assert flake.value == (5 << 22) | (3 << 12) | 7
    assert int(flake) == flake.value
    assert str(flake) == str(flake.value)
    assert (flake.timestamp_ms, flake.machine_id, flake.sequence) == (
        EPOCH_MS + 5,
        3,
        7,
    )


def test_largest_id_fits_a_signed_bigint():
    flake = Snowflake.from_parts(LAST_MS, MAX_MACHINE_ID, MAX_SEQUENCE)
    assert flake.value == 2**63 - 1
    assert Snowflake(0).timestamp_ms == EPOCH_MS


def test_ids_order_by_time_first():
    early = Snowflake.from_parts(T0, MAX_MACHINE_ID, MAX_SEQUENCE)
    late = Snowflake.from_parts(T0 + 1, 0, 0)
    assert early < late


@given(
    timestamp=st.integers(EPOCH_MS, LAST_MS),
    machine=st.integers(0, MAX_MACHINE_ID),
    sequence=st.integers(0, MAX_SEQUENCE),
)
def test_parts_round_trip(timestamp, machine, sequence):
    flake = Snowflake.from_parts(timestamp, machine, sequence)
    assert 0 <= flake.value < 2**63
    assert (flake.timestamp_ms, flake.machine_id, flake.sequence) == (
        timestamp,
        machine,
        sequence,
    )
    assert Snowflake(int(flake)) == flake


@pytest.mark.parametrize(
    ("parts", "error", "message"),
    [
        ((EPOCH_MS - 1, 0, 0), ValueError, "timestamp_ms must be in"),
        ((LAST_MS + 1, 0, 0), ValueError, "timestamp_ms must be in"),
        ((T0, -1, 0), ValueError, "machine_id must be in 0..1023, got -1"),
        ((T0, 1024, 0), ValueError, "machine_id must be in 0..1023"),
        ((T0, 0, 4096), ValueError, "sequence must be in 0..4095, got 4096"),
        ((T0, 0, -1), ValueError, "sequence must be in 0..4095"),
        ((float(T0), 0, 0), TypeError, "timestamp_ms must be an int, got float"),
        ((T0, True, 0), TypeError, "machine_id must be an int, got bool"),
    ],
)
def test_from_parts_validates(parts, error, message):
    with pytest.raises(error, match=message):
        Snowflake.from_parts(*parts)


@pytest.mark.parametrize("value", [-1, 2**63])
def test_value_must_fit_63_bits(value):
    with pytest.raises(ValueError, match="snowflake value must be in"):
        Snowflake(value)


def test_value_must_be_an_int():
    with pytest.raises(TypeError, match="snowflake value must be an int"):
        Snowflake("12")  # type: ignore[arg-type]


# --------------------------------------------------------------------------
# Generator


def decode(value: int) -> tuple[int, int, int]:
    flake = Snowflake(value)
    return flake.timestamp_ms, flake.machine_id, flake.sequence


def test_first_ids():
    ids = SnowflakeGenerator(5)
    assert decode(ids.next_id(T0)) == (T0, 5, 0)
    assert decode(ids.next_id(T0)) == (T0, 5, 1)
    assert decode(ids.next_id(T0 + 3)) == (T0 + 3, 5, 0)


def test_the_clock_going_backwards_keeps_the_last_millisecond():
    ids = SnowflakeGenerator(1)
    ids.next_id(T0 + 10)
    assert decode(ids.next_id(T0)) == (T0 + 10, 1, 1)
    assert decode(ids.next_id(T0 + 5)) == (T0 + 10, 1, 2)


def test_4096_ids_in_one_millisecond_borrow_the_next():
    ids = SnowflakeGenerator(2)
    values = [ids.next_id(T0) for _ in range(4096)]
    assert decode(values[-1]) == (T0, 2, 4095)
    assert decode(ids.next_id(T0)) == (T0 + 1, 2, 0)
    # The real clock reaching the borrowed millisecond continues from it.
    assert decode(ids.next_id(T0 + 1)) == (T0 + 1, 2, 1)


def test_machine_id_is_settable_and_validated():
    ids = SnowflakeGenerator(0)
    assert ids.machine_id == 0
    ids.machine_id = 1023
    assert ids.machine_id == 1023
    assert decode(ids.next_id(T0)) == (T0, 1023, 0)
    bad_values: list[tuple[object, type[Exception]]] = [
        (1024, ValueError),
        (-1, ValueError),
        ("3", TypeError),
    ]
    for bad, error in bad_values:
        with pytest.raises(error, match="machine_id"):
            ids.machine_id = bad  # type: ignore[assignment]
    assert ids.machine_id == 1023
    with pytest.raises(ValueError, match="machine_id"):
        SnowflakeGenerator(2000)


def test_a_lower_machine_id_moves_to_a_fresh_millisecond():
    ids = SnowflakeGenerator(9)
    first = ids.next_id(T0)
    ids.machine_id = 4
    second = ids.next_id(T0)
    assert second > first
    assert decode(second) == (T0 + 1, 4, 0)


def test_setting_the_same_machine_id_changes_nothing():
    ids = SnowflakeGenerator(9)
    ids.next_id(T0)
    ids.machine_id = 9
    assert decode(ids.next_id(T0)) == (T0, 9, 1)


def test_timestamps_before_the_epoch_are_refused():
    with pytest.raises(ValueError, match="before the snowflake epoch"):
        SnowflakeGenerator(0).next_id(EPOCH_MS - 1)


def test_now_ms_must_be_an_int():
    with pytest.raises(TypeError, match="now_ms must be an int, got float"):
        SnowflakeGenerator(0).next_id(T0 + 0.5)  # type: ignore[arg-type]


def test_timestamps_run_out_in_2094():
    ids = SnowflakeGenerator(0)
    assert Snowflake(ids.next_id(LAST_MS)).timestamp_ms == LAST_MS
    assert datetime.fromtimestamp(LAST_MS / 1000, UTC).year == 2094
    with pytest.raises(ValueError, match="exhausted"):
        ids.next_id(LAST_MS + 1)


def test_borrowing_past_the_last_millisecond_is_refused():
    ids = SnowflakeGenerator(0)
    for _ in range(4096):
        ids.next_id(LAST_MS)
    with pytest.raises(ValueError, match="exhausted"):
        ids.next_id(LAST_MS)


steps = st.one_of(
    # (kind, argument): a clock reading, a burst at one reading, or a new
    # machine id.
    st.tuples(st.just("now"), st.integers(-5_000, 5_000)),
    st.tuples(st.just("burst"), st.integers(1, 5_000)),
    st.tuples(st.just("machine"), st.integers(0, MAX_MACHINE_ID)),
)


@given(
    machine=st.integers(0, MAX_MACHINE_ID),
    start=st.integers(EPOCH_MS, EPOCH_MS + 10**12),
    script=st.lists(steps, max_size=40),
)
def test_ids_strictly_increase_and_carry_the_machine_id(machine, start, script):
    ids = SnowflakeGenerator(machine)
    now = start
    latest = EPOCH_MS
    previous = -1
    made = changes = 0
    for kind, argument in script:
        if kind == "machine":
            changes += ids.machine_id != argument
            ids.machine_id = machine = argument
            continue
        count = 1
        if kind == "now":
            now = max(EPOCH_MS, now + argument)
        else:
            count = argument
        latest = max(latest, now)
        for _ in range(count):
            value = ids.next_id(now)
            made += 1
            flake = Snowflake(value)
            assert value > previous
            assert flake.machine_id == machine
            # Never behind the latest clock reading; ahead of it only by the
            # milliseconds borrowed (one per 4096 ids or machine change).
            assert latest <= flake.timestamp_ms <= latest + made // 4096 + changes
            previous = value
