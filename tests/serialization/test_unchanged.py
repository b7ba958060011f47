"""Values passed on uncopied by serialized local calls (`_unchanged`)."""

from __future__ import annotations

from typing import Any, ClassVar

import attrs
import cattrs
import msgpack
import pytest
from cattrs.gen import make_dict_structure_fn, override
from hypothesis import given, strategies as st

import trio_cluster as tc
from trio_cluster.serialization import Codec, make_converter

from ..helpers import config


@attrs.frozen
class Point:
    x: int
    y: float
    label: str | None = None
    flag: bool = False
    raw: bytes = b""


@attrs.frozen
class Line:
    start: Point
    end: Point


@attrs.frozen
class Single:
    x: int


@attrs.frozen
class DerivedSingle(Single):
    pass


@attrs.define
class Mutable:
    x: int


@attrs.frozen
class Derived(Point):
    pass


@attrs.frozen
class Hidden:
    x: int
    cached: int = attrs.field(init=False, default=0)


@attrs.frozen
class Converted:
    x: int = attrs.field(converter=lambda v: v + 1)


@attrs.frozen
class Listing:
    items: list[int]


def codec(tp: Any, converter: cattrs.Converter | None = None) -> Codec[Any]:
    return Codec(converter or make_converter(), tp, "test")


@pytest.mark.parametrize(
    ("tp", "value"),
    [
        (int, 7),
        (int, -(2**63)),
        (int, 2**64 - 1),
        (float, 1.5),
        (bool, True),
        (str, "ascii"),
        (bytes, b"\x00\xff"),
        (None, None),
        (int | None, None),
        (int | None, 3),
        (Point, Point(1, 2.0, "a", True, b"z")),
        (Line, Line(Point(1, 2.0), Point(3, 4.0))),
        (Single, Single(-5)),
    ],
)
def test_immutable_values_that_decode_to_themselves_are_not_copied(tp, value):
    c = codec(tp)
    size = c.size_if_unchanged(value)
    assert size is not None
    encoded = c.encode(value)
    assert c.decode(encoded) == value
    assert len(encoded) <= size


@pytest.mark.parametrize(
    ("tp", "value"),
    [
        (int, 2**64),  # msgpack cannot encode it
        (int, -(2**63) - 1),
        (int, True),  # a bool where an int is declared
        (float, 1),  # decodes as 1.0
        (str, "caf\u00e9"),  # not ASCII: may hold a lone surrogate
        (str, "\ud800"),
        (Point, Derived(1, 2.0)),  # a subclass
        (Single, DerivedSingle(1)),  # the same, for a one-field class
        (Single, Single(2**64)),
        (Single, Single(True)),
        (Point, Point(1, 2)),  # an int in a float field
        (Mutable, Mutable(1)),
        (Hidden, Hidden(1)),
        (Converted, Converted(1)),  # decoding would convert it again
        (Listing, Listing([1])),
        (list[int], [1]),
        (int | str, 1),
    ],
)
def test_other_values_are_copied(tp, value):
    assert codec(tp).size_if_unchanged(value) is None


def test_a_class_with_its_own_hooks_is_copied():
    converter = make_converter()
    converter.register_structure_hook(Point, lambda o, _: Point(o["x"] + 1, o["y"]))
    assert codec(Point, converter).size_if_unchanged(Point(1, 2.0)) is None


def test_a_field_hook_override_is_copied():
    converter = make_converter()
    converter.register_structure_hook(
        Point,
        make_dict_structure_fn(
            Point, converter, x=override(struct_hook=lambda v, _: v * 2)
        ),
    )
    assert codec(Point, converter).size_if_unchanged(Point(1, 2.0)) is None


def test_custom_scalar_hooks_turn_it_off():
    converter = make_converter()
    converter.register_structure_hook(int, lambda v, _: int(v))
    assert codec(int, converter).size_if_unchanged(1) is None
    assert codec(Point, converter).size_if_unchanged(Point(1, 2.0)) is None


points = st.builds(
    Point,
    st.integers(min_value=-(2**63), max_value=2**64 - 1),
    st.floats(allow_nan=False),
    st.none() | st.text(),
    st.booleans(),
    st.binary(),
)


@given(
    st.one_of(
        points,
        st.builds(Line, points, points),
        st.builds(Single, st.integers(min_value=-(2**63), max_value=2**64 - 1)),
    )
)
def test_the_size_bounds_the_encoding_and_the_round_trip_is_the_identity(value):
    c = codec(type(value))
    size = c.size_if_unchanged(value)
    encoded = c.encode(value)
    if size is not None:
        assert c.decode(encoded) == value
        assert len(encoded) <= size
        assert msgpack.unpackb(encoded) is not None


# ----------------------------------------------------------------------
# Local calls


class Keeper(tc.Entity):
    type_name = "Keeper"
    seen: ClassVar[list[object]] = []

    @tc.rpc
    async def keep(self, msg: Point) -> Point:
        Keeper.seen.append(msg)
        return msg

    @tc.rpc
    async def keep_mutable(self, msg: Mutable) -> Mutable:
        Keeper.seen.append(msg)
        return msg


async def test_a_serialized_local_call_passes_an_unchanged_value_uncopied(
    autojump_clock,
):
    Keeper.seen = []
    async with tc.open_runner(entities=[Keeper], config=config()) as runner:
        keeper = runner.client(Keeper)("a")
        point = Point(1, 2.0, "a")
        assert await keeper.keep(point) is point
        assert Keeper.seen == [point]
        assert Keeper.seen[0] is point

        mutable = Mutable(1)
        back = await keeper.keep_mutable(mutable)
        assert back == mutable
        assert back is not mutable
        assert Keeper.seen[1] is not mutable


async def test_an_unchanged_value_over_the_size_limit_is_still_refused(
    autojump_clock,
):
    async with tc.open_runner(
        entities=[Keeper], config=config(max_message_size=64)
    ) as runner:
        keeper = runner.client(Keeper)("a")
        assert await keeper.keep(Point(1, 2.0, "short")) == Point(1, 2.0, "short")
        with pytest.raises(tc.MessageTooLargeError):
            await keeper.keep(Point(1, 2.0, "x" * 100))
