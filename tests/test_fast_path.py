"""Handlers that cannot suspend run in one step, without a cancel scope."""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable

import pytest
import trio
import trio.lowlevel
import trio.testing

import trio_cluster as tc
from trio_cluster._registry import may_suspend

from .helpers import Add, Get, config


async def plain(self: object, msg: object) -> int:
    return 1


async def awaits(self: object, msg: object) -> None:
    await trio.lowlevel.checkpoint()


async def async_with(self: object, msg: trio.Lock) -> None:
    async with msg:
        pass


async def async_for(self: object, msg: trio.MemoryReceiveChannel[int]) -> None:
    async for _ in msg:
        pass


async def comprehension(self: object, msg: trio.MemoryReceiveChannel[int]) -> list[int]:
    return [x async for x in msg]


async def awaits_in_branch(self: object, msg: bool) -> None:
    if msg:
        await trio.lowlevel.checkpoint()


def not_a_coroutine_function(self: object, msg: object) -> Awaitable[None]:
    return awaits(self, msg)


def wrapped(fn: Callable[..., Awaitable[object]]) -> Callable[..., Awaitable[object]]:
    @functools.wraps(fn)
    async def wrapper(*args: object) -> object:
        return await fn(*args)

    return wrapper


@pytest.mark.parametrize(
    ("fn", "expected"),
    [
        (plain, False),
        (awaits, True),
        (async_with, True),
        (async_for, True),
        (comprehension, True),
        (awaits_in_branch, True),
        (not_a_coroutine_function, True),
        (wrapped(plain), True),
        (functools.partial(plain, None), True),
    ],
)
def test_may_suspend(fn: object, expected: bool) -> None:
    assert may_suspend(fn) is expected


class Quick(tc.Entity):
    type_name = "Quick"

    def __init__(self) -> None:
        self.value = 0
        self.address_at_start: tc.EntityAddress | None = None

    async def on_start(self) -> None:
        self.address_at_start = tc.current_entity_address()

    @tc.rpc
    async def add(self, msg: Add) -> int:
        self.value += msg.amount
        return self.value

    @tc.rpc
    async def started_with(self, msg: Get) -> str:
        return str(self.address_at_start)


def test_registry_marks_the_fast_handlers() -> None:
    from trio_cluster._registry import resolve_entity_type
    from trio_cluster.serialization import make_converter

    entity_type = resolve_entity_type(
        Quick, config=tc.ShardingConfig(), converter=make_converter()
    )
    assert not entity_type.handlers["add"].suspends
    assert not entity_type.start_suspends


async def test_fast_handlers_still_checkpoint_and_count(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with tc.open_runner(entities=[Quick], config=config()) as runner:
        ref = runner.client(Quick)("q")
        with trio.testing.assert_checkpoints():
            assert await ref.add(Add(2)) == 2
        assert await ref.started_with(Get()) == str(ref.address)
        with trio.CancelScope() as scope:
            scope.cancel()
            with pytest.raises(trio.Cancelled):
                await ref.add(Add(1))
        assert await ref.add(Add(0)) == 2  # the cancelled call never ran
        assert runner.statistics().messages_handled == 3


async def test_fast_handlers_do_not_starve_other_tasks(
    autojump_clock: trio.testing.MockClock,
) -> None:
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await trio.lowlevel.checkpoint()

    async with tc.open_runner(entities=[Quick], config=config()) as runner:
        ref = runner.client(Quick)("q")
        async with trio.open_nursery() as nursery:
            nursery.start_soon(ticker)
            await trio.lowlevel.checkpoint()
            before = ticks

            for _ in range(100):
                await ref.add(Add(1))
            assert ticks - before >= 90
            nursery.cancel_scope.cancel()
