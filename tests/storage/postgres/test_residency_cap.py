"""The residency cap on `PostgresStorage` (real server, real time): a persisted
message for a new entity waits in storage while the runner is at
``max_resident_entities`` with every entity busy, and runs once a place frees;
given back when its shard stops, it is claimed again (issue 11, item 10)."""

from __future__ import annotations

import attrs
import pytest
import trio
import trio.testing

import trio_cluster as tc
from tests.pg_fixture import TIMEOUT
from trio_cluster.storage import PostgresStorage

pytestmark = pytest.mark.postgres


@attrs.frozen
class Job:
    key: str


LOG: list[str] = []
GATES: dict[str, trio.Event] = {}
"""Entities whose ``work`` waits for this event."""
PEAK = [0]
"""The most entities resident when one started."""


class Resident(tc.Entity):
    type_name = "PgResident"

    async def on_start(self) -> None:
        LOG.append(f"start {self.id}")
        PEAK[0] = max(PEAK[0], tc.current_runner().statistics().entities)

    async def on_stop(self) -> None:
        LOG.append(f"stop {self.id}")

    @tc.rpc(persisted=True, primary_key=lambda m: m.key)
    async def work(self, msg: Job) -> str:
        LOG.append(f"work {self.id}")
        if (gate := GATES.get(self.id)) is not None:
            await gate.wait()
        return f"{self.id} {msg.key}"


@pytest.fixture(autouse=True)
def _fresh() -> None:
    LOG.clear()
    GATES.clear()
    PEAK[0] = 0


def cap_config(**overrides: object) -> tc.ShardingConfig:
    values: dict[str, object] = {
        "shards_per_group": 8,
        "max_resident_entities": 2,
        "storage_poll_interval": 0.2,
        "lease_duration": 3.0,
        "lease_refresh_interval": 1.0,
    }
    values.update(overrides)
    return tc.ShardingConfig(**values)  # type: ignore[arg-type]


async def test_waiting_message_runs_once_a_place_frees(
    storage: PostgresStorage,
) -> None:
    results: dict[str, str] = {}
    with trio.fail_after(TIMEOUT):
        async with (
            tc.open_runner(
                entities=[Resident], storage=storage, config=cap_config()
            ) as runner,
            trio.open_nursery() as nursery,
        ):
            await runner.wait_shards_acquired()
            client = runner.client(Resident)

            async def call(name: str) -> None:
                results[name] = await client(name).work(Job("k"))

            for name in "ab":
                GATES[name] = trio.Event()
                nursery.start_soon(call, name)
            while LOG.count("work a") + LOG.count("work b") < 2:  # noqa: ASYNC110
                await trio.sleep(0.01)
            nursery.start_soon(call, "c")
            claims = runner.statistics().storage_claims
            await trio.sleep(1.5)  # several poll intervals
            assert "start c" not in LOG
            assert runner.statistics().entities == 2
            assert runner.statistics().persisted_in_flight == 3
            # Polls, not a loop re-claiming c.
            assert runner.statistics().storage_claims - claims <= 20
            GATES["a"].set()
            while "c" not in results:  # noqa: ASYNC110
                await trio.sleep(0.01)
            assert LOG.index("stop a") < LOG.index("start c")
            GATES["b"].set()
    assert results == {"a": "a k", "b": "b k", "c": "c k"}
    assert PEAK[0] == 2
    assert sorted(line for line in LOG if line.startswith("work")) == [
        "work a",
        "work b",
        "work c",
    ]


async def test_waiting_message_is_claimed_again_after_a_restart(
    storage: PostgresStorage,
) -> None:
    config = cap_config(entity_termination_timeout=0.5)
    with trio.fail_after(TIMEOUT):
        async with tc.open_runner(
            entities=[Resident], storage=storage, config=config
        ) as runner:
            await runner.wait_shards_acquired()
            client = runner.client(Resident)
            for name in "ab":
                GATES[name] = trio.Event()
                await client(name).work.discard(Job("k"))
            while LOG.count("work a") + LOG.count("work b") < 2:  # noqa: ASYNC110
                await trio.sleep(0.01)
            await client("c").work.discard(Job("k"))
            await trio.sleep(1)
            assert "start c" not in LOG
            # Shutting down cancels a and b after 0.5 s and gives c back.
        GATES.clear()
        async with tc.open_runner(
            entities=[Resident], storage=storage, config=config
        ) as runner:
            client = runner.client(Resident)
            # The same primary key attaches to the stored requests.
            replies = [await client(name).work(Job("k")) for name in "abc"]
    assert replies == ["a k", "b k", "c k"]
    assert LOG.count("work c") == 1
    assert PEAK[0] == 2
