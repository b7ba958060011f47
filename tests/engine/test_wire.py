"""The runtime's envelope shapes (`trio_cluster._engine._wire.parse`): what a peer may
send, checked before anything in the runtime looks at it."""

from __future__ import annotations

import math
from typing import Any

import pytest
from hypothesis import given, settings, strategies as st

from trio_cluster import MalformedMessageError
from trio_cluster._engine._wire import (
    MAX_REASON_LENGTH,
    MAX_SECONDS_LEFT,
    Kind,
    Mode,
    _checked,
    _plain,
    address_fields,
    address_from,
    parse,
)

REQUEST: list[Any] = [
    Kind.REQUEST,
    7,
    Mode.CALL,
    "Counter",
    "counter-1",
    "default",
    3,
    "increment",
    b"\x81",
    1.5,
]


def with_field(envelope: list[Any], index: int, value: Any) -> list[Any]:
    changed = list(envelope)
    changed[index] = value
    return changed


@pytest.mark.parametrize(
    "envelope",
    [
        # Plain ints and bytes, as msgpack decodes them (not the enums).
        [int(item) if isinstance(item, int) else item for item in REQUEST],
        with_field([int(x) if isinstance(x, int) else x for x in REQUEST], 9, None),
        with_field([int(x) if isinstance(x, int) else x for x in REQUEST], 9, 2),
        [2, 7, b"reply"],
        [4, 7, 1, b"item"],
        [5, 7, 0, b"end"],
        [6, 7, 0],
        [6, 7, 2**64 - 1],
        [8, 1, "Counter", "c", "default", 3, True],
        [10, "name", b""],
        # The bounds themselves are well formed.
        [1, 0, 2, "T" * 150, "i" * 255, "g" * 64, 65536, "h" * 100, b"", 0.0],
        [1, 2**64 - 1, 0, "T", "i", "g", 1, "h", b"", MAX_SECONDS_LEFT],
        [3, 7, ""],
        [3, 7, "r" * MAX_REASON_LENGTH],
        [4, 7, 2**64 - 1, b""],
        [8, 2**63 - 1, "T" * 150, "i" * 255, "g" * 64, 65536, False],
        [9, 0, b""],
        [10, "n" * 200, b""],
    ],
)
def test_well_formed_envelopes_parse(envelope):
    kind, fields = parse(envelope)
    assert kind == envelope[0]
    assert fields == envelope[1:]


@pytest.mark.parametrize(
    ("envelope", "problem"),
    [
        ([], "missing kind"),
        (["1"], "missing kind"),
        ([True, 1], "missing kind"),
        ([99], "unknown kind 99"),
        ([2, 7], "expected 2 fields, got 1"),
        ([2, True, b"x"], "field 1 (call id): unexpected bool"),
        ([2, 7, "text"], "field 2 (payload): unexpected str"),
        (
            [8, 1, "Counter", "c", "default", 3, 1],
            "field 6 (wants reply): unexpected int",
        ),
        ([2, 7.0, b"x"], "field 1 (call id): unexpected float"),
        (
            [1, 7, 0, "C", "c", "default", 3, "h", b"", "soon"],
            "field 9 (seconds left): unexpected str",
        ),
        # Stream counters: items are numbered from 1, counts and limits
        # cannot be negative.
        ([4, 7, 0, b"item"], "field 2 (item number): 0 is below 1"),
        ([4, 7, -3, b"item"], "field 2 (item number): -3 is below 1"),
        ([4, 7, b"item"], "expected 3 fields, got 2"),
        ([4, 7, 1.0, b"item"], "field 2 (item number): unexpected float"),
        ([5, 7, -1, b"end"], "field 2 (item count): -1 is below 0"),
        ([6, 7, -(2**63)], "is below 0"),
        ([6, 7, False], "field 2 (credit limit): unexpected bool"),
    ],
)
def test_malformed_envelopes_are_refused(envelope, problem):
    with pytest.raises(MalformedMessageError) as caught:
        parse(envelope)
    assert problem in caught.value.problems[0]


def test_addresses_are_rebuilt_and_validated():
    fields = ["Counter", "counter-1", "default", 3]
    address = address_from(fields)
    assert address_fields(address) == fields
    assert address_from(list(fields)) == address
    with pytest.raises(MalformedMessageError, match="entity address"):
        address_from(["Counter", "", "default", 3])


# One well-formed envelope of each kind (plain values, as msgpack decodes
# them), and what a hostile peer may put in each of its fields instead.
WELL_FORMED: dict[Kind, list[Any]] = {
    Kind.REQUEST: [1, 7, 0, "Counter", "c-1", "default", 3, "add", b"\x81", 1.5],
    Kind.REPLY: [2, 7, b"reply"],
    Kind.NOT_DELIVERED: [3, 7, "not here"],
    Kind.STREAM_ITEM: [4, 7, 1, b"item"],
    Kind.STREAM_END: [5, 7, 0, b"end"],
    Kind.STREAM_CREDIT: [6, 7, 4],
    Kind.INTERRUPT: [7, 7],
    Kind.PERSISTED: [8, 1, "Counter", "c-1", "default", 3, True],
    Kind.PERSISTED_REPLY: [9, 1, b"reply"],
    Kind.BROADCAST: [10, "reload", b"\x80"],
}
NOT_INTS = [True, False, 1.0, math.nan, math.inf, None, "1", b"1", [1], {1: 1}]
U64 = [*NOT_INTS, -1, -(2**63), 2**64, 2**100]
NOT_TEXT = [None, 1, 1.5, True, b"text", ["t"], {"t": 1}]
NOT_BYTES = [None, 1, 1.5, True, "text", [b"x"], {b"x": 1}]
HOSTILE: dict[Kind, list[list[Any]]] = {
    Kind.REQUEST: [
        U64,  # call id
        [*U64, 3, 4, 255],  # mode
        [*NOT_TEXT, "", "T" * 151],  # entity type
        [*NOT_TEXT, "", "i" * 256],  # entity id
        [*NOT_TEXT, "", "g" * 65],  # shard group
        [*NOT_INTS, 0, -1, 65537, 2**64],  # shard number
        [*NOT_TEXT, "", "h" * 101],  # handler tag
        NOT_BYTES,  # payload
        [  # seconds left
            math.nan,
            -math.nan,
            math.inf,
            -math.inf,
            -1,
            -1.0,
            -1e-9,
            MAX_SECONDS_LEFT * 2,
            1e300,
            2**64,
            True,
            False,
            "1",
            b"1",
            [1.0],
        ],
    ],
    Kind.REPLY: [U64, NOT_BYTES],
    Kind.NOT_DELIVERED: [U64, [*NOT_TEXT, "r" * (MAX_REASON_LENGTH + 1)]],
    Kind.STREAM_ITEM: [U64, [*U64, 0], NOT_BYTES],
    Kind.STREAM_END: [U64, U64, NOT_BYTES],
    Kind.STREAM_CREDIT: [U64, U64],
    Kind.INTERRUPT: [U64],
    Kind.PERSISTED: [
        [*NOT_INTS, -1, 2**63],  # request id (a storage bigint)
        [*NOT_TEXT, "", "T" * 151],
        [*NOT_TEXT, "", "i" * 256],
        [*NOT_TEXT, "", "g" * 65],
        [*NOT_INTS, 0, 65537],
        [1, 0, None, "yes", 1.0, b""],  # wants reply
    ],
    Kind.PERSISTED_REPLY: [[*NOT_INTS, -1, 2**63], NOT_BYTES],
    Kind.BROADCAST: [[*NOT_TEXT, "", "n" * 201], NOT_BYTES],
}


def hostile_envelopes() -> list[Any]:
    cases = []
    for kind, fields in HOSTILE.items():
        assert len(fields) == len(WELL_FORMED[kind]) - 1, kind
        for index, values in enumerate(fields, start=1):
            for value in values:
                envelope = with_field(WELL_FORMED[kind], index, value)
                label = f"{kind.name}-field{index}-{value!r:.20}"
                cases.append(pytest.param(envelope, index, id=label))
    return cases


@pytest.mark.parametrize("envelope", list(WELL_FORMED.values()))
def test_the_table_starts_from_well_formed_envelopes(envelope):
    assert parse(envelope)[1] == envelope[1:]


@pytest.mark.parametrize(("envelope", "index"), hostile_envelopes())
def test_every_hostile_field_value_is_malformed(envelope, index):
    # Issue 12, item 1: each field is checked where it arrives, and the
    # error is always MalformedMessageError (the dispatcher drops the
    # envelope), never another exception or a value the runtime chokes on.
    with pytest.raises(MalformedMessageError) as caught:
        parse(envelope)
    assert caught.value.problems[0].startswith(f"field {index} (")


# The optional metadata field of REQUEST (the call metadata, sent only when
# the call carries some).
TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


@pytest.mark.parametrize(
    "metadata",
    [
        {},
        {"tenant": "acme"},
        {"tenant": "acme", "traceparent": TRACEPARENT, "tracestate": "v=1"},
        {f"k{i:02}": "v" * 120 for i in range(32)},  # at the caller's limits
    ],
)
def test_a_request_may_carry_metadata(metadata):
    envelope = [*WELL_FORMED[Kind.REQUEST], metadata]
    kind, fields = parse(envelope)
    assert kind is Kind.REQUEST
    assert fields[9] == metadata


@pytest.mark.parametrize(
    ("metadata", "problem"),
    [
        (None, "unexpected NoneType"),
        ("k=v", "unexpected str"),
        ([["k", "v"]], "unexpected list"),
        ({1: "v"}, "keys must be str, got int"),
        ({b"k": "v"}, "keys must be str, got bytes"),
        ({"k": 1}, "the value of 'k' must be a str, got int"),
        ({"k": None}, "the value of 'k' must be a str, got NoneType"),
        ({"k": ["v"]}, "must be a str, got list"),
        ({"": "v"}, "keys must not be empty"),
        ({"k" * 65: "v"}, "65 characters, over 64"),
        ({"k": "v" * 1025}, "1025 characters, over 1024"),
        ({"k": "a\x00b"}, "NUL"),
        ({f"k{i}": "v" for i in range(35)}, "35 entries, over 34"),
        ({f"k{i}": "v" * 1000 for i in range(6)}, "over 5120"),
    ],
)
def test_bad_metadata_makes_a_request_malformed(metadata, problem):
    with pytest.raises(MalformedMessageError) as caught:
        parse([*WELL_FORMED[Kind.REQUEST], metadata])
    assert caught.value.problems[0].startswith("field 10 (metadata): ")
    assert problem in caught.value.problems[0]


def test_a_request_has_nine_or_ten_fields():
    with pytest.raises(MalformedMessageError, match="expected 9 to 10 fields, got 8"):
        parse(WELL_FORMED[Kind.REQUEST][:-1])
    with pytest.raises(MalformedMessageError, match="expected 9 to 10 fields, got 11"):
        parse([*WELL_FORMED[Kind.REQUEST], {}, {}])
    # Other kinds have no optional field.
    with pytest.raises(MalformedMessageError, match="expected 2 fields, got 3"):
        parse([*WELL_FORMED[Kind.REPLY], {}])


# The short check of the two envelopes of every remote call (`_plain`):
# what it accepts, the field loop accepts too, with the same fields.


def test_the_envelopes_of_a_call_take_the_short_check():
    assert _plain(WELL_FORMED[Kind.REQUEST])
    assert _plain(with_field(WELL_FORMED[Kind.REQUEST], 9, None))
    assert _plain(with_field(WELL_FORMED[Kind.REQUEST], 9, 3))
    assert _plain(WELL_FORMED[Kind.REPLY])
    # Metadata, other kinds and the runtime's own enums (never on the wire):
    # field by field.
    assert not _plain([*WELL_FORMED[Kind.REQUEST], {"k": "v"}])
    assert not _plain(WELL_FORMED[Kind.STREAM_END])
    assert not _plain([Kind.REPLY, 7, b"reply"])


@pytest.mark.parametrize(("envelope", "index"), hostile_envelopes())
def test_the_short_check_refuses_every_hostile_field_value(envelope, index):
    assert not _plain(envelope)


_CALL_FIELD_VALUES = st.sampled_from(
    [
        *{repr(v): v for values in HOSTILE[Kind.REQUEST] for v in values}.values(),
        *WELL_FORMED[Kind.REQUEST],
        *WELL_FORMED[Kind.REPLY],
        0,
        1,
        2,
        2**64 - 1,
        65536,
        MAX_SECONDS_LEFT,
        "",
        "x" * 255,
    ]
)


@settings(max_examples=3000, deadline=None)
@given(
    st.sampled_from([Kind.REQUEST, Kind.REPLY]),
    st.booleans(),
    st.lists(st.tuples(st.integers(1, 9), _CALL_FIELD_VALUES), max_size=3),
)
def test_the_short_check_accepts_only_what_the_field_loop_accepts(
    kind, plain_kind, changes
):
    envelope = list(WELL_FORMED[kind])
    for index, value in changes:
        if index < len(envelope):
            envelope[index] = value
    if not plain_kind:
        envelope[0] = Kind(envelope[0])  # an int subclass: never on the wire
    if _plain(envelope):
        assert _checked(envelope) == (kind, envelope[1:])
        assert parse(envelope) == (kind, envelope[1:])
