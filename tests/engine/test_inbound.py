"""Requests from other runners, the owner's side
(`trio_cluster._engine._inbound`): interrupts, unknown entity types, and
requests in another mode than their handler's."""

from __future__ import annotations

import logging
import math
from contextlib import AsyncExitStack
from typing import Any

import msgpack
import pytest
import trio

import trio_cluster as tc
from trio_cluster._engine._wire import Kind, Mode, address_fields
from trio_cluster.transport import MemoryTransport

from ..helpers import Add, Count, config
from ..memory_cluster import Nap, Tally, open_cluster
from .test_remote_streams import open_raw_caller


async def test_cancelling_a_remote_call_interrupts_the_handler(autojump_clock):
    Tally.naps_finished = 0
    async with AsyncExitStack() as stack:
        cluster = await open_cluster(stack, [1, 2])
        first = cluster.runners[1]
        entity = cluster.remote_id(first)
        with trio.move_on_after(1):
            await first.client(Tally)(entity).nap(Nap(10))
        await trio.sleep(20)
        assert Tally.naps_finished == 0
        await first.client(Tally)(entity).nap(Nap(0.5))
        assert Tally.naps_finished == 1


async def test_an_interrupt_right_behind_its_request_stops_the_handler(
    autojump_clock,
):
    # The request is granted its permit at once (the entity is idle) and its
    # task starts at the next scheduling round; the interrupt arrived in the
    # same frame, before the handler had a cancel scope, and was lost: the
    # handler ran its whole nap (found by the wire fuzzing suite, where a
    # handler that never returns then kept its entity busy for good).
    Tally.naps_finished = 0
    async with AsyncExitStack() as stack:
        cluster = await open_cluster(stack, [1])
        owner = cluster.runners[1]
        raw, answers = await open_raw_caller(stack, cluster)
        nap = msgpack.packb({"seconds": 10.0})
        for call_id in (1, 2):
            request = raw_request(owner, call_id, Mode.CALL, "nap", nap)
            raw.send_nowait(owner.address, request)
            raw.send_nowait(owner.address, [Kind.INTERRUPT, call_id])
        # A stream too: interrupted before its generator started.
        count = msgpack.packb({"upto": 3})
        raw.send_nowait(
            owner.address, raw_request(owner, 3, Mode.STREAM, "count", count)
        )
        raw.send_nowait(owner.address, [Kind.INTERRUPT, 3])
        await trio.sleep(30)
        assert Tally.naps_finished == 0
        assert not any(e[0] == Kind.STREAM_ITEM for e in answers.envelopes())
        # The entity is free for the next caller.
        with trio.fail_after(5):
            await owner.client(Tally)("m").nap(Nap(0.5))
        assert Tally.naps_finished == 1


async def test_unknown_entity_type_on_the_owner_is_a_typed_error(autojump_clock):
    class Stranger(tc.Entity):
        type_name = "cluster.Stranger"

        @tc.rpc
        async def hello(self, msg: Add) -> int:
            return msg.amount

    async with AsyncExitStack() as stack:
        cluster = await open_cluster(stack, [1])
        # A runner that knows Stranger, the other does not (a rolling deploy).
        lonely = await stack.enter_async_context(
            tc.open_runner(
                entities=[Tally, Stranger],
                config=config(runner_address=tc.RunnerAddress("127.0.0.1", 9)),
                storage=cluster.storage,
                transport=MemoryTransport(cluster.network),
            )
        )
        cluster.runners[9] = lonely
        await cluster.settled()
        client = lonely.client(Stranger)
        for i in range(100):
            address = client.address_of(f"s{i}")
            if address.shard not in lonely.served_shards():
                break
        with pytest.raises(tc.UnknownEntityTypeError):
            await client(f"s{i}").hello(Add(1))


# ----------------------------------------------------------------------
# A request runs only in its handler's delivery mode (issue 12, item 5)


def raw_request(
    runner: tc.Runner, call_id: int, mode: Mode, tag: str, payload: bytes
) -> list[Any]:
    address = runner.client(Tally).address_of("m")
    return [Kind.REQUEST, call_id, mode, *address_fields(address), tag, payload, None]


def refusal(runner: tc.Runner, envelope: list[Any]) -> BaseException:
    """The error a refused request was answered with."""
    codec = runner._registry.generic_reply
    if envelope[0] == Kind.STREAM_END:
        assert envelope[2] == 0
        exit_ = codec.decode_stream_end(envelope[3])
    else:
        assert envelope[0] == Kind.REPLY
        exit_ = codec.decode_exit(envelope[2])
    assert exit_.error is not None, exit_
    return exit_.error


async def test_a_raw_request_never_runs_a_persisted_handler(autojump_clock, caplog):
    # Regression (issue 12, item 5): a plain REQUEST naming a persisted
    # handler ran it volatile: not stored, not deduplicated, a transactional
    # handler's effects applied again.
    async with AsyncExitStack() as stack:
        cluster = await open_cluster(stack, [1])
        owner = cluster.runners[1]
        raw, answers = await open_raw_caller(stack, cluster)
        payload = msgpack.packb({"amount": 5})
        with caplog.at_level(logging.WARNING, "trio_cluster.transport"):
            for call_id, mode in ((1, Mode.CALL), (2, Mode.DISCARD), (3, Mode.STREAM)):
                raw.send_nowait(
                    owner.address,
                    raw_request(owner, call_id, mode, "add_persisted", payload),
                )
            await trio.sleep(5)
        # Answered with a typed error (a discard gets no answer), never run.
        call, stream = answers.envelopes()
        assert call[:2] == [Kind.REPLY, 1]
        assert stream[:2] == [Kind.STREAM_END, 3]
        for envelope in (call, stream):
            error = refusal(owner, envelope)
            assert isinstance(error, tc.MalformedMessageError)
            assert "add_persisted is persisted" in str(error)
        dropped = [
            r.getMessage()
            for r in caplog.records
            if "dropped a malformed envelope" in r.getMessage()
        ]
        assert len(dropped) == 3, dropped
        assert owner.statistics().persisted_delivered == 0
        tally = owner.client(Tally)("m")
        assert (await tally.add(Add(0))).total == 0
        # Called as declared, it is stored and delivered once.
        assert (await tally.add_persisted(Add(5))).total == 5
        assert owner.statistics().persisted_delivered == 1
        assert (await tally.add(Add(0))).total == 5


@pytest.mark.parametrize(
    ("mode", "tag", "payload", "problem"),
    [
        (Mode.CALL, "numbers", {"upto": 3}, "Tally.numbers is a stream handler"),
        (Mode.DISCARD, "numbers", {"upto": 3}, "Tally.numbers is a stream handler"),
        (Mode.STREAM, "add", {"amount": 5}, "Tally.add is an rpc handler"),
    ],
    ids=["call a stream", "discard a stream", "stream an rpc"],
)
async def test_a_request_in_another_mode_than_its_handlers_is_refused(
    autojump_clock, caplog, mode, tag, payload, problem
):
    Tally.produced = Tally.numbers_closed = 0
    async with AsyncExitStack() as stack:
        cluster = await open_cluster(stack, [1])
        owner = cluster.runners[1]
        raw, answers = await open_raw_caller(stack, cluster)
        request = raw_request(owner, 1, mode, tag, msgpack.packb(payload))
        with caplog.at_level(logging.WARNING, "trio_cluster.transport"):
            raw.send_nowait(owner.address, request)
            await trio.sleep(5)
        assert any(
            "dropped a malformed envelope" in r.getMessage()
            and problem in r.getMessage()
            for r in caplog.records
        )
        if mode is Mode.DISCARD:
            assert answers.envelopes() == []
        else:
            [answer] = answers.envelopes()
            assert answer[1] == 1
            error = refusal(owner, answer)
            assert isinstance(error, tc.MalformedMessageError)
            assert problem in str(error)
        # Nothing ran: no item made, the total untouched; it serves on.
        assert Tally.produced == Tally.numbers_closed == 0
        tally = owner.client(Tally)("m")
        assert (await tally.add(Add(0))).total == 0
        async with tally.count(Count(2)) as items:
            assert [item async for item in items] == [0, 1]


@pytest.mark.parametrize("left", [math.nan, math.inf, -math.inf, -1.0, 1e300, True])
async def test_a_request_with_a_bad_deadline_is_dropped_and_the_runner_serves_on(
    autojump_clock, caplog, left
):
    # Issue 12, item 1: NaN seconds left made the owner's shard task raise
    # ("deadline must not be NaN") and ended the runner.
    async with AsyncExitStack() as stack:
        cluster = await open_cluster(stack, [1])
        owner = cluster.runners[1]
        raw, handler = await open_raw_caller(stack, cluster)
        address = owner.client(Tally).address_of("napper")
        payload = msgpack.packb({"seconds": 0.5})

        def request(call_id: int, seconds_left: object) -> list[object]:
            return [
                Kind.REQUEST,
                call_id,
                Mode.CALL,
                *address_fields(address),
                "nap",
                payload,
                seconds_left,
            ]

        with caplog.at_level(logging.WARNING, "trio_cluster.transport"):
            raw.send_nowait(owner.address, request(1, left))
            await trio.sleep(2)
        assert [r for r in caplog.records if "malformed" in r.getMessage()]
        raw.send_nowait(owner.address, request(2, 5.0))
        await trio.sleep(2)
        assert [e[:2] for e in handler.envelopes()] == [[Kind.REPLY, 2]]
        assert handler.lost == []
        await owner.client(Tally)("napper").nap(Nap(0.5))
        assert (await owner.client(Tally)("napper").add(Add(1))).total == 1


async def test_a_request_in_the_wrong_mode_gets_an_error_and_the_entity_lives_on(
    autojump_clock,
):
    # A stream handler requested for one reply, or an rpc as a stream, ran
    # the handler the wrong way and crashed (and restarted) its entity.
    async with AsyncExitStack() as stack:
        cluster = await open_cluster(stack, [1])
        owner = cluster.runners[1]
        tally = owner.client(Tally)("keeper")
        assert (await tally.add(Add(5))).total == 5
        raw, handler = await open_raw_caller(stack, cluster)
        address = address_fields(owner.client(Tally).address_of("keeper"))
        for call_id, mode, tag, payload in [
            (1, Mode.CALL, "count", {"upto": 3}),
            (2, Mode.DISCARD, "count", {"upto": 3}),
            (3, Mode.STREAM, "add", {"amount": 1}),
        ]:
            envelope = [Kind.REQUEST, call_id, mode, *address, tag]
            raw.send_nowait(owner.address, [*envelope, msgpack.packb(payload), None])
        await trio.sleep(1)
        answers = {e[1]: e for e in handler.envelopes()}
        assert sorted(answers) == [1, 3]
        assert answers[1][0] == Kind.REPLY
        assert answers[3][:3] == [Kind.STREAM_END, 3, 0]
        assert (await tally.add(Add(1))).total == 6


async def test_a_request_naming_another_shard_than_its_entitys_is_refused(
    autojump_clock,
):
    # A REQUEST may name any shard: one this runner serves, for an entity
    # whose own shard is elsewhere, ran a second instance of that entity here
    # (one per shard named), beside the real one on its owner.
    async with AsyncExitStack() as stack:
        cluster = await open_cluster(stack, [1])
        owner = cluster.runners[1]
        raw, answers = await open_raw_caller(stack, cluster)
        home = owner.client(Tally).address_of("m")
        other = tc.ShardId(home.shard.group, home.shard.number % 8 + 1)
        elsewhere = tc.EntityAddress(home.entity_type, home.entity_id, other)
        payload = msgpack.packb({"amount": 5})
        raw.send_nowait(
            owner.address,
            [
                Kind.REQUEST,
                1,
                Mode.CALL,
                *address_fields(elsewhere),
                "add",
                payload,
                None,
            ],
        )
        await trio.sleep(1)
        [answer] = answers.envelopes()
        error = refusal(owner, answer)
        assert isinstance(error, tc.MalformedMessageError)
        assert f"belongs to shard {home.shard}" in str(error)
        # Nothing ran: the real entity has seen no message.
        assert (await owner.client(Tally)("m").add(Add(1))).total == 1
