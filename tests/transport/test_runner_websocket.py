"""Two real runners in one process talking over `WebSocketTransport` on
127.0.0.1 (ephemeral ports), sharing one `MemoryStorage` for membership and
locks: volatile rpc (on the owner's fast path for handlers that cannot
suspend, in a task for those that can, in order either way), discards,
typed and undeclared errors, a stream, an interrupt by cancellation and by
the caller's deadline, and bad input from a raw WebSocket peer at the
runtime level (unknown envelope kinds, malformed and unknown requests).

Real sockets, so real time: every test is bounded by ``trio.fail_after`` and
the configs keep every interval short.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Sequence
from contextlib import AsyncExitStack, asynccontextmanager

import attrs
import msgpack
import pytest
import trio
import trio.lowlevel
import trio_websocket

import trio_cluster as tc
from trio_cluster._engine._wire import Kind, Mode
from trio_cluster._operations._metrics import render_metrics
from trio_cluster.storage import MemoryStorage
from trio_cluster.transport import WebSocketEndpoint, WebSocketTransport
from trio_cluster.transport._framing import encode_hello, encode_proof

from ..helpers import Add, Get as Status, config
from . import wire_peers
from .test_websocket import closed_with

TIMEOUT = 15
SHARDS = 8


@attrs.frozen
class Hang:
    tag: str


@attrs.frozen
class Upto:
    count: int


@attrs.define(eq=False, kw_only=True)
class Refused(Exception):
    amount: int


class Tally(tc.Entity):
    type_name = "Tally"

    def __init__(self) -> None:
        self.value = 0
        self.hung: list[str] = []
        self.interrupted: list[str] = []

    @tc.rpc(errors=[Refused])
    async def add(self, msg: Add) -> int:
        if msg.amount < 0:
            raise Refused(amount=msg.amount)
        self.value += msg.amount
        return self.value

    @tc.rpc
    async def add_later(self, msg: Add) -> int:
        # Can suspend: runs in a task of its own on the owner (not the fast
        # path), its reply leaves through the job's sink.
        await trio.lowlevel.checkpoint()
        self.value += msg.amount
        return self.value

    @tc.rpc
    async def slowly_set(self, msg: Add) -> int:
        await trio.sleep(0.2)
        self.value = msg.amount
        return self.value

    @tc.rpc
    async def crash(self, msg: Status) -> None:
        raise KeyError("undeclared")

    @tc.rpc
    async def hang(self, msg: Hang) -> None:
        self.hung.append(msg.tag)
        try:
            await trio.sleep_forever()
        except trio.Cancelled:
            self.interrupted.append(msg.tag)
            raise

    @tc.rpc
    async def status(self, msg: Status) -> list[list[str]]:
        return [self.hung, self.interrupted]

    @tc.stream
    async def count(self, msg: Upto) -> AsyncIterator[int]:
        for i in range(msg.count):
            yield i * 10
            await trio.sleep(0.001)


def transport(secrets: Sequence[bytes] = ()) -> WebSocketTransport:
    return WebSocketTransport(
        connect_timeout=2.0,
        close_timeout=0.5,
        ping_interval=0.5,
        ping_timeout=1.0,
        cluster_secrets=secrets,
    )


def runner_config() -> tc.ShardingConfig:
    return config(
        runner_address=tc.RunnerAddress("127.0.0.1", 0),
        shards_per_group=SHARDS,
        send_retry_timeout=5.0,
        entity_termination_timeout=1.0,
    )


@asynccontextmanager
async def open_pair(
    secrets: Sequence[bytes] = (),
) -> AsyncIterator[tuple[tc.Runner, tc.Runner]]:
    """Two runners over WebSocket (proving ``secrets``, if any), once the
    shards are split between them."""
    storage = MemoryStorage()
    async with AsyncExitStack() as stack:
        first, second = [
            await stack.enter_async_context(
                tc.open_runner(
                    entities=[Tally],
                    config=runner_config(),
                    storage=storage,
                    transport=transport(secrets),
                )
            )
            for _ in range(2)
        ]
        assert first.address != second.address
        assert first.address.port != 0
        while not (  # noqa: ASYNC110 - membership is polled; nothing to wait on
            first.statistics().shards
            and second.statistics().shards
            and first.statistics().shards + second.statistics().shards == SHARDS
        ):
            await trio.sleep(0.02)
        yield first, second


def endpoint_of(runner: tc.Runner) -> WebSocketEndpoint:
    outbound = runner._parts.router.outbound
    assert outbound is not None
    endpoint = outbound._endpoint
    assert isinstance(endpoint, WebSocketEndpoint)
    return endpoint


def remote_id(sender: tc.Runner, *, skip: int = 0) -> str:
    """An entity id whose shard ``sender`` does not serve."""
    client = sender.client(Tally)
    found = 0
    for i in range(1000):
        if client.address_of(f"t{i}").shard not in sender.served_shards():
            if found == skip:
                return f"t{i}"
            found += 1
    raise AssertionError("no remote shard")  # pragma: no cover


async def test_rpc_and_typed_errors_reach_the_other_runner():
    with trio.fail_after(TIMEOUT):
        async with open_pair() as (first, second):
            entity = remote_id(first)
            tally = first.client(Tally)(entity)
            assert await tally.add(Add(2)) == 2
            assert await tally.add(Add(3)) == 5
            # A declared error crosses the wire as itself.
            with pytest.raises(Refused) as caught:
                await tally.add(Add(-1))
            assert caught.value.amount == -1
            # The other way round too, over the same connection.
            back = remote_id(second)
            assert await second.client(Tally)(back).add(Add(7)) == 7
            assert first.statistics().remote_calls == 3
            assert second.statistics().remote_calls == 1
            # A handler that can suspend, a discard, an undeclared crash.
            assert await tally.add_later(Add(10)) == 15
            await tally.add.discard(Add(100))
            assert await tally.add(Add(0)) == 115  # the discard ran first
            with pytest.raises(tc.RemoteError, match="undeclared"):
                await tally.crash(Status())
            assert await tally.add_later(Add(0)) == 0  # restarted: fresh state
            await tally.add(Add(5))
            # Many concurrent callers share the one connection.
            results: list[int] = []

            async def add_one() -> None:
                results.append(await tally.add(Add(1)))

            async with trio.open_nursery() as nursery:
                for _ in range(200):
                    nursery.start_soon(add_one)
            assert sorted(results) == list(range(6, 206))
            assert first.statistics().remote_calls == 3 + 5 + 200  # not discards
            assert endpoint_of(first).statistics().connections == 1


async def test_requests_to_a_busy_entity_keep_their_order():
    # A handler that cannot suspend runs on the owner's fast path only when
    # the entity is idle; behind a running one it waits its turn.
    with trio.fail_after(TIMEOUT):
        async with open_pair() as (first, _):
            tally = first.client(Tally)(remote_id(first))
            results: dict[str, int] = {}

            async def slow() -> None:
                results["slow"] = await tally.slowly_set(Add(100))

            async with trio.open_nursery() as nursery:
                nursery.start_soon(slow)
                await trio.sleep(0.05)  # the slow handler is running
                results["fast"] = await tally.add(Add(1))
            assert results == {"slow": 100, "fast": 101}


async def test_stream_from_the_other_runner():
    with trio.fail_after(TIMEOUT):
        async with open_pair() as (first, _):
            tally = first.client(Tally)(remote_id(first))
            async with tally.count(Upto(100)) as items:
                assert [item async for item in items] == [i * 10 for i in range(100)]
            # Leaving early interrupts the generator on the owner; the entity
            # keeps answering.
            async with tally.count(Upto(1_000_000)) as items:
                assert [await items.__anext__() for _ in range(3)] == [0, 10, 20]
            assert await tally.add(Add(1)) == 1


async def test_cancelled_caller_interrupts_the_remote_handler():
    with trio.fail_after(TIMEOUT):
        async with open_pair() as (first, _):
            tally = first.client(Tally)(remote_id(first))
            with trio.move_on_after(0.3) as scope:
                await tally.hang(Hang("one"))
            assert scope.cancelled_caught
            # The interrupt left before this request on the same connection,
            # and the entity is FIFO: the handler was cancelled before this
            # runs.
            assert await tally.status(Status()) == [["one"], ["one"]]


async def test_the_callers_deadline_travels_with_the_request():
    # A raw peer sends a request with 0.2 s left and never interrupts it:
    # the owner cancels the handler at that deadline by itself.
    me = tc.RunnerAddress("127.0.0.1", 9)
    with trio.fail_after(TIMEOUT):
        async with open_pair() as (first, second):
            entity = remote_id(second)  # served by first
            hang = msgpack.packb({"tag": "late"})
            async with raw_peer(first, me) as ws:
                start = trio.current_time()
                envelope = request(first, 1, entity, "hang", hang)
                envelope[-1] = 0.2
                await ws.send_message(msgpack.packb([envelope]))
                [[kind, call_id, reply]] = msgpack.unpackb(await ws.get_message())
                assert (kind, call_id) == (Kind.REPLY, 1)
                assert msgpack.unpackb(reply)[0] != 0  # an error, not a value
                assert 0.2 <= trio.current_time() - start < 2
            status = second.client(Tally)(entity)
            assert await status.status(Status()) == [["late"], ["late"]]


# ----------------------------------------------------------------------
# Bad input from a peer at the runtime level


@asynccontextmanager
async def raw_peer(
    runner: tc.Runner, me: tc.RunnerAddress, secrets: Sequence[bytes] = ()
) -> AsyncIterator[trio_websocket.WebSocketConnection]:
    """A hand-driven WebSocket peer of ``runner`` announcing ``me``, past
    the handshake (proving ``secrets``, if any)."""
    async with wire_peers.raw_peer(runner.address, me, secrets) as ws:
        yield ws


def request(
    runner: tc.Runner, call_id: int, entity: str, tag: str, payload: bytes
) -> list[object]:
    address = runner.client(Tally).address_of(entity)
    return [
        Kind.REQUEST,
        call_id,
        Mode.CALL,
        address.entity_type,
        entity,
        address.shard.group,
        address.shard.number,
        tag,
        payload,
        5.0,
    ]


async def test_bad_envelopes_are_refused_and_the_runner_keeps_serving(caplog):
    me = tc.RunnerAddress("127.0.0.1", 9)
    with trio.fail_after(TIMEOUT), caplog.at_level(logging.WARNING):
        async with open_pair() as (first, second):
            entity = remote_id(second)  # served by first
            good = msgpack.packb({"amount": 4})
            async with raw_peer(first, me) as ws:
                await ws.send_message(
                    msgpack.packb(
                        [
                            [99, "unknown kind"],
                            [Kind.REPLY, "not an id", b""],
                            [],
                            request(first, 1, entity, "no_such_handler", good),
                            request(first, 2, entity, "add", b"\xc1 not msgpack"),
                            request(first, 3, entity, "add", good),
                        ]
                    )
                )
                # Only the well-formed requests are answered, in order: the
                # unknown handler and the undecodable payload with typed
                # errors, the good one with its value.
                replies = [msgpack.unpackb(await ws.get_message())]
                while sum(len(frame) for frame in replies) < 3:
                    replies.append(msgpack.unpackb(await ws.get_message()))
                answers = [envelope for frame in replies for envelope in frame]
                assert [answer[:2] for answer in answers] == [
                    [Kind.REPLY, 1],
                    [Kind.REPLY, 2],
                    [Kind.REPLY, 3],
                ]
            warnings = [r.getMessage() for r in caplog.records]
            assert any("unknown kind 99" in text for text in warnings)
            assert any("field 1 (call id): unexpected str" in text for text in warnings)
            assert any("missing kind" in text for text in warnings)
            assert any("no_such_handler" in text for text in warnings)
            # The runtime decoded both errors as typed on a real caller's side:
            # check with a real call, and that the runner serves everyone.
            assert await second.client(Tally)(entity).add(Add(1)) == 5
            assert endpoint_of(first)._handler._target.malformed == 3  # type: ignore[attr-defined]


async def test_only_members_reach_the_handlers():
    # A process that is not a member completed the hello under any address
    # and called any handler: with a cluster secret, an outsider's requests
    # never reach the runtime, and a member's (hand-driven) do.
    outsider = tc.RunnerAddress("127.0.0.1", 9)
    secrets = [wire_peers.SECRET]
    with trio.fail_after(TIMEOUT):
        async with open_pair(secrets) as (first, second):
            entity = remote_id(second)  # served by first
            add = msgpack.packb({"amount": 5})
            frame = msgpack.packb([request(first, 1, entity, "add", add)])
            # Without a secret: the request right behind the hello.
            async with wire_peers.raw_websocket(first.address) as ws:
                await ws.send_message(encode_hello(outsider))
                await ws.send_message(frame)
                assert (await closed_with(ws)).code == 1008
            # With the wrong one: the request right behind the proofs.
            async with wire_peers.raw_websocket(first.address) as ws:
                await ws.send_message(encode_hello(outsider, b"n" * 32))
                await ws.get_message()
                await ws.send_message(encode_proof([b"p" * 32]))
                await ws.send_message(frame)
                assert (await closed_with(ws)).code == 1008
            assert await second.client(Tally)(entity).add(Add(0)) == 0
            async with raw_peer(first, outsider, secrets) as ws:
                await ws.send_message(frame)
                [[kind, call_id, _]] = msgpack.unpackb(await ws.get_message())
                assert (kind, call_id) == (Kind.REPLY, 1)
            assert await second.client(Tally)(entity).add(Add(0)) == 5
            counted = "trio_cluster_transport_unauthenticated_peers_total"
            text = render_metrics(first.statistics())
            assert f'{counted}{{runner="{first.address}"}} 2' in text
