"""Remote streams over a faulty memory network (`trio_cluster._engine._remote`
and `._inbound`): items are numbered and credit is cumulative, so frames the
transport delivers twice change nothing."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

import msgpack
import pytest
import trio

import trio_cluster as tc
from trio_cluster._core._addresses import EntityAddress, EntityId, ShardId
from trio_cluster._engine._remote import OutboundCalls
from trio_cluster._engine._streams import CREDIT_BATCH, STREAM_BUFFER, StreamReceiver
from trio_cluster._engine._wire import Kind, Mode, address_fields
from trio_cluster._registry import Handler, Registry
from trio_cluster._transport_abc import Endpoint
from trio_cluster.serialization._converter import make_converter
from trio_cluster.serialization._replies import STREAM_END
from trio_cluster.testing import RecordingHandler
from trio_cluster.transport import FrameFault, MemoryTransport, RandomFaults
from trio_cluster.transport._faults import FaultHook

from ..helpers import Add, Count, config
from ..memory_cluster import Cluster, Refused, Tally, Where, open_cluster

AHEAD = 2 * STREAM_BUFFER + 2
"""How far a stream's generator may run ahead of its remote consumer: the
credit window on the wire, the owner's channel, the item the pump holds and
the one the generator is sending."""


def duplicating(sender: tc.RunnerAddress, receiver: tc.RunnerAddress) -> FaultHook:
    """A fault hook that delivers every frame from ``sender`` to
    ``receiver`` twice."""

    def hook(frm: tc.RunnerAddress, to: tc.RunnerAddress) -> FrameFault | None:
        return FrameFault(duplicate=True) if (frm, to) == (sender, receiver) else None

    return hook


async def test_duplicated_item_frames_deliver_each_item_once_in_order(
    autojump_clock,
):
    async with AsyncExitStack() as stack:
        cluster = await open_cluster(stack, [1, 2])
        first = cluster.runners[1]
        entity = cluster.remote_id(first)
        owner = cluster.owner(entity)
        cluster.network.fault = duplicating(owner.address, first.address)
        tally = first.client(Tally)(entity)
        async with tally.count(Count(100)) as items:
            assert [item async for item in items] == list(range(100))
        async with tally.tallies(Count(40)) as items:
            assert [item async for item in items] == [
                Where("here", n) for n in range(40)
            ]
        async with tally.count(Count(0)) as items:
            assert [item async for item in items] == []


async def test_duplicated_credit_frames_keep_the_producer_within_its_window(
    autojump_clock,
):
    Tally.produced = Tally.numbers_closed = 0
    async with AsyncExitStack() as stack:
        cluster = await open_cluster(stack, [1, 2])
        first = cluster.runners[1]
        entity = cluster.remote_id(first)
        owner = cluster.owner(entity)
        cluster.network.fault = duplicating(first.address, owner.address)
        read: list[int] = []
        lead: list[int] = []
        async with first.client(Tally)(entity).numbers(Count(0)) as items:
            for _ in range(200):
                read.append(await items.__anext__())
                # A slow consumer: the producer runs as far ahead as it may.
                await trio.sleep(1)
                lead.append(Tally.produced - len(read))
        assert max(lead) <= AHEAD, lead  # it was over 200 ahead
        assert read == list(range(200))  # and the overflow was dropped
        await trio.sleep(1)
        assert Tally.numbers_closed == 1  # leaving early interrupted it


async def test_streams_survive_random_duplication_both_ways(autojump_clock):
    async with AsyncExitStack() as stack:
        cluster = await open_cluster(stack, [1, 2])
        first = cluster.runners[1]
        entity = cluster.remote_id(first)
        cluster.network.fault = RandomFaults(7, duplicate=0.5)
        tally = first.client(Tally)(entity)
        for upto in (1, 17, 300):
            async with tally.count(Count(upto)) as items:
                assert [item async for item in items] == list(range(upto))


async def test_lost_items_end_the_stream_with_a_typed_error(autojump_clock):
    # A frame of items lost in transit (the connection stays up): the
    # consumer gets RunnerUnavailableError after the items before the gap,
    # never the later items as if nothing was missing, and the generator on
    # the owner is interrupted.
    Tally.produced = Tally.numbers_closed = 0
    async with AsyncExitStack() as stack:
        cluster = await open_cluster(stack, [1, 2])
        first = cluster.runners[1]
        entity = cluster.remote_id(first)
        owner = cluster.owner(entity)
        frames = 0

        def drop_the_third(frm, to):
            nonlocal frames
            if (frm, to) != (owner.address, first.address):
                return None
            frames += 1
            return FrameFault(drop=frames == 3)

        cluster.network.fault = drop_the_third
        tally = first.client(Tally)(entity)
        read: list[int] = []
        # (Before items were numbered, the stream went on past the gap.)
        caught: list[tc.RunnerUnavailableError] = []
        with trio.fail_after(1000):
            async with tally.numbers(Count(0)) as items:
                try:
                    async for item in items:
                        read.append(item)
                        await trio.sleep(1)
                except tc.RunnerUnavailableError as exc:
                    caught.append(exc)
        [error] = caught
        assert "stream items lost in transit" in str(error)
        assert error.runner == str(owner.address)
        assert read == list(range(len(read)))
        assert len(read) >= 1
        await trio.sleep(1)
        assert Tally.numbers_closed == 1
        cluster.network.fault = None
        async with tally.count(Count(20)) as items:
            assert [item async for item in items] == list(range(20))


# ----------------------------------------------------------------------
# The owner's side, driven by a hand-made caller on the memory network


async def open_raw_caller(
    stack: AsyncExitStack, cluster: Cluster
) -> tuple[Endpoint, RecordingHandler]:
    handler = RecordingHandler()
    endpoint = await stack.enter_async_context(
        MemoryTransport(cluster.network).open_endpoint(
            tc.RunnerAddress("127.0.0.1", 99), handler
        )
    )
    return endpoint, handler


def stream_request(
    runner: tc.Runner, call_id: int, entity: str, tag: str, payload: bytes
) -> list[Any]:
    address = runner.client(Tally).address_of(entity)
    return [
        Kind.REQUEST,
        call_id,
        Mode.STREAM,
        *address_fields(address),
        tag,
        payload,
        None,
    ]


def numbers_of(handler: RecordingHandler, call_id: int) -> list[int]:
    return [
        envelope[2]
        for envelope in handler.envelopes()
        if envelope[:2] == [Kind.STREAM_ITEM, call_id]
    ]


async def test_the_owner_numbers_items_and_keeps_to_the_cumulative_limit(
    autojump_clock,
):
    async with AsyncExitStack() as stack:
        cluster = await open_cluster(stack, [1])
        owner = cluster.runners[1]
        raw, handler = await open_raw_caller(stack, cluster)
        payload = msgpack.packb({"upto": 40})
        raw.send_nowait(owner.address, stream_request(owner, 1, "s", "count", payload))
        await trio.sleep(1)
        # The request grants the first STREAM_BUFFER items.
        assert numbers_of(handler, 1) == list(range(1, STREAM_BUFFER + 1))
        # A limit that does not grow (repeated, late) grants nothing.
        for limit in (STREAM_BUFFER, 3, 0, STREAM_BUFFER):
            raw.send_nowait(owner.address, [Kind.STREAM_CREDIT, 1, limit])
        await trio.sleep(1)
        assert numbers_of(handler, 1) == list(range(1, STREAM_BUFFER + 1))
        # The same credit three times grants once.
        for _ in range(3):
            raw.send_nowait(owner.address, [Kind.STREAM_CREDIT, 1, 20])
        await trio.sleep(1)
        assert numbers_of(handler, 1) == list(range(1, 21))
        raw.send_nowait(owner.address, [Kind.STREAM_CREDIT, 1, 100])
        await trio.sleep(1)
        assert numbers_of(handler, 1) == list(range(1, 41))
        values = [
            msgpack.unpackb(envelope[3])
            for envelope in handler.envelopes()
            if envelope[0] == Kind.STREAM_ITEM
        ]
        assert values == list(range(40))
        [end] = [e for e in handler.envelopes() if e[0] == Kind.STREAM_END]
        assert end[:3] == [Kind.STREAM_END, 1, 40]
        assert handler.envelopes()[-1] == end


async def test_bad_stream_counters_are_dropped_and_the_runner_keeps_serving(
    autojump_clock, caplog
):
    async with AsyncExitStack() as stack:
        cluster = await open_cluster(stack, [1])
        owner = cluster.runners[1]
        raw, handler = await open_raw_caller(stack, cluster)
        payload = msgpack.packb({"upto": 3})
        with caplog.at_level(logging.WARNING, "trio_cluster.transport"):
            for envelope in (
                [Kind.STREAM_CREDIT, 1, -1],
                [Kind.STREAM_CREDIT, 1, 2**63],  # fine: a (very) large limit
                [Kind.STREAM_ITEM, 1, 0, b"\x00"],
                [Kind.STREAM_ITEM, 1, -5, b"\x00"],
                [Kind.STREAM_END, 1, -1, b""],
                [Kind.STREAM_CREDIT, 1, True],
                [Kind.STREAM_ITEM, 1, b"\x00"],  # the old shape
            ):
                raw.send_nowait(owner.address, envelope)
            raw.send_nowait(
                owner.address, stream_request(owner, 2, "s", "count", payload)
            )
            await trio.sleep(1)
        assert numbers_of(handler, 2) == [1, 2, 3]
        problems = [
            r.getMessage() for r in caplog.records if "malformed" in r.getMessage()
        ]
        assert len(problems) == 6, problems
        assert sum("is below" in text for text in problems) == 4
        assert handler.lost == []


# ----------------------------------------------------------------------
# The caller's side, fed envelopes by hand as the dispatcher would


OWNER = tc.RunnerAddress("127.0.0.1", 7001)
STRANGER = tc.RunnerAddress("127.0.0.1", 7002)


class SentEnvelopes(Endpoint):
    """An endpoint that records what is sent and delivers nothing."""

    def __init__(self) -> None:
        self.sent: list[tuple[tc.RunnerAddress, list[object]]] = []

    @property
    def address(self) -> tc.RunnerAddress:
        return tc.RunnerAddress("127.0.0.1", 7000)

    def send_nowait(self, peer: tc.RunnerAddress, envelope: list[Any]) -> None:
        self.sent.append((peer, envelope))

    def is_connected(self, peer: tc.RunnerAddress) -> bool:
        return True


def count_handler() -> Handler:
    registry = Registry([Tally], config=config(), converter=make_converter())
    return registry.types[Tally.type_name].by_attribute["count"]


class OpenStream:
    """An `OutboundCalls` stream to `OWNER` and what it sent."""

    def __init__(
        self, calls: OutboundCalls, endpoint: SentEnvelopes, items: StreamReceiver
    ) -> None:
        self.calls = calls
        self.endpoint = endpoint
        self.items = items
        [(peer, request)] = endpoint.sent
        assert peer == OWNER
        call_id = request[1]
        assert isinstance(call_id, int)
        self.call_id = call_id

    def item(
        self, number: int, value: object = None, *, peer: tc.RunnerAddress = OWNER
    ) -> None:
        value = number - 1 if value is None else value
        self.calls.stream_item(peer, self.call_id, number, msgpack.packb(value))

    def end(self, count: int, *, peer: tc.RunnerAddress = OWNER) -> None:
        self.calls.stream_end(peer, self.call_id, count, STREAM_END)

    def sent_after_request(self) -> list[list[object]]:
        return [envelope for _, envelope in self.endpoint.sent[1:]]

    async def read(self) -> list[object]:
        return [item async for item in self.items]


@asynccontextmanager
async def open_stream() -> AsyncIterator[OpenStream]:
    endpoint = SentEnvelopes()
    calls = OutboundCalls(endpoint)
    where = EntityAddress(Tally.type_name, EntityId("e"), ShardId("default", 1))
    async with calls.stream(OWNER, where, count_handler(), b"\x80") as items:
        yield OpenStream(calls, endpoint, items)


async def test_repeated_items_are_delivered_once(autojump_clock):
    async with open_stream() as stream:
        for number in (1, 1, 2, 1, 2, 3, 3):
            stream.item(number)
        stream.end(3)
        stream.end(3)
        assert await stream.read() == [0, 1, 2]
        assert stream.sent_after_request() == []  # no interrupt: it ended


async def test_a_gap_ends_the_stream_and_interrupts_the_owner(autojump_clock):
    async with open_stream() as stream:
        stream.item(1)
        stream.item(3)
        stream.item(4)  # too late: the stream is over
        assert await stream.items.__anext__() == 0
        with pytest.raises(tc.RunnerUnavailableError, match="lost in transit"):
            await stream.items.__anext__()
        assert stream.sent_after_request() == [[Kind.INTERRUPT, stream.call_id]]


async def test_lost_last_items_are_seen_at_the_end(autojump_clock):
    async with open_stream() as stream:
        stream.item(1)
        stream.end(3)
        assert await stream.items.__anext__() == 0
        with pytest.raises(tc.RunnerUnavailableError, match="after item 3"):
            await stream.items.__anext__()
        assert stream.sent_after_request() == []  # the owner ended it


@pytest.mark.parametrize(
    ("feed", "problem"),
    [
        pytest.param(
            lambda s: s.item(STREAM_BUFFER + 1), "beyond the credit", id="over-credit"
        ),
        pytest.param(lambda s: s.item(1, "text"), "reply", id="undecodable"),
    ],
)
async def test_a_bad_item_ends_the_stream_and_interrupts_the_owner(
    autojump_clock, feed, problem
):
    async with open_stream() as stream:
        with pytest.raises(tc.MalformedMessageError):  # for the dispatcher's log
            feed(stream)
        with pytest.raises(tc.MalformedMessageError, match=problem):
            await stream.items.__anext__()
        assert stream.sent_after_request() == [[Kind.INTERRUPT, stream.call_id]]


async def test_an_end_counting_fewer_items_than_received_is_malformed(
    autojump_clock,
):
    async with open_stream() as stream:
        stream.item(1)
        stream.item(2)
        with pytest.raises(tc.MalformedMessageError):
            stream.end(1)
        assert await stream.items.__anext__() == 0
        assert await stream.items.__anext__() == 1
        with pytest.raises(tc.MalformedMessageError, match="1 items sent"):
            await stream.items.__anext__()


async def test_answers_from_another_runner_are_ignored(autojump_clock):
    async with open_stream() as stream:
        stream.item(1, peer=STRANGER)
        stream.end(0, peer=STRANGER)
        stream.item(1)
        stream.end(1)
        assert await stream.read() == [0]


async def test_credit_is_a_cumulative_limit_raised_as_items_are_read(
    autojump_clock,
):
    async with open_stream() as stream:
        for number in range(1, STREAM_BUFFER + 1):
            stream.item(number)
        for _ in range(STREAM_BUFFER):
            await stream.items.__anext__()
        limits = [
            envelope[2]
            for envelope in stream.sent_after_request()
            if envelope[0] == Kind.STREAM_CREDIT
        ]
        assert limits == [
            STREAM_BUFFER + CREDIT_BATCH,
            STREAM_BUFFER + 2 * CREDIT_BATCH,
        ]


async def test_an_item_the_owner_cannot_encode_ends_the_stream(autojump_clock):
    # Without serialize_local_calls nothing checks an item before the owner
    # encodes it for the wire: it raised in the pump, a task of the shard.
    async with AsyncExitStack() as stack:
        cluster = await open_cluster(stack, [1, 2], serialize_local_calls=False)
        first = cluster.runners[1]
        entity = cluster.remote_id(first)
        tally = first.client(Tally)(entity)
        with trio.fail_after(100):
            async with tally.unsendable(Count(3)) as items:
                assert [await items.__anext__() for _ in range(3)] == [0, 1, 2]
                with pytest.raises(tc.MalformedMessageError, match="cannot encode"):
                    await items.__anext__()
            async with tally.count(Count(3)) as items:
                assert [item async for item in items] == [0, 1, 2]


async def test_an_item_the_caller_cannot_decode_interrupts_the_owner(
    autojump_clock,
):
    # The consumer got the error, but the generator ran on at the owner
    # until the connection closed.
    Tally.numbers_closed = 0
    async with AsyncExitStack() as stack:
        cluster = await open_cluster(stack, [1, 2], serialize_local_calls=False)
        first = cluster.runners[1]
        entity = cluster.remote_id(first)
        tally = first.client(Tally)(entity)
        with trio.fail_after(100):
            async with tally.mistyped(Count(2)) as items:
                assert [await items.__anext__() for _ in range(2)] == [0, 1]
                with pytest.raises(tc.MalformedMessageError):
                    await items.__anext__()
            await trio.sleep(1)
            assert Tally.numbers_closed == 1


async def test_streams_whose_shard_moves_away_end_with_a_typed_error(
    autojump_clock,
):
    # A third runner takes some shards of the second: their streams, read
    # from the first runner (remote) and from the second itself (local),
    # end with EntityNotAssignedError after the items sent. The end was
    # lost with the shard's nursery (the producer's and the pump's): their
    # consumers waited forever, and one that was not reading when the shard
    # stopped saw a clean end.
    async with AsyncExitStack() as stack:
        cluster = await open_cluster(stack, [1, 2])
        first, second = cluster.runners[1], cluster.runners[2]
        served = [f"e{i}" for i in range(120) if cluster.owner(f"e{i}") is second]
        remote, stalled = set(served[1::3]), set(served[2::3])
        outcome: dict[str, str] = {}

        async def consume(entity: str) -> None:
            runner = first if entity in remote else second
            client = runner.client(Tally)(entity)
            try:
                async with client.slow_count(Count(1)) as items:
                    if entity in stalled:
                        await trio.sleep(100)  # its channel fills up
                    async for _ in items:
                        pass
            except tc.EntityNotAssignedError as exc:
                outcome[entity] = exc.detail
            else:
                outcome[entity] = "ended cleanly"

        nursery = await stack.enter_async_context(trio.open_nursery())
        stack.callback(nursery.cancel_scope.cancel)
        for entity in served:
            nursery.start_soon(consume, entity)
        await trio.sleep(2 * STREAM_BUFFER)
        await cluster.start(3)
        await cluster.settled()
        moved = {e for e in served if cluster.owner(e) is not second}
        assert moved & remote, "no remote stream's shard moved"
        assert moved & stalled, "no stalled stream's shard moved"
        assert moved - remote - stalled, "no local stream's shard moved"
        with trio.fail_after(200):
            while set(outcome) != moved:  # noqa: ASYNC110
                await trio.sleep(1)
        assert set(outcome.values()) == {
            "shard stopped while the handler ran (it may have partly run)"
        }
        await trio.sleep(30)
        assert set(outcome) == moved  # the others go on


def pumps() -> int:
    """How many tasks pump a stream to a remote caller (`InboundCalls._pump`)."""

    def walk(task: trio.lowlevel.Task) -> int:
        found = int(task.name.endswith("._pump"))
        for nursery in task.child_nurseries:
            found += sum(walk(child) for child in nursery.child_tasks)
        return found

    root = trio.lowlevel.current_root_task()
    assert root is not None
    return walk(root)


async def read_slowly(items: AsyncIterator[Any], read: list[Any]) -> None:
    """Read ``items`` into ``read``, one every 2 seconds."""
    async for item in items:
        read.append(item)
        await trio.sleep(2)


async def test_a_slow_consumer_gets_the_error_that_ends_a_stream(autojump_clock):
    # The end waited at most a second for room in the full channel, then
    # was dropped: a local consumer saw a clean end instead of the error, a
    # remote one waited forever.
    async with AsyncExitStack() as stack:
        cluster = await open_cluster(stack, [1, 2])
        first = cluster.runners[1]
        entity = cluster.remote_id(first)
        for runner in (first, cluster.owner(entity)):  # remote, then local
            read: list[int] = []
            with trio.fail_after(1000):
                async with runner.client(Tally)(entity).count_then_refuse(
                    Count(3 * STREAM_BUFFER)
                ) as items:
                    with pytest.raises(Refused) as caught:
                        await read_slowly(items, read)
            assert read == list(range(3 * STREAM_BUFFER))
            assert caught.value.after == 3 * STREAM_BUFFER


async def test_leaving_early_after_the_generator_ended_stops_the_pump(
    autojump_clock,
):
    # The generator had already ended, so the interrupt found no job to
    # cancel, and the pump waited for credit that never came.
    async with AsyncExitStack() as stack:
        cluster = await open_cluster(stack, [1, 2])
        first = cluster.runners[1]
        entity = cluster.remote_id(first)
        async with first.client(Tally)(entity).count(Count(STREAM_BUFFER + 5)) as items:
            assert await items.__anext__() == 0
            await trio.sleep(1)
            assert pumps() == 1  # it waits for credit
        await trio.sleep(1)
        assert pumps() == 0


async def test_a_graceful_stop_ends_its_streams_at_once(autojump_clock):
    """A stream (here one that runs for as long as it is read) does not hold
    its shard through the drain (``entity_termination_timeout``, 30 s
    here): its caller gets `EntityNotAssignedError` at once, and the
    shard's other entities are served by the next owner within the
    failover time. (Other handlers still get the timeout: see
    test_sharding.)"""
    async with AsyncExitStack() as stack:
        cluster = await open_cluster(stack, [1, 2], entity_termination_timeout=30.0)
        first = cluster.runners[1]
        entity = cluster.remote_id(first)
        owner = cluster.owner(entity)
        tallies = first.client(Tally)
        shard = tallies.address_of(entity).shard
        other = next(
            e
            for e in (f"x{n}" for n in range(2000))
            if tallies.address_of(e).shard == shard
        )
        ended: list[float] = []

        async def read() -> None:
            async with tallies(entity).slow_count(Count(1)) as items:
                try:
                    async for _ in items:
                        pass
                except tc.EntityNotAssignedError:
                    ended.append(trio.current_time())

        async with trio.open_nursery() as nursery:
            nursery.start_soon(read)
            await trio.sleep(1.5)
            stopped = trio.current_time()
            cluster.stop(owner.address.port)
            await trio.sleep(0.05)  # its shutdown under way
            with trio.fail_after(5):
                where = await tallies(other).add(Add(1))
        assert where.runner == str(first.address)
        served = trio.current_time() - stopped
        assert served < 1.0, served
        assert ended[0] - stopped < 0.1
