"""The converter (`trio_cluster.serialization._converter`): tagged unions
with explicit tags."""

from __future__ import annotations

import attrs
import pytest

import trio_cluster as tc
from trio_cluster.serialization import make_converter, register_tagged_union

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
