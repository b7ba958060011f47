"""`unchanged_structure`: decoding a map of plain field values makes the
object directly, and decides exactly as cattrs' generated hook does."""

from __future__ import annotations

from typing import Any

import attrs
import pytest
from cattrs.gen import make_dict_structure_fn, override
from hypothesis import given, strategies as st

from trio_cluster import MalformedMessageError
from trio_cluster.serialization import Codec, make_converter


@attrs.frozen
class Single:
    amount: int


@attrs.frozen
class Several:
    x: int
    y: float
    label: str | None = None
    flag: bool = False


@attrs.frozen(cache_hash=True)
class Hashed:
    x: int


@attrs.frozen
class Checked:
    x: int = attrs.field(validator=attrs.validators.ge(0))


@attrs.frozen
class Swapped:
    a: int
    b: int


@attrs.frozen
class Private:
    _x: int


def _codec(tp: Any) -> Codec[Any]:
    converter = make_converter()
    converter.register_structure_hook(
        Swapped,
        make_dict_structure_fn(
            Swapped, converter, a=override(rename="b"), b=override(rename="a")
        ),
    )
    return Codec(converter, tp, "test")


def _cattrs(tp: Any, primitive: object) -> object:
    """What cattrs' own hook makes of ``primitive`` (or the problems it
    reports)."""
    converter = make_converter()
    hook = converter.get_structure_hook(tp)
    try:
        return hook(primitive, tp)
    except Exception as exc:
        return type(exc)


def test_plain_classes_take_the_fast_path() -> None:
    # A cattrs release that words its generated hooks otherwise turns the
    # fast path off (safe, but slower): this says so.
    assert _codec(Single)._structure.__name__ == "structure_one"
    assert _codec(Hashed)._structure.__name__ == "structure_one"
    assert _codec(Checked)._structure.__name__ == "structure_one"
    assert _codec(Several)._structure.__name__ == "structure"


@pytest.mark.parametrize("tp", [Swapped, Private])
def test_renamed_keys_keep_cattrs_hook(tp: Any) -> None:
    codec = _codec(tp)
    assert codec._structure.__code__.co_filename.startswith("<cattrs generated")


def test_a_swapping_rename_decodes_as_cattrs_says() -> None:
    assert _codec(Swapped).structure({"a": 1, "b": 2}) == Swapped(a=2, b=1)


def test_made_objects_equal_cattrs_ones_and_hash() -> None:
    value = _codec(Hashed).structure({"x": 3})
    assert value == Hashed(3)
    assert hash(value) == hash(Hashed(3))
    assert _codec(Several).structure(
        {"x": 1, "y": 2.0, "label": None, "flag": True}
    ) == (Several(1, 2.0, None, True))


@pytest.mark.parametrize(
    "primitive",
    [{"amount": True}, {"amount": 1.0}, {}, {"amount": 1, "x": 2}, {"x": 1}, [1], None],
)
def test_what_cattrs_refuses_is_refused(primitive: object) -> None:
    with pytest.raises(MalformedMessageError):
        _codec(Single).structure(primitive)


def test_a_validator_refuses_with_cattrs_words() -> None:
    with pytest.raises(MalformedMessageError) as fast:
        _codec(Checked).structure({"x": -1})
    assert fast.value.problems == ["invalid value @ $"]


_VALUES = st.one_of(
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=False),
    st.text(max_size=5),
    st.booleans(),
    st.none(),
    st.binary(max_size=3),
)


@given(
    st.dictionaries(
        st.sampled_from(["x", "y", "label", "flag", "other"]), _VALUES, max_size=5
    )
)
def test_several_decodes_as_cattrs_does(primitive: dict[str, object]) -> None:
    expected = _cattrs(Several, primitive)
    try:
        got: object = _codec(Several).structure(primitive)
    except MalformedMessageError:
        assert isinstance(expected, type)
        return
    assert got == expected
    assert type(got.y) is type(expected.y)  # type: ignore[attr-defined]
