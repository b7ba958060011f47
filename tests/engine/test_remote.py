"""Calls to entities on other runners, the caller's side
(`trio_cluster._engine._remote`), over the memory transport."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AsyncExitStack
from typing import Any

import pytest
import trio
import trio.testing

import trio_cluster as tc
from trio_cluster._core._addresses import EntityAddress, EntityId, ShardId
from trio_cluster._engine._remote import NotSent, OutboundCalls
from trio_cluster._engine._wire import Kind
from trio_cluster._registry import Handler, Registry
from trio_cluster._transport_abc import Endpoint
from trio_cluster.serialization._converter import make_converter
from trio_cluster.serialization._replies import Exit

from ..helpers import Add, Count, config
from ..memory_cluster import Nap, Tally, Where, open_cluster


async def test_volatile_calls_run_on_the_owner(autojump_clock):
    async with AsyncExitStack() as stack:
        cluster = await open_cluster(stack, [1, 2])
        first = cluster.runners[1]
        entity = cluster.remote_id(first)
        owner = cluster.owner(entity)
        tally = first.client(Tally)(entity)
        assert await tally.add(Add(2)) == Where(str(owner.address), 2)
        assert await tally.add(Add(3)) == Where(str(owner.address), 5)
        assert first.statistics().remote_calls == 2
        latency = first.statistics().call_latency["volatile"]
        assert latency.count == 2


async def test_many_concurrent_remote_calls_keep_per_entity_order(autojump_clock):
    async with AsyncExitStack() as stack:
        cluster = await open_cluster(stack, [1, 2])
        first = cluster.runners[1]
        entity = cluster.remote_id(first)
        seen: list[int] = []

        async def add(n: int) -> None:
            seen.append((await first.client(Tally)(entity).add(Add(1))).total)

        async with trio.open_nursery() as nursery:
            for n in range(200):
                nursery.start_soon(add, n)
        assert sorted(seen) == list(range(1, 201))


async def test_remote_discard_and_persisted_calls(autojump_clock):
    async with AsyncExitStack() as stack:
        cluster = await open_cluster(stack, [1, 2])
        first = cluster.runners[1]
        entity = cluster.remote_id(first)
        tally = first.client(Tally)(entity)
        await tally.add.discard(Add(10))
        answer = await tally.add_persisted(Add(1))
        assert answer == Where(str(cluster.owner(entity).address), 11)


async def test_remote_stream(autojump_clock):
    async with AsyncExitStack() as stack:
        cluster = await open_cluster(stack, [1, 2])
        first = cluster.runners[1]
        entity = cluster.remote_id(first)
        async with first.client(Tally)(entity).count(Count(50)) as items:
            assert [item async for item in items] == list(range(50))


async def test_remote_stream_of_attrs_items_ends_cleanly(autojump_clock):
    # Regression: the end of the stream was encoded with the item codec,
    # which cannot encode None for an attrs item type, so the caller got
    # MalformedMessageError after the last item.
    async with AsyncExitStack() as stack:
        cluster = await open_cluster(stack, [1, 2])
        first = cluster.runners[1]
        entity = cluster.remote_id(first)
        async with first.client(Tally)(entity).tallies(Count(3)) as items:
            assert [item async for item in items] == [
                Where("here", n) for n in range(3)
            ]
        async with first.client(Tally)(entity).tallies(Count(0)) as items:
            assert [item async for item in items] == []


@pytest.mark.parametrize("kind", ["call", "stream"])
async def test_a_remote_call_fails_when_its_own_runner_shuts_down(autojump_clock, kind):
    # Regression: a call waiting on another runner hung until cancelled when
    # the caller's own runner shut down meanwhile.
    outcome: list[BaseException] = []
    async with AsyncExitStack() as stack:
        cluster = await open_cluster(stack, [1, 2], entity_termination_timeout=1)
        first = cluster.runners[1]
        entity = cluster.remote_id(first)
        tally = first.client(Tally)(entity)

        async def wait_on_the_other_runner() -> None:
            try:
                if kind == "call":
                    await tally.nap(Nap(100))
                else:
                    async with tally.slow_count(Count(100)) as items:
                        async for _ in items:
                            pass
            except tc.ClusterError as exc:
                outcome.append(exc)

        with trio.fail_after(60):  # it hung: fail on virtual time instead
            async with trio.open_nursery() as nursery:
                nursery.start_soon(wait_on_the_other_runner)
                await trio.testing.wait_all_tasks_blocked()
                started = trio.current_time()
                cluster.stop(1)
        assert trio.current_time() - started < 10
    assert [type(exc) for exc in outcome] == [tc.RunnerClosedError]


# ----------------------------------------------------------------------
# How a call's request is sent (OutboundCalls with a recording endpoint)


class _Sending(Endpoint):
    """Records what is sent; `send` (the calling task writes) can be made
    to fail, or be cancelled after queueing."""

    def __init__(self, fail: Exception | None = None) -> None:
        self.nowait: list[list[Any]] = []
        self.sent: list[list[Any]] = []
        self.fail = fail
        self.answer: Callable[[list[Any]], None] | None = None

    @property
    def address(self) -> tc.RunnerAddress:
        return tc.RunnerAddress("127.0.0.1", 7000)

    def send_nowait(self, peer: tc.RunnerAddress, envelope: list[Any]) -> None:
        self.nowait.append(envelope)

    async def send(self, peer: tc.RunnerAddress, envelope: list[Any]) -> None:
        if self.fail is not None:
            raise self.fail
        self.sent.append(envelope)
        if self.answer is not None:
            self.answer(envelope)  # the answer arrives while still sending
        await trio.lowlevel.checkpoint()

    def is_connected(self, peer: tc.RunnerAddress) -> bool:
        return True


def _add_handler() -> Handler:
    registry = Registry([Tally], config=config(), converter=make_converter())
    return registry.types[Tally.type_name].by_attribute["add"]


_OWNER = tc.RunnerAddress("127.0.0.1", 7001)
_WHERE = EntityAddress(Tally.type_name, EntityId("e"), ShardId("default", 1))


async def test_the_only_call_is_sent_by_send_and_may_be_answered_meanwhile():
    endpoint = _Sending()
    calls = OutboundCalls(endpoint)
    handler = _add_handler()
    reply = handler.reply.encode_exit(Exit(value=Where("owner", 3)))
    endpoint.answer = lambda envelope: calls.reply(_OWNER, envelope[1], reply)
    with trio.fail_after(1):
        result = await calls.call(_OWNER, _WHERE, handler, b"\x80")
    assert result == Where("owner", 3)
    assert len(endpoint.sent) == 1
    assert endpoint.nowait == []


async def test_a_call_made_while_others_wait_is_queued():
    endpoint = _Sending()
    calls = OutboundCalls(endpoint)
    handler = _add_handler()
    async with trio.open_nursery() as nursery:
        for _ in range(3):
            nursery.start_soon(calls.call, _OWNER, _WHERE, handler, b"\x80")
        await trio.testing.wait_all_tasks_blocked()
        assert len(endpoint.sent) == 1
        assert len(endpoint.nowait) == 2
        nursery.cancel_scope.cancel()


async def test_a_refused_send_is_not_sent_and_not_interrupted():
    endpoint = _Sending(fail=tc.RunnerUnavailableError(runner="x", detail="full"))
    calls = OutboundCalls(endpoint)
    with pytest.raises(NotSent):
        await calls.call(_OWNER, _WHERE, _add_handler(), b"\x80")
    assert endpoint.nowait == []  # no interrupt
    assert calls._pending == {}


async def test_a_call_cancelled_in_send_interrupts_the_owner():
    endpoint = _Sending()
    calls = OutboundCalls(endpoint)
    with trio.CancelScope() as scope:
        scope.cancel()
        await calls.call(_OWNER, _WHERE, _add_handler(), b"\x80")
    assert scope.cancelled_caught
    [request] = endpoint.sent
    assert endpoint.nowait == [[Kind.INTERRUPT, request[1]]]
    assert calls._pending == {}


class _Caller:
    """Calls through `OutboundCalls` with a recording endpoint, each answer
    in ``results``; ``reply`` is the owner's answer ``Where("owner", n)``."""

    def __init__(self, n: int) -> None:
        self.endpoint = _Sending()
        self.calls = OutboundCalls(self.endpoint)
        self.handler = _add_handler()
        self.reply = self.handler.reply.encode_exit(Exit(value=Where("owner", n)))
        self.results: list[Any] = []

    async def call(self) -> None:
        answer = await self.calls.call(_OWNER, _WHERE, self.handler, b"\x80")
        self.results.append(answer)


async def test_a_call_cancelled_while_waiting_interrupts_and_a_late_reply_wakes_nobody():
    caller = _Caller(1)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(caller.call)  # the first: sent by `send`
        await trio.testing.wait_all_tasks_blocked()
        async with trio.open_nursery() as doomed:
            doomed.start_soon(caller.call)  # queued behind the first
            await trio.testing.wait_all_tasks_blocked()
            doomed.cancel_scope.cancel()
        assert doomed.cancel_scope.cancelled_caught
        [first] = caller.endpoint.sent
        [second, interrupt] = caller.endpoint.nowait
        assert interrupt == [Kind.INTERRUPT, second[1]]
        # The late answer to the cancelled call changes nothing; the other
        # call still gets its own.
        caller.calls.reply(_OWNER, second[1], caller.reply)
        await trio.testing.wait_all_tasks_blocked()
        assert caller.results == []
        caller.calls.reply(_OWNER, first[1], caller.reply)
    assert caller.results == [Where("owner", 1)]
    assert caller.calls._pending == {}


async def test_a_reply_counts_from_the_runner_asked_only():
    caller = _Caller(2)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(caller.call)
        await trio.testing.wait_all_tasks_blocked()
        [request] = caller.endpoint.sent
        other = tc.RunnerAddress("127.0.0.1", 7002)
        caller.calls.reply(other, request[1], caller.reply)
        await trio.testing.wait_all_tasks_blocked()
        assert caller.results == []
        # The same address, as another object (the transport's own): it is
        # the runner asked.
        owner = tc.RunnerAddress("127.0.0.1", 7001)
        caller.calls.reply(owner, request[1], caller.reply)
    assert caller.results == [Where("owner", 2)]


# ----------------------------------------------------------------------
# The caller's deadline travels with its request


async def _request_sent_by(caller: Callable[[OutboundCalls], Any]) -> list[Any]:
    """The ``REQUEST`` envelope of the one call ``caller`` makes (the call
    is then cancelled: no answer comes)."""
    endpoint = _Sending()
    calls = OutboundCalls(endpoint)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(caller, calls)
        await trio.testing.wait_all_tasks_blocked()
        nursery.cancel_scope.cancel()
    [request] = endpoint.sent
    assert request[0] == Kind.REQUEST
    return request


async def test_a_request_carries_no_time_left_when_the_caller_has_no_deadline(
    autojump_clock,
):
    async def caller(calls: OutboundCalls) -> None:
        await calls.call(_OWNER, _WHERE, _add_handler(), b"\x80")

    request = await _request_sent_by(caller)
    assert request[9] is None


async def test_a_request_carries_the_time_its_caller_has_left(autojump_clock):
    async def caller(calls: OutboundCalls) -> None:
        with trio.move_on_after(30):
            with trio.CancelScope():  # a scope without a deadline between
                with trio.move_on_after(12.5):
                    await calls.call(_OWNER, _WHERE, _add_handler(), b"\x80")

    request = await _request_sent_by(caller)
    assert request[9] == 12.5


async def test_a_shielded_caller_sends_no_deadline_from_above_its_shield(
    autojump_clock,
):
    async def caller(calls: OutboundCalls) -> None:
        with trio.move_on_after(5), trio.CancelScope(shield=True):
            with trio.move_on_after(1e12):  # beyond the wire's limit: none
                await calls.call(_OWNER, _WHERE, _add_handler(), b"\x80")

    endpoint = _Sending()
    await caller(OutboundCalls(endpoint))  # ends at the far deadline
    [request] = endpoint.sent
    assert request[9] is None


async def test_a_cancelled_caller_sends_no_time_left(autojump_clock):
    endpoint = _Sending()
    with trio.move_on_after(30) as scope:
        scope.cancel()
        await OutboundCalls(endpoint).call(_OWNER, _WHERE, _add_handler(), b"\x80")
    [request] = endpoint.sent
    assert request[9] == 0
