"""Entity code never sees its caller's context (`trio_cluster._engine._isolation`).

A `contextvars.ContextVar` the caller set must be invisible to every handler
(inline, detached, persisted, stream, queued behind another sender's job, on
another runner's fast path), to ``on_start`` and ``on_stop`` and to local
broadcast handlers; what the application set around ``open_runner`` is
visible, and the runtime's own context (current runner, current entity) is
set. Nothing a handler sets leaks back into its caller or into the next
handler.
"""

from __future__ import annotations

import contextvars
import types
from collections.abc import AsyncIterator, Generator
from contextlib import AsyncExitStack

import pytest
import trio
import trio.testing

import trio_cluster as tc
from trio_cluster._engine._isolation import run_in
from trio_cluster.storage import MemoryStorage
from trio_cluster.transport import MemoryNetwork, MemoryTransport

from ..helpers import Add, Boom, Count, Get, Sleep, config, open_clocked_runner

CALLER: contextvars.ContextVar[str] = contextvars.ContextVar("test.caller")
"""Set by callers: no entity code may see it."""
APP: contextvars.ContextVar[str] = contextvars.ContextVar("test.app")
"""Set by the application around ``open_runner``: entity code sees it."""


def look(where: str) -> str:
    """Record what entity code at ``where`` sees; return the caller's var."""
    runner = tc.current_runner()
    Probe.seen.append(
        (
            where,
            CALLER.get("-"),
            APP.get("-"),
            str(runner.address),
            str(tc.current_entity_address()),
        )
    )
    return CALLER.get("-")


class Probe(tc.Entity):
    type_name = "Probe"

    seen: list[tuple[str, str, str, str, str]] = []  # noqa: RUF012

    async def on_start(self) -> None:
        look("on_start")

    async def on_stop(self) -> None:
        look("on_stop")

    @tc.rpc
    async def quick(self, msg: Get) -> str:
        """Cannot suspend: the one-step fast path."""
        return look("quick")

    @tc.rpc
    async def slow(self, msg: Get) -> str:
        """Can suspend: runs in a cancel scope (and in the caller's task)."""
        await trio.lowlevel.checkpoint()
        before = look("slow")
        await trio.sleep(1)
        assert look("slow again") == before
        return before

    @tc.rpc
    async def hold(self, msg: Sleep) -> None:
        await trio.sleep(msg.seconds)

    @tc.rpc
    async def note(self, msg: Get) -> None:
        look("note")

    @tc.rpc
    async def sets(self, msg: Get) -> str:
        CALLER.set("handler")
        APP.set("handler")
        return CALLER.get()

    @tc.rpc
    async def boom(self, msg: Boom) -> None:
        raise KeyError(msg.text)

    @tc.rpc(persisted=True)
    async def persisted(self, msg: Get) -> str:
        return look("persisted")

    @tc.rpc(persisted=True, transactional=True)
    async def transactional(self, msg: Get) -> str:
        """Cannot suspend: the one-step path, in the job's transaction."""
        tc.current_transaction()  # raises NotInTransactionError if unset
        return look("transactional")

    @tc.stream
    async def watch(self, msg: Count) -> AsyncIterator[str]:
        for _ in range(msg.upto):
            yield look("watch")
            await trio.sleep(1)


@pytest.fixture(autouse=True)
def _fresh_probe_log() -> None:
    Probe.seen = []


def saw(runner: tc.Runner, *wheres: str, entity: str = "a") -> list[tuple[str, ...]]:
    """What `Probe.seen` must hold: nothing of the caller, the application's
    value, this runner and the entity."""
    address = str(runner.client(Probe).address_of(entity))
    return [(where, "-", "app", str(runner.address), address) for where in wheres]


@pytest.mark.parametrize("handler", ["quick", "slow"])
async def test_an_inline_call_and_on_start_do_not_see_the_callers_context(
    autojump_clock, serialize, handler
):
    APP.set("app")
    async with tc.open_runner(
        entities=[Probe], config=config(serialize_local_calls=serialize)
    ) as runner:
        CALLER.set("caller")
        probe = runner.client(Probe)("a")
        assert await getattr(probe, handler)(Get()) == "-"
        assert await getattr(probe, handler)(Get()) == "-"
        assert CALLER.get() == "caller"
        steps = [handler, "slow again"] if handler == "slow" else [handler]
        assert Probe.seen == saw(runner, "on_start", *steps, *steps)


async def test_what_a_handler_sets_stays_in_that_handler(autojump_clock):
    APP.set("app")
    async with tc.open_runner(entities=[Probe], config=config()) as runner:
        CALLER.set("caller")
        probe = runner.client(Probe)("a")
        assert await probe.sets(Get()) == "handler"
        assert (CALLER.get(), APP.get()) == ("caller", "app")
        assert await probe.quick(Get()) == "-"
        await probe.sets.discard(Get())
        await trio.testing.wait_all_tasks_blocked()
        assert await probe.slow(Get()) == "-"
        assert Probe.seen == saw(runner, "on_start", "quick", "slow", "slow again")


async def test_handlers_see_the_applications_context_whoever_calls(autojump_clock):
    # The caller is a task with an empty context: what the handler sees of
    # the application comes from around open_runner, not from the caller.
    APP.set("app")
    async with (
        trio.open_nursery() as nursery,
        tc.open_runner(entities=[Probe], config=config()) as runner,
    ):

        async def use() -> None:
            assert await runner.client(Probe)("a").quick(Get()) == "-"

        contextvars.Context().run(nursery.start_soon, use)
        await trio.testing.wait_all_tasks_blocked()
        assert Probe.seen == saw(runner, "on_start", "quick")


async def test_a_discard_does_not_see_the_callers_context(autojump_clock):
    APP.set("app")
    async with tc.open_runner(entities=[Probe], config=config()) as runner:
        CALLER.set("caller")
        await runner.client(Probe)("a").note.discard(Get())
        await trio.testing.wait_all_tasks_blocked()
        assert Probe.seen == saw(runner, "on_start", "note")


async def test_a_persisted_handler_does_not_see_the_callers_context(autojump_clock):
    APP.set("app")
    async with open_clocked_runner([Probe]) as runner:
        CALLER.set("caller")
        assert await runner.client(Probe)("a").persisted(Get()) == "-"
        assert Probe.seen == saw(runner, "on_start", "persisted")


async def test_a_transactional_handler_sees_its_transaction_only(autojump_clock):
    APP.set("app")
    async with open_clocked_runner([Probe]) as runner:
        CALLER.set("caller")
        assert await runner.client(Probe)("a").transactional(Get()) == "-"
        assert Probe.seen == saw(runner, "on_start", "transactional")


async def test_a_stream_handler_does_not_see_the_callers_context(autojump_clock):
    APP.set("app")
    async with tc.open_runner(entities=[Probe], config=config()) as runner:
        CALLER.set("caller")
        async with runner.client(Probe)("a").watch(Count(2)) as items:
            assert [item async for item in items] == ["-", "-"]
        assert Probe.seen == saw(runner, "on_start", "watch", "watch")


async def test_a_queued_job_does_not_see_the_task_that_started_it(autojump_clock):
    # The second sender's message waits behind the first sender's handler;
    # when that one finishes, the first sender's task starts the second job.
    APP.set("app")
    async with tc.open_runner(entities=[Probe], config=config()) as runner:
        probe = runner.client(Probe)("a")

        async def first() -> None:
            CALLER.set("first")
            await probe.hold(Sleep(1))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(first)
            await trio.testing.wait_all_tasks_blocked()
            CALLER.set("second")
            await probe.note.discard(Get())
        await trio.testing.wait_all_tasks_blocked()
        assert Probe.seen == saw(runner, "on_start", "note")


async def test_on_stop_after_a_crash_does_not_see_the_callers_context(autojump_clock):
    APP.set("app")
    async with tc.open_runner(entities=[Probe], config=config()) as runner:
        CALLER.set("caller")
        probe = runner.client(Probe)("a")
        with pytest.raises(tc.RemoteError):
            await probe.boom(Boom("x"))
        await trio.testing.wait_all_tasks_blocked()
        assert Probe.seen == saw(runner, "on_start", "on_stop")


async def test_on_stop_of_an_entity_evicted_for_a_caller_does_not_see_its_context(
    autojump_clock,
):
    # At max_resident_entities, the caller's own call passivates the least
    # recently used entity to make room.
    APP.set("app")
    async with tc.open_runner(
        entities=[Probe], config=config(max_resident_entities=1)
    ) as runner:
        await runner.client(Probe)("a").quick(Get())
        CALLER.set("caller")
        await runner.client(Probe)("b").quick(Get())
        await trio.testing.wait_all_tasks_blocked()
        assert Probe.seen == [
            *saw(runner, "on_start", "quick"),
            *saw(runner, "on_start", "quick", entity="b"),
            *saw(runner, "on_stop"),  # in a task of its own
        ]


async def test_a_local_broadcast_handler_does_not_see_the_callers_context(
    autojump_clock,
):
    seen: list[tuple[str, str]] = []

    async def note(msg: Add) -> None:
        seen.append((CALLER.get("-"), APP.get("-")))

    APP.set("app")
    async with tc.open_runner(
        config=config(), broadcasts=[tc.Broadcast("note", note)]
    ) as runner:
        CALLER.set("caller")
        assert await runner.broadcast("note", Add(1)) == 1
        await trio.testing.wait_all_tasks_blocked()
    assert seen == [("-", "app")]


async def test_the_owners_fast_path_does_not_keep_what_a_handler_set(autojump_clock):
    # Handlers that cannot suspend run on the owner's connection reader
    # task: one request's handler must not leave its variables to the next.
    storage, network = MemoryStorage(), MemoryNetwork()
    async with AsyncExitStack() as stack:
        runners = [
            await stack.enter_async_context(
                tc.open_runner(
                    entities=[Probe],
                    config=config(runner_address=tc.RunnerAddress("127.0.0.1", port)),
                    storage=storage,
                    transport=MemoryTransport(network),
                )
            )
            for port in (1, 2)
        ]
        with trio.fail_after(30):
            while not all(  # noqa: ASYNC110
                r.statistics().runners == 2
                and r.statistics().shards == r.statistics().shards_assigned > 0
                for r in runners
            ):
                await trio.sleep(0.1)
        sender, owner = runners
        client = sender.client(Probe)
        entity = next(
            f"e{i}"
            for i in range(1000)
            if client.address_of(f"e{i}").shard in owner.served_shards()
        )
        CALLER.set("caller")
        assert await client(entity).sets(Get()) == "handler"
        assert await client(entity).quick(Get()) == "-"
        assert owner.statistics().remote_calls == 0
        assert sender.statistics().remote_calls == 2


# ----------------------------------------------------------------------
# run_in, driven by hand (no Trio: each step is what a scheduler would do)


@types.coroutine
def _suspend(value: str) -> Generator[str, str, str]:
    return (yield value)


async def _body(log: list[str]) -> str:
    CALLER.set("body")
    try:
        got = await _suspend("first")
        log.append(f"{got} {CALLER.get()}")
        try:
            await _suspend("second")
        except ValueError as exc:
            log.append(f"caught {exc} {CALLER.get()}")
        await _suspend("third")
    finally:
        log.append(f"finally {CALLER.get()}")
    return CALLER.get()


def test_run_in_runs_every_step_in_its_context():
    log: list[str] = []
    context = contextvars.Context()
    steps = run_in(context, _body(log))
    CALLER.set("outside")
    assert steps.send(None) == "first"
    assert CALLER.get() == "outside"
    assert steps.send("sent") == "second"
    assert steps.throw(ValueError("thrown")) == "third"
    with pytest.raises(StopIteration) as done:
        steps.send(None)
    assert done.value.value == "body"
    assert log == ["sent body", "caught thrown body", "finally body"]
    assert CALLER.get() == "outside"
    assert context[CALLER] == "body"


def test_run_in_closes_its_coroutine_in_its_context():
    log: list[str] = []
    steps = run_in(contextvars.Context(), _body(log))
    assert steps.send(None) == "first"
    steps.close()
    assert log == ["finally body"]


async def test_run_in_is_cancelled_with_the_awaiting_task(autojump_clock):
    async def nap() -> None:
        await trio.sleep(10)

    with trio.move_on_after(1):
        await run_in(contextvars.Context(), nap())
    assert trio.current_time() == 1
