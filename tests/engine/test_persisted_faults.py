"""Persisted and transactional delivery under storage faults, on memory storage.

Faults come from `MemoryStorage.fault_hook` (every operation of every session,
a transaction's statements included) on the autojump clock.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AsyncExitStack
from typing import Any, ClassVar

import attrs
import pytest
import trio
import trio.testing

import trio_cluster as tc
from trio_cluster.storage import MemoryStorage
from trio_cluster.testing import (
    FaultSchedule,
    FreezeRunner,
    KillRunner,
    LoseLockSession,
    Scenario,
    Workload,
    run_scenario,
)

from ..helpers import FailFirst, config, open_clocked_runner, runner_config


@attrs.frozen
class Job:
    key: str
    swallow: bool = False
    """The handler catches its statement's error and answers anyway."""


class Vault(tc.Entity):
    """Transactional handlers; ``gate`` holds ``store`` until it is set."""

    type_name = "FaultVault"
    gate: trio.Event | None = None
    runs: ClassVar[dict[str, int]] = {}
    """Runs of ``tally`` by key (across incarnations)."""

    @tc.rpc(persisted=True, transactional=True, primary_key=lambda m: m.key)
    async def store(self, msg: Job) -> str:
        if Vault.gate is not None:
            await Vault.gate.wait()
        return msg.key

    @tc.rpc(
        persisted=True,
        transactional=True,
        primary_key=lambda m: m.key,
        retry=tc.RetryPolicy(max_attempts=1),
    )
    async def tally(self, msg: Job) -> int:
        """Runs one statement; memory storage has no SQL, so it fails anyway
        (unless the fault hook made it fail first). One attempt: its error
        dead-letters it at once."""
        runs = Vault.runs[msg.key] = Vault.runs.get(msg.key, 0) + 1
        try:
            await tc.current_transaction().execute("UPDATE tally SET n = n + 1")
        except tc.PersistenceError:
            if not msg.swallow:
                raise
        return runs

    @tc.rpc(persisted=True, transactional=True)
    async def unencodable(self, msg: Job) -> int:
        return object()  # type: ignore[return-value]


async def until(check: Callable[[], bool], what: str) -> None:
    """Poll ``check()`` every 10 ms of virtual time (bounded)."""
    for _ in range(10_000):
        if check():
            return
        await trio.sleep(0.01)
    pytest.fail(f"never: {what}")


# ----------------------------------------------------------------------
# A job whose commit fails after its shard stopped


async def test_commit_failing_while_the_shard_stops_leaves_the_request_to_the_next_owner(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A shard handed over gracefully stops while its transactional handler
    runs, and the handler's commit then fails (storage is down). The job must
    not go back into the dead shard's mailbox: it would stay in the runner's
    in-flight table, and when the runner served the shard again it would
    skip the request as "already in memory" forever."""
    storage = MemoryStorage()
    failing = False

    async def replies_fail(session: str, operation: str) -> None:
        if failing and operation == "save_replies":
            raise OSError("storage is down")

    storage.fault_hook = replies_fail
    Vault.gate = trio.Event()
    keys = [f"e{i}" for i in range(16)]
    answered: dict[str, str] = {}
    cfg = {"entity_termination_timeout": 30.0}
    try:
        with trio.fail_after(600):
            async with AsyncExitStack() as outer:
                first = await outer.enter_async_context(
                    open_clocked_runner([Vault], runner_config(1, **cfg), storage)
                )
                await first.wait_shards_acquired()
                client = first.client(Vault)

                async def call(key: str) -> None:
                    answered[key] = await client(key).store(Job(key))

                nursery = await outer.enter_async_context(trio.open_nursery())
                for key in keys:
                    nursery.start_soon(call, key)
                await until(
                    lambda: first.statistics().running_handlers == len(keys),
                    "every handler runs",
                )
                served = set(first.served_shards())
                failing = True
                async with open_clocked_runner(
                    [Vault], runner_config(2, **cfg), storage
                ) as second:
                    # The first runner hands half its shards over: it stops
                    # them gracefully, waiting for their running handlers...
                    await until(
                        lambda: len(first.served_shards()) < len(served),
                        "a shard is handed over",
                    )
                    moving = {
                        k
                        for k in keys
                        if client.address_of(k).shard not in first.served_shards()
                    }
                    assert moving
                    Vault.gate.set()  # ... which finish; their commits fail.
                    await until(
                        lambda: second.statistics().shards > 0,
                        "the second runner serves the moved shards",
                    )
                    await until(
                        lambda: (
                            not set(first.served_shards()) & set(second.served_shards())
                            and first.statistics().persisted_in_flight
                            == len(keys) - len(moving)
                        ),
                        "the stopped shards' jobs are gone from the first runner",
                    )
                    # The second runner cannot record the replies either.
                    await trio.sleep(5)
                    assert not answered
                # The second runner left: the first serves every shard again,
                # claims the moved requests and (storage back) answers them.
                await until(
                    lambda: first.statistics().shards == len(served),
                    "every shard is back",
                )
                failing = False
                await until(lambda: len(answered) == len(keys), "every answer")
                assert answered == {k: k for k in keys}
                assert first.statistics().persisted_in_flight == 0
    finally:
        Vault.gate = None


# ----------------------------------------------------------------------
# The handler's own statement meets a storage failure


@pytest.mark.parametrize("swallow", [False, True])
async def test_storage_failure_under_a_handlers_statement_is_retried(
    autojump_clock: trio.testing.MockClock, swallow: bool
) -> None:
    """The statement fails because storage does (whether the handler lets
    the error out or swallows it): nothing is recorded, the handler runs
    again after a backoff, and its next outcome is the reply."""
    storage = MemoryStorage()
    storage.fault_hook = FailFirst("execute", 2, "connection lost")
    cfg = config(entity_restart_backoff=0.5, entity_restart_backoff_max=5.0)
    key = f"retried-{swallow}"
    with trio.fail_after(60):
        async with open_clocked_runner([Vault], cfg, storage) as runner:
            start = trio.current_time()
            ref = runner.client(Vault)("v")

            async def tally_replies_with_the_third_outcome() -> None:
                if swallow:
                    assert await ref.tally(Job(key, swallow=True)) == 3
                else:
                    # The third run's own error (no SQL on memory storage)
                    # is the reply, not the first run's storage failure.
                    with pytest.raises(tc.DeadLetteredError, match="has no SQL"):
                        await ref.tally(Job(key))

            await tally_replies_with_the_third_outcome()
            assert Vault.runs[key] == 3
            # Two backoffs (0.5 s, then 1 s), one restart each.
            assert trio.current_time() - start == pytest.approx(1.5)
            assert runner.statistics().entity_crashes == 2 + (not swallow)
            # The reply is stored: a duplicate gets it without running again.
            await tally_replies_with_the_third_outcome()
            assert Vault.runs[key] == 3


async def test_statement_error_of_the_handlers_own_is_its_reply(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A statement at fault (here: memory storage has no SQL) is a handler
    error like any other: its retry policy decides (here: one attempt, so it
    is dead-lettered at once), it is not retried as a storage failure."""
    with trio.fail_after(60):
        async with open_clocked_runner([Vault]) as runner:
            ref = runner.client(Vault)("v")
            for _ in range(2):
                with pytest.raises(tc.DeadLetteredError, match="has no SQL"):
                    await ref.tally(Job("strict"))
            assert Vault.runs["strict"] == 1
            assert runner.statistics().entity_crashes == 1


@pytest.mark.parametrize("serialize", [False, True])
async def test_unencodable_reply_of_a_transactional_handler_is_an_error_reply(
    autojump_clock: trio.testing.MockClock, serialize: bool
) -> None:
    """Without local serialization the value reaches the transaction as it
    is: encoding it there fails, which rolls back (not crash the runner)."""
    cfg = config(serialize_local_calls=serialize)
    with trio.fail_after(60):
        async with open_clocked_runner([Vault], cfg) as runner:
            with pytest.raises(tc.MalformedMessageError):
                await runner.client(Vault)("v").unencodable(Job("x"))
            assert runner.statistics().persisted_in_flight == 0


# ----------------------------------------------------------------------
# A shard whose nursery is cancelled takes no new task


def test_delivery_to_a_shard_whose_nursery_closed_is_refused() -> None:
    """Found by the simulator (``ci`` profile): a runner is killed (its
    shards' nursery scopes cancelled at once) while a persisted call through
    it awaits its save. The nursery closes when its last task ends, but the
    shard's state only changes when the shard's own task runs again; a
    delivery in between started a task in the closed nursery, and the
    caller got ``RuntimeError: Nursery is closed to new arrivals``. (A lapsed
    lease cancels the nursery the same way.) The shard is no longer active
    from the moment its nursery is cancelled."""
    faults = FaultSchedule(
        faults=(
            LoseLockSession(at=0.0, runner=0),
            FreezeRunner(at=15.0, runner=2, duration=1.0),
            KillRunner(at=15.0, runner=1, down_for=1.0),
        )
    )
    run_scenario(
        Scenario(seed=0, runners=3, faults=faults, workload=Workload(background=4))
    )


# ----------------------------------------------------------------------
# A sender cancelled while its request is being saved


class Noter(tc.Entity):
    type_name = "FaultNoter"
    runs: ClassVar[list[str]] = []

    @tc.rpc(persisted=True, primary_key=lambda m: m.key)
    async def note(self, msg: Job) -> str:
        Noter.runs.append(msg.key)
        return msg.key


def slow_first_save() -> Callable[[str, str], Any]:
    """A fault hook: the first ``save_requests`` takes 2 s, then succeeds."""
    slow = [1]

    async def hook(session: str, operation: str) -> None:
        if operation == "save_requests" and slow:
            slow.pop()
            await trio.sleep(2)

    return hook


async def test_a_call_cancelled_while_it_is_saved_is_interrupted_not_left_claimed(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """The save lands after the caller gave up: the request was saved
    claimed by this runner, so nobody else will claim it until the shard's
    next epoch. It is interrupted like a call cancelled later: its handler
    does not run, the interruption is its reply, nothing stays unprocessed."""
    Noter.runs = []
    storage = MemoryStorage()
    with trio.fail_after(60):
        async with open_clocked_runner([Noter], config(), storage) as runner:
            ref = runner.client(Noter)("n")
            storage.fault_hook = slow_first_save()
            with trio.move_on_after(1) as scope:
                await ref.note(Job("gone"))
            assert scope.cancelled_caught
            await trio.sleep(5)
            with pytest.raises(tc.RequestInterruptedError):
                await ref.note(Job("gone"))  # attaches to the stored one
            assert Noter.runs == []
            async with storage.open_session(name="look", lease_duration=5) as look:
                assert await look.messages.scan_unprocessed(limit=10) == []


async def test_a_discard_cancelled_while_it_is_saved_still_runs(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Sent and forgotten: once saved, it runs (its sender did not wait for
    a reply, so there is nobody to interrupt it for)."""
    Noter.runs = []
    storage = MemoryStorage()
    with trio.fail_after(60):
        async with open_clocked_runner([Noter], config(), storage) as runner:
            ref = runner.client(Noter)("n")
            storage.fault_hook = slow_first_save()
            with trio.move_on_after(1) as scope:
                await ref.note.discard(Job("sent"))
            assert scope.cancelled_caught
            await until(lambda: Noter.runs == ["sent"], "the discarded request ran")
            assert await ref.note(Job("sent")) == "sent"  # its recorded reply
