"""Clients (`trio_cluster._client`): typed handles on entities."""

from __future__ import annotations

from typing import Any

import attrs
import pytest

import trio_cluster as tc
from trio_cluster._client import EntityRef
from trio_cluster._core._addresses import EntityAddress

from .helpers import Add, Count, Counter, Get, config
from .memory_cluster import Tally


async def test_handle_exposes_id_and_address(autojump_clock):
    async with tc.open_runner(entities=[Counter], config=config()) as runner:
        ref = runner.client(Counter)("x")
        assert ref.id == "x"
        assert ref.address.entity_type == "Counter"
        assert ref.address.shard.group == "default"
        assert 1 <= ref.address.shard.number <= 8
        with pytest.raises(AttributeError, match="no handler 'value'"):
            _ = ref.value


async def test_a_client_of_a_type_not_hosted_here_does_not_host_it(autojump_clock):
    # Regression: `runner.client(Tally)` made this runner host Tally: calls
    # to it ran here (and requests from other runners would have too).
    async with tc.open_runner(entities=[Counter], config=config()) as runner:
        await runner.wait_shards_acquired()
        tally = runner.client(Tally)("t")  # served here: this runner has every shard
        with pytest.raises(tc.UnknownEntityTypeError, match=r"cluster\.Tally"):
            await tally.add(Add(1))
        with pytest.raises(tc.UnknownEntityTypeError):
            await tally.add.discard(Add(1))
        with pytest.raises(tc.UnknownEntityTypeError):
            async with tally.count(Count(1)) as items:
                [item async for item in items]
        # Persisted: stored, then answered by the owner (this runner), which
        # does not host the type.
        with pytest.raises(tc.UnknownEntityTypeError):
            await tally.add_persisted(Add(1))
        assert "cluster.Tally" not in runner.statistics().entities_by_type
        # Its own types still run.
        assert await runner.client(Counter)("c").add(Add(2)) == 2


@attrs.frozen
class Ping:
    n: int


class Shadowed(tc.Entity):
    """Handlers named like a handle's own attributes."""

    type_name = "Shadowed"

    @tc.rpc
    async def address(self, msg: Ping) -> int:  # type: ignore[override]
        return msg.n

    @tc.rpc  # type: ignore[type-var]
    async def echo(self, msg: Ping) -> int:
        return msg.n


async def test_a_handle_finds_its_handlers_without_getattr(autojump_clock, monkeypatch):
    # Handlers are attributes of the handle's class: on Python 3.11 a lookup
    # that falls through to `__getattr__` first builds an AttributeError.
    async with tc.open_runner(entities=[Counter], config=config()) as runner:
        ref = runner.client(Counter)("x")
        handle: object = ref

        def no_getattr(self: object, name: str) -> None:
            raise AssertionError(f"__getattr__ asked for {name}")

        monkeypatch.setattr(EntityRef, "__getattr__", no_getattr)
        assert isinstance(handle, EntityRef)
        assert await ref.add(Add(2)) == 2
        await ref.add.discard(Add(3))
        assert await ref.get(Get()) == 5


async def test_a_handle_keeps_its_bound_handlers(autojump_clock):
    async with tc.open_runner(entities=[Counter], config=config()) as runner:
        client = runner.client(Counter)
        ref, other = client("x"), client("y")
        assert ref.add is ref.add
        assert ref.add is not other.add
        assert ref.add is not ref.get  # type: ignore[comparison-overlap]
        assert await ref.add(Add(1)) == 1
        assert await other.add(Add(5)) == 5
        assert await ref.get(Get()) == 1


async def test_handle_attributes_keep_their_meaning_over_handler_names(
    autojump_clock,
):
    async with tc.open_runner(entities=[Shadowed], config=config()) as runner:
        ref: Any = runner.client(Shadowed)("s")
        assert isinstance(ref.address, EntityAddress)
        assert ref.id == "s"
        assert await ref.echo(Ping(4)) == 4
        with pytest.raises(AttributeError, match="no handler 'nothing'"):
            _ = ref.nothing


async def test_handles_share_the_shard_ids_of_the_served_shards(autojump_clock):
    # A dict lookup with the very key object skips `ShardId.__eq__`: every
    # local call looks its shard up among the served ones.
    async with tc.open_runner(entities=[Counter], config=config()) as runner:
        early = runner.client(Counter)("early")  # before any shard is served
        await runner.wait_shards_acquired()
        late = runner.client(Counter)("late")
        served = runner._parts.sharding.table.hosts
        for ref in (early, late):
            shard = ref.address.shard
            assert any(key is shard for key in served)
        assert await early.add(Add(1)) == 1
