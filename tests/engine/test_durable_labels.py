"""Labels of durable entity state (``durable(..., label=...)``): saved with
each snapshot, listed and counted by storage, and a failing label function
fails the save like a state that does not encode, changing nothing."""

from __future__ import annotations

from typing import Any

import attrs
import pytest

import trio_cluster as tc
from trio_cluster.abc import StateCount, StateQuery, StateStorage
from trio_cluster.storage import MemoryStorage

from ..helpers import config, open_clocked_runner


@attrs.frozen
class Level:
    value: int = 0


@attrs.frozen
class Set:
    value: int


def _band(level: Level) -> str:
    if level.value < 0:
        raise ValueError("no band below zero")
    if level.value > 1000:
        return "x" * 300  # too long a label
    return "high" if level.value >= 10 else "low"


class Gauge(tc.Entity):
    type_name = "LabelledGauge"
    state = tc.durable(Level, label=_band)

    @tc.rpc(persisted=True, transactional=True)
    async def set(self, msg: Set) -> int:
        self.state = Level(msg.value)
        return msg.value

    @tc.rpc
    async def read(self, msg: Set) -> int:
        return self.state.value


async def test_snapshots_are_saved_listed_and_counted_by_label(
    autojump_clock: Any,
) -> None:
    storage = MemoryStorage()
    async with open_clocked_runner([Gauge], config(), storage) as runner:
        gauges = runner.client(Gauge)
        for name, value in [("a", 3), ("b", 30), ("c", 12)]:
            assert await gauges(name).set(Set(value)) == value
        assert await gauges("b").set(Set(1)) == 1
        async with storage.open_session(name="operator", lease_duration=10) as op:
            states = op.messages
            assert isinstance(states, StateStorage)
            query = StateQuery("LabelledGauge")
            assert await states.count_states(query) == [
                StateCount("LabelledGauge", "high", 1),
                StateCount("LabelledGauge", "low", 2),
            ]
            low = await states.list_states(
                StateQuery("LabelledGauge", label="low"), limit=10
            )
            assert [(r.entity_id, r.state.version) for r in low] == [("a", 1), ("b", 2)]


@pytest.mark.parametrize(
    ("value", "problem"), [(-1, "no band below zero"), (5000, "at most 200")]
)
async def test_a_failing_label_fails_the_save_and_changes_nothing(
    autojump_clock: Any, value: int, problem: str
) -> None:
    storage = MemoryStorage()
    async with open_clocked_runner([Gauge], config(), storage) as runner:
        gauge = runner.client(Gauge)("g")
        assert await gauge.set(Set(4)) == 4
        with pytest.raises(tc.MalformedMessageError, match=problem):
            await gauge.set(Set(value))
        assert await gauge.read(Set(0)) == 4
        address = runner.client(Gauge).address_of("g")
        stored = storage._states.load(address)
        assert stored is not None
        assert (stored.version, stored.label) == (1, "low")


def test_label_must_be_callable() -> None:
    with pytest.raises(tc.EntityDefinitionError, match="label"):
        tc.durable(Level, label="low")  # type: ignore[arg-type]
