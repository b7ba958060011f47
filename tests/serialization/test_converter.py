"""The converter (`trio_cluster.serialization._converter`): tagged unions
with explicit tags."""

from __future__ import annotations

import attrs
import msgpack
import pytest

import trio_cluster as tc
from trio_cluster.serialization import make_converter, register_tagged_union
from trio_cluster.serialization._converter import packb

from ..helpers import config


@attrs.frozen
class Cash:
    amount: int


@attrs.frozen
class Card:
    number: str
    amount: int


Payment = Cash | Card


@attrs.frozen
class Pay:
    payment: Payment


class Till(tc.Entity):
    type_name = "Till"

    @tc.rpc
    async def pay(self, msg: Pay) -> str:
        return type(msg.payment).__name__


async def test_tagged_unions_travel_with_explicit_tags(autojump_clock):
    converter = make_converter()
    register_tagged_union(converter, Payment, {Cash: "cash", Card: "card"})
    assert converter.unstructure(Pay(Card("4242", 3)), Pay) == {
        "payment": {"number": "4242", "amount": 3, "_type": "card"}
    }
    async with tc.open_runner(
        entities=[Till], config=config(), converter=converter
    ) as runner:
        assert await runner.client(Till)("t").pay(Pay(Cash(5))) == "Cash"
        assert await runner.client(Till)("t").pay(Pay(Card("1", 2))) == "Card"


def test_tagged_union_needs_every_tag_once():
    converter = make_converter()
    with pytest.raises(tc.EntityDefinitionError, match="no tag given"):
        register_tagged_union(converter, Payment, {Cash: "cash"})
    with pytest.raises(tc.EntityDefinitionError, match="unique"):
        register_tagged_union(converter, Payment, {Cash: "x", Card: "x"})


# `packb`: msgpack.packb with pooled packers.


def test_packb_packs_as_msgpack_does():
    for value in ([0, {"n": 1}], b"\x00" * 70_000, {"a": [1.5, None, True]}, "é"):
        assert packb(value) == msgpack.packb(value)


def test_packb_inside_packb_packs_both_values():
    # A dict subclass runs Python code while it is packed: a value packed
    # there takes another packer, and neither output is mixed up.
    inner: list[bytes] = []

    class Loud(dict):  # type: ignore[type-arg]
        def items(self):
            inner.append(packb(["inner", 1]))
            return super().items()

    outer = packb([1, Loud(k="v"), 2])
    assert inner == [msgpack.packb(["inner", 1])]
    assert msgpack.unpackb(outer) == [1, {"k": "v"}, 2]
    assert packb([3]) == msgpack.packb([3])


def test_packb_after_a_failure_packs_the_next_value_alone():
    with pytest.raises(TypeError):
        packb([1, 2, object()])
    assert packb([4]) == msgpack.packb([4])
