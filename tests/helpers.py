"""Entity classes and helpers shared by the runtime tests."""

from __future__ import annotations

from collections.abc import AsyncIterator

import attrs
import trio

import trio_cluster as tc


@attrs.frozen
class Add:
    amount: int


@attrs.frozen
class Get:
    pass


@attrs.frozen
class Sleep:
    seconds: float


@attrs.frozen
class Boom:
    text: str


@attrs.frozen
class Count:
    upto: int


@attrs.define(eq=False, kw_only=True)
class TooBig(Exception):
    limit: int


class Counter(tc.Entity):
    type_name = "Counter"
    max_idle = 30.0

    def __init__(self) -> None:
        self.value = 0
        self.started = 0
        self.events: list[str] = []

    async def on_start(self) -> None:
        self.started += 1

    @tc.rpc(errors=[TooBig])
    async def add(self, msg: Add) -> int:
        if msg.amount > 1000:
            raise TooBig(limit=1000)
        self.value += msg.amount
        return self.value

    @tc.rpc
    async def get(self, msg: Get) -> int:
        return self.value

    @tc.rpc
    async def sleep(self, msg: Sleep) -> float:
        await trio.sleep(msg.seconds)
        return trio.current_time()

    @tc.rpc
    async def boom(self, msg: Boom) -> None:
        raise KeyError(msg.text)

    @tc.stream
    async def count(self, msg: Count) -> AsyncIterator[int]:
        for i in range(msg.upto):
            yield i
            await trio.sleep(1)


def config(**overrides: object) -> tc.ShardingConfig:
    """A small, fast config for tests (few shards)."""
    values: dict[str, object] = {"shards_per_group": 8}
    values.update(overrides)
    return tc.ShardingConfig(**values)  # type: ignore[arg-type]
