"""Clients (`trio_cluster._client`): typed handles on entities."""

from __future__ import annotations

import pytest

import trio_cluster as tc

from .helpers import Add, Count, Counter, config
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
