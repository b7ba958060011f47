"""Context lookups (`trio_cluster._context`): the current runner and the
current entity."""

from __future__ import annotations

import pytest

import trio_cluster as tc

from .helpers import Add, Counter, Get, Tracked, config

pytestmark = pytest.mark.usefixtures("clear_tracked_log")


async def test_on_start_sees_id_and_address(autojump_clock):
    async with tc.open_runner(entities=[Tracked], config=config()) as runner:
        assert await runner.client(Tracked)("a").touch(Get()) == "a"
        assert len(Tracked.log) == 1
        assert Tracked.log[0].startswith("start a Tracked/a@default:")


async def test_current_runner_inside_handlers(autojump_clock):
    class Asker(tc.Entity):
        type_name = "Asker"

        @tc.rpc
        async def ask(self, msg: Add) -> int:
            other = tc.current_runner().client(Counter)("x")
            return await other.add(msg)

    async with tc.open_runner(entities=[Asker, Counter], config=config()) as runner:
        assert await runner.client(Asker)("q").ask(Add(3)) == 3
    with pytest.raises(RuntimeError, match="no current runner"):
        tc.current_runner()
