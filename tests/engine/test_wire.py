"""The runtime's envelope shapes (`trio_cluster._engine._wire.parse`): what a peer may
send, checked before anything in the runtime looks at it."""

from __future__ import annotations

from typing import Any

import pytest

from trio_cluster import MalformedMessageError
from trio_cluster._engine._wire import Kind, Mode, address_fields, address_from, parse

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
        ([2, True, b"x"], "field 1: unexpected bool"),
        ([2, 7, "text"], "field 2: unexpected str"),
        ([8, 1, "Counter", "c", "default", 3, 1], "field 6: unexpected int"),
        ([2, 7.0, b"x"], "field 1: unexpected float"),
        ([1, 7, 0, "C", "c", "default", 3, "h", b"", "soon"], "field 9"),
        # Stream counters: items are numbered from 1, counts and limits
        # cannot be negative.
        ([4, 7, 0, b"item"], "field 2: 0 is below 1"),
        ([4, 7, -3, b"item"], "field 2: -3 is below 1"),
        ([4, 7, b"item"], "expected 3 fields, got 2"),
        ([4, 7, 1.0, b"item"], "field 2: unexpected float"),
        ([5, 7, -1, b"end"], "field 2: -1 is below 0"),
        ([6, 7, -(2**63)], "is below 0"),
        ([6, 7, False], "field 2: unexpected bool"),
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
