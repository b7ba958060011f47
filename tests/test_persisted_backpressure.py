"""``max_persisted_in_flight``: the read loop stops claiming when the budget is
spent, and a recorded reply (not the safety-net poll) makes it claim again."""

from __future__ import annotations

from typing import ClassVar

import attrs
import trio

import trio_cluster as tc

from .helpers import Get, config
from .test_persisted import clock


@attrs.frozen
class Job:
    name: str
    at: float


class Worker(tc.Entity):
    type_name = "Worker"
    done: ClassVar[list[tuple[str, float]]] = []
    all_done: ClassVar[trio.Event | None] = None
    expected: ClassVar[int] = 0

    @tc.rpc(persisted=True, deliver_at=lambda m: m.at)
    async def work(self, msg: Job) -> None:
        await trio.sleep(1)
        Worker.done.append((msg.name, trio.current_time()))
        if len(Worker.done) == Worker.expected and Worker.all_done is not None:
            Worker.all_done.set()

    @tc.rpc
    async def ping(self, msg: Get) -> None:
        pass


async def test_recorded_replies_refill_an_exhausted_budget(autojump_clock):
    Worker.done, Worker.all_done, Worker.expected = [], trio.Event(), 6
    # A poll interval of an hour: only the wake-up after each recorded reply
    # can make the read loop claim the rest in time.
    cfg = config(max_persisted_in_flight=2, storage_poll_interval=3600.0)
    async with tc.open_runner(entities=[Worker], config=cfg, clock=clock()) as runner:
        client = runner.client(Worker)
        start = trio.current_time()
        at = runner.clock.now() + 1  # stored unclaimed, claimed at that time
        for i in range(6):
            await client(f"w{i}").work.discard(Job(f"j{i}", at))
        with trio.fail_after(30):
            await Worker.all_done.wait()
        finished = sorted(t - start for _, t in Worker.done)
        # Two at a time: claimed at 1 s, done at 2 s, then 3 s, then 4 s.
        assert finished[1] <= 2.5
        assert finished[2] >= 2.5  # the budget held the third one back
        assert finished[-1] <= 5
        assert runner.statistics().persisted_in_flight == 0
