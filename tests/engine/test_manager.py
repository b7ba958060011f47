"""The entity manager (`trio_cluster._engine._manager`): calls, ordering,
errors, crashes and restarts, concurrency, mailboxes, cancellation, the
fast path of handlers that cannot suspend."""

from __future__ import annotations

import pytest
import trio
import trio.lowlevel
import trio.testing

import trio_cluster as tc

from ..helpers import Add, Boom, Counter, Get, Quick, Sleep, TooBig, config


async def test_calls_keep_state_per_entity(autojump_clock, serialize):
    with trio.fail_after(10):
        async with tc.open_runner(
            entities=[Counter], config=config(serialize_local_calls=serialize)
        ) as runner:
            counters = runner.client(Counter)
            assert await counters("a").add(Add(2)) == 2
            assert await counters("a").add(Add(3)) == 5
            assert await counters("b").add(Add(7)) == 7
            assert await counters("a").get(Get()) == 5


async def test_declared_error_is_reraised_as_itself(autojump_clock, serialize):
    async with tc.open_runner(
        entities=[Counter], config=config(serialize_local_calls=serialize)
    ) as runner:
        ref = runner.client(Counter)("a")
        with pytest.raises(TooBig) as info:
            await ref.add(Add(5000))
        assert info.value.limit == 1000
        # A declared error is an ordinary outcome: no restart, state kept.
        assert await ref.add(Add(1)) == 1
        assert runner.statistics().entity_crashes == 0


async def test_undeclared_error_gives_remote_error_and_restarts(
    autojump_clock, serialize
):
    cfg = config(serialize_local_calls=serialize, entity_restart_backoff=0.5)
    async with tc.open_runner(entities=[Counter], config=cfg) as runner:
        ref = runner.client(Counter)("a")
        await ref.add(Add(10))
        with pytest.raises(tc.RemoteError) as info:
            await ref.boom(Boom("oops"))
        error = info.value
        assert error.type_name == "KeyError"
        assert error.message == "'oops'"
        assert "Counter/a" in error.address
        crashed_at = trio.current_time()
        # The next message waits for the restart backoff, then sees fresh state.
        assert await ref.get(Get()) == 0
        assert trio.current_time() - crashed_at == pytest.approx(0.5)
        assert runner.statistics().entity_crashes == 1


async def test_restart_backoff_grows_and_resets(autojump_clock):
    cfg = config(entity_restart_backoff=0.25, entity_restart_backoff_max=1.0)
    async with tc.open_runner(entities=[Counter], config=cfg) as runner:
        ref = runner.client(Counter)("a")
        delays = []
        for _ in range(4):
            with pytest.raises(tc.RemoteError):
                await ref.boom(Boom("x"))
            start = trio.current_time()
            await ref.get(Get())
            delays.append(trio.current_time() - start)
        # get() succeeded after each crash, so the count resets each time.
        assert delays == pytest.approx([0.25, 0.25, 0.25, 0.25])
        for _ in range(3):
            with pytest.raises(tc.RemoteError):
                await ref.boom(Boom("x"))
        start = trio.current_time()
        await ref.get(Get())
        # Three crashes in a row (boom is never successful): 0.25, 0.5, 1.0
        # were slept between them; the last wait is the capped 1.0.
        assert trio.current_time() - start == pytest.approx(1.0)


async def test_fifo_order_between_discard_and_call(autojump_clock):
    async with tc.open_runner(entities=[Counter], config=config()) as runner:
        ref = runner.client(Counter)("a")
        await ref.sleep.discard(Sleep(5))
        await ref.add.discard(Add(1))
        await ref.add.discard(Add(2))
        start = trio.current_time()
        assert await ref.get(Get()) == 3
        assert trio.current_time() - start == pytest.approx(5)


async def test_concurrent_callers_are_served_in_order(autojump_clock):
    results: list[tuple[int, int]] = []
    async with tc.open_runner(entities=[Counter], config=config()) as runner:
        ref = runner.client(Counter)("a")

        async def caller(i: int) -> None:
            await trio.sleep(i * 0.001)
            results.append((i, await ref.add(Add(1))))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(ref.sleep, Sleep(1))
            await trio.testing.wait_all_tasks_blocked()
            for i in range(20):
                nursery.start_soon(caller, i)
    assert results == [(i, i + 1) for i in range(20)]


class Slow(tc.Entity):
    type_name = "Slow"
    concurrency = 2

    def __init__(self) -> None:
        self.running = 0
        self.peak = 0

    @tc.rpc
    async def work(self, msg: Sleep) -> int:
        self.running += 1
        self.peak = max(self.peak, self.running)
        await trio.sleep(msg.seconds)
        self.running -= 1
        return self.peak


async def test_concurrency_limit_is_respected(autojump_clock):
    peaks: list[int] = []
    async with tc.open_runner(entities=[Slow], config=config()) as runner:
        ref = runner.client(Slow)("s")
        start = trio.current_time()
        async with trio.open_nursery() as nursery:
            for _ in range(6):

                async def one() -> None:
                    peaks.append(await ref.work(Sleep(1)))

                nursery.start_soon(one)
        assert trio.current_time() - start == pytest.approx(3)
    assert max(peaks) == 2


async def test_mailbox_full(autojump_clock):
    class Tiny(Counter):
        type_name = "Tiny"
        mailbox_capacity = 2

    async with tc.open_runner(entities=[Tiny], config=config()) as runner:
        ref = runner.client(Tiny)("t")
        async with trio.open_nursery() as nursery:
            nursery.start_soon(ref.sleep, Sleep(10))
            nursery.start_soon(ref.sleep, Sleep(10))
            await trio.testing.wait_all_tasks_blocked()
            with pytest.raises(tc.MailboxFullError, match="Tiny/t"):
                await ref.get(Get())
            with pytest.raises(tc.MailboxFullError):
                await ref.add.discard(Add(1))
            nursery.cancel_scope.cancel()


class Interruptible(tc.Entity):
    type_name = "Interruptible"

    def __init__(self) -> None:
        self.log: list[str] = []

    @tc.rpc
    async def wait(self, msg: Sleep) -> None:
        self.log.append("started")
        try:
            await trio.sleep(msg.seconds)
        except trio.Cancelled:
            self.log.append("cancelled")
            raise
        self.log.append("finished")

    @tc.rpc
    async def history(self, msg: Get) -> list[str]:
        return list(self.log)


async def test_caller_cancellation_interrupts_handler(autojump_clock):
    async with tc.open_runner(entities=[Interruptible], config=config()) as runner:
        ref = runner.client(Interruptible)("i")
        with trio.move_on_after(1):
            await ref.wait(Sleep(10))
        assert await ref.history(Get()) == ["started", "cancelled"]
        # Interruption is not a crash.
        assert runner.statistics().entity_crashes == 0


async def test_cancelled_queued_call_never_runs(autojump_clock):
    async with tc.open_runner(entities=[Interruptible], config=config()) as runner:
        ref = runner.client(Interruptible)("i")
        async with trio.open_nursery() as nursery:
            nursery.start_soon(ref.wait, Sleep(5))
            await trio.testing.wait_all_tasks_blocked()
            with trio.move_on_after(1):
                await ref.wait(Sleep(1))  # queued behind the first, then cancelled
        assert await ref.history(Get()) == ["started", "finished"]


async def test_handler_checkpoints_even_when_it_does_not(autojump_clock):
    async with tc.open_runner(entities=[Counter], config=config()) as runner:
        ref = runner.client(Counter)("a")
        await ref.get(Get())  # activated
        with trio.testing.assert_checkpoints():
            await ref.get(Get())
        with trio.CancelScope() as scope:
            scope.cancel()
            with pytest.raises(trio.Cancelled):
                await ref.add(Add(1))
        assert await ref.get(Get()) == 0  # the cancelled call never ran


class FlakyStart(tc.Entity):
    type_name = "FlakyStart"
    failures = 0

    async def on_start(self) -> None:
        if FlakyStart.failures:
            FlakyStart.failures -= 1
            raise OSError("cannot load state")

    @tc.rpc
    async def ping(self, msg: Get) -> str:
        return "pong"


async def test_on_start_failure_fails_the_call_and_restarts(autojump_clock):
    FlakyStart.failures = 1
    async with tc.open_runner(
        entities=[FlakyStart], config=config(entity_restart_backoff=1.0)
    ) as runner:
        ref = runner.client(FlakyStart)("f")
        with pytest.raises(tc.RemoteError, match="cannot load state"):
            await ref.ping(Get())
        start = trio.current_time()
        assert await ref.ping(Get()) == "pong"
        assert trio.current_time() - start == pytest.approx(1.0)


class Pair(tc.Entity):
    type_name = "Pair"
    concurrency = 2

    @tc.rpc
    async def wait(self, msg: Sleep) -> None:
        await trio.sleep(msg.seconds)

    @tc.rpc
    async def fail(self, msg: Get) -> None:
        raise ValueError("boom")


async def test_crash_fails_running_volatile_siblings(autojump_clock):
    outcome: list[BaseException] = []
    async with tc.open_runner(entities=[Pair], config=config()) as runner:
        ref = runner.client(Pair)("p")

        async def waiter() -> None:
            try:
                await ref.wait(Sleep(10))
            except tc.RemoteError as exc:
                outcome.append(exc)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(waiter)
            await trio.testing.wait_all_tasks_blocked()
            with pytest.raises(tc.RemoteError, match="boom"):
                await ref.fail(Get())
    assert len(outcome) == 1
    assert outcome[0].type_name == "trio_cluster.EntityRestarted"  # type: ignore[attr-defined]


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
