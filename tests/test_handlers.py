"""The ``@rpc`` and ``@stream`` decorators (`trio_cluster._handlers`): their
options, and handlers called from inside the entity."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

import trio_cluster as tc

from .helpers import Add, Quick, config


def test_persisted_only_options():
    with pytest.raises(tc.EntityDefinitionError, match="persisted=True"):
        tc.rpc(primary_key=lambda m: "k")
    with pytest.raises(tc.EntityDefinitionError, match="persisted=True"):
        tc.rpc(deliver_at=lambda m: 0.0)
    with pytest.raises(tc.EntityDefinitionError, match="primary_key must be"):
        tc.rpc(persisted=True, primary_key="tx_id")  # type: ignore[call-overload]


def test_declared_errors_must_be_attrs_exceptions():
    class Plain(Exception):
        pass

    with pytest.raises(tc.EntityDefinitionError, match="must be an attrs class"):
        tc.rpc(errors=[Plain])
    with pytest.raises(tc.EntityDefinitionError, match="Exception classes"):
        tc.rpc(errors=[int])  # type: ignore[list-item]


def test_wire_name_must_be_sane():
    with pytest.raises(tc.EntityDefinitionError, match="wire name"):

        class BadName(tc.Entity):
            type_name = "BadName"

            @tc.rpc(name="has space")
            async def f(self, msg: Add) -> int:
                return 1


def test_transactional_needs_persisted():
    with pytest.raises(
        tc.EntityDefinitionError, match="transactional=True needs persisted=True"
    ):
        tc.rpc(transactional=True)


class Selfish(Quick):
    """`Quick` (``add`` keeps a running total), plus handlers that message
    and call the entity itself."""

    type_name = "Selfish"

    @tc.rpc
    async def add_later(self, msg: Add) -> None:
        # A message to myself, queued behind this handler.
        await self.add.discard(msg)

    @tc.rpc
    async def add_now(self, msg: Add) -> int:
        return await self.add(msg)  # a plain method call

    @tc.stream
    async def numbers(self, msg: Add) -> AsyncIterator[int]:
        for i in range(msg.amount):
            yield i

    @tc.rpc
    async def sum_of_numbers(self, msg: Add) -> int:
        async with self.numbers(msg) as numbers:
            return sum([n async for n in numbers])


async def test_entities_can_message_and_call_themselves(autojump_clock):
    async with tc.open_runner(entities=[Selfish], config=config()) as runner:
        ref = runner.client(Selfish)("me")
        await ref.add_later(Add(5))
        assert await ref.add_now(Add(1)) == 6
        assert await ref.sum_of_numbers(Add(4)) == 6
