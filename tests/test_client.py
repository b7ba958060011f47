"""Clients (`trio_cluster._client`): typed handles on entities."""

from __future__ import annotations

import pytest

import trio_cluster as tc

from .helpers import Counter, config


async def test_handle_exposes_id_and_address(autojump_clock):
    async with tc.open_runner(entities=[Counter], config=config()) as runner:
        ref = runner.client(Counter)("x")
        assert ref.id == "x"
        assert ref.address.entity_type == "Counter"
        assert ref.address.shard.group == "default"
        assert 1 <= ref.address.shard.number <= 8
        with pytest.raises(AttributeError, match="no handler 'value'"):
            _ = ref.value
