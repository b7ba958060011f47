"""Job queues (`trio_cluster.queues`) end to end on memory storage and
virtual time."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import attrs
import pytest
import trio

import trio_cluster as tc
from trio_cluster.queues import Queue, RateLimit

from ..helpers import open_clocked_runner


@attrs.frozen
class Job:
    name: str
    work: float = 0.0
    fail: int = 0
    """Attempts that raise before one succeeds."""


class Log:
    def __init__(self) -> None:
        self.started: list[tuple[str, float]] = []
        self.done: list[str] = []
        self.running = 0
        self.most = 0
        self.attempts: dict[str, int] = {}

    async def handle(self, job: Job) -> None:
        self.attempts[job.name] = self.attempts.get(job.name, 0) + 1
        if self.attempts[job.name] <= job.fail:
            raise RuntimeError(f"{job.name} failed")
        self.started.append((job.name, trio.current_time()))
        self.running += 1
        self.most = max(self.most, self.running)
        try:
            await trio.sleep(job.work)
        finally:
            self.running -= 1
        self.done.append(job.name)


async def until_done(log: Log, count: int) -> None:
    with trio.fail_after(600):
        while len(log.done) < count:  # noqa: ASYNC110
            await trio.sleep(0.1)


async def test_at_most_concurrency_jobs_run_at_once(autojump_clock):
    log = Log()
    queue = Queue("work", log.handle, Job, concurrency=2)
    async with open_clocked_runner([queue.worker]) as runner:
        client = queue.client(runner)
        start = trio.current_time()
        for i in range(6):
            await client.enqueue(Job(f"j{i}", work=1.0))
        await until_done(log, 6)
        assert log.most <= 2
        assert trio.current_time() - start >= 3.0


async def test_jobs_of_one_key_run_one_at_a_time_in_order(autojump_clock):
    log = Log()
    queue = Queue("keyed", log.handle, Job, concurrency=8)
    async with open_clocked_runner([queue.worker]) as runner:
        client = queue.client(runner)
        for i in range(5):
            await client.enqueue(Job(f"k{i}", work=0.5), key="customer-1")
        await until_done(log, 5)
        assert log.done == [f"k{i}" for i in range(5)]
        assert log.most == 1


async def test_a_dedup_id_stores_a_job_once(autojump_clock):
    log = Log()
    queue = Queue("dedup", log.handle, Job)
    async with open_clocked_runner([queue.worker]) as runner:
        client = queue.client(runner)
        for _ in range(3):
            await client.enqueue(Job("once"), dedup_id="order-7")
        await client.enqueue(Job("twice"), dedup_id="order-8")
        await trio.sleep(5)
        assert sorted(log.done) == ["once", "twice"]


async def test_run_at_delays_a_job(autojump_clock):
    log = Log()
    queue = Queue("later", log.handle, Job)
    async with open_clocked_runner([queue.worker]) as runner:
        client = queue.client(runner)
        start = trio.current_time()
        now = runner.clock.now()
        await client.enqueue(Job("in-10s"), run_at=now + 10)
        await client.enqueue(
            Job("in-20s"),
            run_at=datetime.fromtimestamp(now, UTC) + timedelta(seconds=20),
        )
        await until_done(log, 2)
        [(first, at1), (second, at2)] = log.started
        assert (first, second) == ("in-10s", "in-20s")
        assert at1 - start == pytest.approx(10, abs=0.1)
        assert at2 - start == pytest.approx(20, abs=0.1)


async def test_a_rate_limit_spaces_the_jobs(autojump_clock):
    log = Log()
    queue = Queue("slow", log.handle, Job, concurrency=2, rate=RateLimit(2.0))
    async with open_clocked_runner([queue.worker]) as runner:
        client = queue.client(runner)
        start = trio.current_time()
        for i in range(10):
            await client.enqueue(Job(f"r{i}"), key=f"key-{i}")
        await until_done(log, 10)
        # 2 per second across the queue: each worker starts one a second.
        elapsed = log.started[-1][1] - start
        assert elapsed >= 3.9, log.started
        for a, b in zip(log.started, log.started[2:], strict=False):
            assert b[1] - a[1] >= 0.49, log.started


async def test_failing_jobs_are_retried_then_dead_lettered(autojump_clock):
    log = Log()
    queue = Queue(
        "flaky",
        log.handle,
        Job,
        retry=tc.RetryPolicy(max_attempts=3, backoff=tc.Backoff(1.0, 1.0)),
    )
    async with open_clocked_runner([queue.worker]) as runner:
        client = queue.client(runner)
        await client.enqueue(Job("recovers", fail=2))
        await client.enqueue(Job("poison", fail=99))
        await until_done(log, 1)
        assert log.done == ["recovers"]
        with trio.fail_after(60):
            while not (letters := await runner.dead_letters.list()):  # noqa: ASYNC110
                await trio.sleep(0.5)
        [letter] = letters
        assert letter.entity_type == queue.type_name
        assert "poison failed" in letter.error
        assert log.attempts == {"recovers": 3, "poison": 3}


async def test_a_job_enqueued_in_a_rolled_back_transaction_never_runs(autojump_clock):
    log = Log()
    queue = Queue("outbox", log.handle, Job)

    class Abort(Exception):
        pass

    async with open_clocked_runner([queue.worker]) as runner:
        client = queue.client(runner)

        async def enqueue_then_fail() -> None:
            async with runner.transaction():
                await client.enqueue(Job("dropped"))
                raise Abort

        with pytest.raises(Abort):
            await enqueue_then_fail()
        async with runner.transaction():
            await client.enqueue(Job("kept"))
        await trio.sleep(5)
        assert log.done == ["kept"]


async def test_bad_arguments_are_refused(autojump_clock):
    log = Log()
    queue = Queue("checked", log.handle, Job)
    async with open_clocked_runner([queue.worker]) as runner:
        client = queue.client(runner)
        with pytest.raises(TypeError, match="key"):
            await client.enqueue(Job("x"), key="")
        with pytest.raises(TypeError, match="dedup_id"):
            await client.enqueue(Job("x"), dedup_id=7)  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="aware"):
            await client.enqueue(Job("x"), run_at=datetime(2030, 1, 1))
        with pytest.raises(tc.MalformedMessageError):
            await client.enqueue("not a job")  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="Runner"):
            queue.client(object())  # type: ignore[arg-type]
        await trio.sleep(1)
        assert log.done == []


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"name": "bad name"}, "queue name"),
        ({"name": ""}, "queue name"),
        ({"concurrency": 0}, "concurrency"),
        ({"concurrency": 2.0}, "concurrency"),
        ({"handler": 3}, "handler"),
        ({"rate": 5}, "RateLimit"),
        ({"retry": 3}, "RetryPolicy"),
    ],
)
def test_bad_queues_raise(kwargs, message):
    options = {"name": "q", "handler": Log().handle, "job_type": Job, **kwargs}
    with pytest.raises((tc.ConfigError, TypeError), match=message):
        Queue(**options)
