"""Stream handlers (`trio_cluster._engine._streams`): items in order, alongside
other handlers, early exit, errors."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import trio
import trio.testing

import trio_cluster as tc

from ..helpers import Add, Count, Counter, Get, TooBig, config


async def test_streams_deliver_items_in_order(autojump_clock, serialize):
    async with tc.open_runner(
        entities=[Counter], config=config(serialize_local_calls=serialize)
    ) as runner:
        ref = runner.client(Counter)("a")
        async with ref.count(Count(4)) as items:
            assert [item async for item in items] == [0, 1, 2, 3]


async def test_stream_runs_alongside_other_handlers(autojump_clock):
    async with tc.open_runner(entities=[Counter], config=config()) as runner:
        ref = runner.client(Counter)("a")
        async with ref.count(Count(100)) as items:
            assert await items.__anext__() == 0
            # The entity still answers while its stream is open.
            assert await ref.add(Add(1)) == 1
            assert await items.__anext__() == 1


class Watched(tc.Entity):
    type_name = "Watched"

    def __init__(self) -> None:
        self.closed = False

    @tc.stream
    async def ticks(self, msg: Get) -> AsyncIterator[int]:
        try:
            i = 0
            while True:
                yield i
                i += 1
                await trio.sleep(1)
        finally:
            self.closed = True

    @tc.rpc
    async def closed_yet(self, msg: Get) -> bool:
        return self.closed


async def test_leaving_a_stream_early_interrupts_the_generator(autojump_clock):
    async with tc.open_runner(entities=[Watched], config=config()) as runner:
        ref = runner.client(Watched)("w")
        async with ref.ticks(Get()) as items:
            async for item in items:
                if item == 2:
                    break
        await trio.sleep(0.1)
        assert await ref.closed_yet(Get()) is True


class FailingStream(tc.Entity):
    type_name = "FailingStream"

    @tc.stream(errors=[TooBig])
    async def items(self, msg: Count) -> AsyncIterator[int]:
        yield 1
        if msg.upto > 10:
            raise TooBig(limit=10)
        raise RuntimeError("broken generator")


async def test_stream_errors_reach_the_caller(autojump_clock):
    async with tc.open_runner(entities=[FailingStream], config=config()) as runner:
        ref = runner.client(FailingStream)("f")
        seen: list[int] = []

        async def read(upto: int) -> None:
            async with ref.items(Count(upto)) as items:
                async for item in items:
                    seen.append(item)  # noqa: PERF401 - keep items seen before the error

        with pytest.raises(TooBig):
            await read(20)
        assert seen == [1]
        with pytest.raises(tc.RemoteError, match="broken generator"):
            await read(1)
