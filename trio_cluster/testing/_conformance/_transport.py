"""`TransportConformance`: the test suite every transport must pass (test support).

The suite checks what the transport contract (`trio_cluster.abc.Transport`)
promises, through its public methods only: delivery both ways with the
announced addresses, order under load, batching, the size, encoding and queue
limits, unreachable peers, ``peer_lost`` and reconnection, and a clean close.
Then what the runtime builds on it: remote streams of every item kind between
two runners on the transport (`RemoteStreamTests`).

Every test opens its endpoints on ``127.0.0.1`` port 0, runs under a
``trio.fail_after`` guard and waits for effects with events (never sleeps for
them), so it works on a real clock with real sockets as well as on virtual
time.
"""

from __future__ import annotations

import contextvars
import math
from contextlib import AsyncExitStack, asynccontextmanager
from typing import TYPE_CHECKING, Any, ClassVar

import pytest
import trio

from trio_cluster._core._addresses import RunnerAddress
from trio_cluster._errors import (
    MalformedMessageError,
    MessageTooLargeError,
    RunnerUnavailableError,
)
from trio_cluster._transport_abc import Endpoint, EndpointHandler, Envelope, Transport
from trio_cluster.transport import MemoryEndpoint, WebSocketEndpoint

from ._streams import RemoteStreamTests

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable

__all__ = ["LOCALHOST", "TIMEOUT", "RecordingHandler", "TransportConformance"]

LOCALHOST = RunnerAddress("127.0.0.1", 0)
"""Where the suite opens endpoints (port 0: any free port)."""
TIMEOUT = 20.0
"""Guard for one test, in seconds."""
QUEUE_FULL = "send queue full"

_PROBE: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "trio_cluster_transport_probe", default=None
)


class RecordingHandler(EndpointHandler):
    """An endpoint handler that records everything, for tests.

    Args:
        fail_on: an envelope equal to this makes `envelope_received` raise
            `RuntimeError` (to test what a transport does then).
    """

    def __init__(self, *, fail_on: Envelope | None = None) -> None:
        self.received: list[tuple[RunnerAddress, Envelope]] = []
        """Every ``(peer, envelope)`` delivered, in order."""
        self.lost: list[tuple[RunnerAddress, str]] = []
        """Every ``(peer, reason)`` reported by ``peer_lost``, in order."""
        self._fail_on = fail_on
        self._changed = trio.Event()

    def envelope_received(self, peer: RunnerAddress, envelope: Envelope) -> None:
        self.received.append((peer, envelope))
        self._changed.set()
        if envelope == self._fail_on:
            raise RuntimeError("RecordingHandler was told to fail on this envelope")

    def peer_lost(self, peer: RunnerAddress, reason: str) -> None:
        self.lost.append((peer, reason))
        self._changed.set()

    def envelopes(self) -> list[Envelope]:
        """The envelopes received so far, without their senders."""
        return [envelope for _, envelope in self.received]

    def lost_peers(self) -> list[RunnerAddress]:
        """The peers reported lost so far, in order."""
        return [peer for peer, _ in self.lost]

    async def wait_for(self, condition: Callable[[], bool]) -> None:
        """Block until ``condition()`` holds (checked after every event)."""
        while not condition():
            self._changed = trio.Event()
            await self._changed.wait()

    async def wait_received(self, count: int) -> None:
        """Block until at least ``count`` envelopes have arrived."""
        await self.wait_for(lambda: len(self.received) >= count)

    async def wait_lost(self, peer: RunnerAddress) -> None:
        """Block until ``peer_lost(peer, ...)`` has been reported."""
        await self.wait_for(lambda: peer in self.lost_peers())


async def send_retrying(
    endpoint: Endpoint, peer: RunnerAddress, envelope: Envelope
) -> None:
    """``send_nowait``, waiting a little and trying again while the peer's
    queue is full (the queue drains as the connection writes)."""
    while True:
        try:
            endpoint.send_nowait(peer, envelope)
        except RunnerUnavailableError as exc:
            if exc.detail != QUEUE_FULL:
                raise
            await trio.sleep(0.001)
        else:
            return


class TransportConformance(RemoteStreamTests):
    """Base class of a transport's conformance tests (pytest with pytest-trio).

    Subclass it in a test module (``class TestMyTransport(TransportConformance)``)
    and provide a ``transport`` fixture that returns a `Transport` built with
    the limits in the class attributes: ``max_message_size=MAX_MESSAGE_SIZE``,
    at most ``MAX_QUEUED_ENVELOPES`` envelopes and ``MAX_QUEUED_BYTES`` bytes
    queued per peer. Each endpoint the suite opens is on `LOCALHOST` (port 0);
    the remote-stream tests open two runners on the transport (one
    ``transport`` object opens both endpoints) with a shared `MemoryStorage`.
    Optionally override:

    * ``clock``: None (real time, the default) or a `trio.abc.Clock`, e.g.
      pytest-trio's ``autojump_clock`` for a transport that works on virtual
      time; every test takes it;
    * ``unreachable``: an address where nothing listens (default
      ``127.0.0.1:1``);
    * `frames_sent`: how many frames an endpoint has written, if the
      transport can tell (the built-in ones can); the batching tests then
      check the frame counts.

    Example::

        class TestMemoryTransport(TransportConformance):
            @pytest.fixture
            def transport(self) -> Transport:
                return MemoryTransport(
                    MemoryNetwork(),
                    max_message_size=self.MAX_MESSAGE_SIZE,
                    max_queued_envelopes=self.MAX_QUEUED_ENVELOPES,
                    max_queued_bytes=self.MAX_QUEUED_BYTES,
                )

            @pytest.fixture
            def clock(self, autojump_clock: MockClock) -> MockClock:
                return autojump_clock
    """

    MAX_MESSAGE_SIZE: ClassVar[int] = 64 * 1024
    MAX_QUEUED_ENVELOPES: ClassVar[int] = 1000
    MAX_QUEUED_BYTES: ClassVar[int] = 256 * 1024

    @pytest.fixture
    def clock(self) -> trio.abc.Clock | None:
        """The clock of every test: None for real time."""
        return None

    @pytest.fixture
    def unreachable(self) -> RunnerAddress:
        """An address where no endpoint listens."""
        return RunnerAddress("127.0.0.1", 1)

    def frames_sent(self, endpoint: Endpoint) -> int | None:
        """Frames written by ``endpoint`` so far, or None if unknown (the
        built-in transports' endpoints tell)."""
        if isinstance(endpoint, MemoryEndpoint | WebSocketEndpoint):
            return endpoint.statistics().frames_sent
        return None

    # ------------------------------------------------------------------
    # Helpers

    @asynccontextmanager
    async def pair(
        self, transport: Transport
    ) -> AsyncIterator[tuple[Endpoint, RecordingHandler, Endpoint, RecordingHandler]]:
        """Two endpoints, ``a`` and ``b``, with their recording handlers."""
        ha, hb = RecordingHandler(), RecordingHandler()
        async with (
            transport.open_endpoint(LOCALHOST, ha) as a,
            transport.open_endpoint(LOCALHOST, hb) as b,
        ):
            yield a, ha, b, hb

    async def connect(self, a: Endpoint, hb: RecordingHandler, b: Endpoint) -> None:
        """Send one envelope from ``a`` to ``b`` and wait for it."""
        before = len(hb.received)
        a.send_nowait(b.address, ["hello"])
        await hb.wait_received(before + 1)
        assert a.is_connected(b.address)

    # ------------------------------------------------------------------
    # Delivery

    async def test_round_trip_with_announced_addresses(
        self, transport: Transport, clock: trio.abc.Clock | None
    ) -> None:
        with trio.fail_after(TIMEOUT):
            async with self.pair(transport) as (a, ha, b, hb):
                assert a.address.port != 0
                assert b.address.port != 0
                assert a.address != b.address
                assert not a.is_connected(b.address)
                envelope: Envelope = [
                    1,
                    "two",
                    b"three",
                    None,
                    1.5,
                    True,
                    {"k": [1, 2]},
                ]
                a.send_nowait(b.address, envelope)
                await hb.wait_received(1)
                assert hb.received == [(a.address, envelope)]
                b.send_nowait(a.address, ["reply", -1])
                await ha.wait_received(1)
                assert ha.received == [(b.address, ["reply", -1])]
                assert a.is_connected(b.address)
                assert b.is_connected(a.address)
                assert ha.lost == []
                assert hb.lost == []

    async def test_order_under_load_from_several_tasks(
        self, transport: Transport, clock: trio.abc.Clock | None
    ) -> None:
        tasks, per_task = 4, 2500

        async def produce(a: Endpoint, peer: RunnerAddress, task: int) -> None:
            for seq in range(per_task):
                await send_retrying(a, peer, [task, seq])
                if seq % 100 == 99:
                    await trio.lowlevel.checkpoint()

        with trio.fail_after(TIMEOUT):
            async with self.pair(transport) as (a, _, b, hb):
                async with trio.open_nursery() as nursery:
                    for task in range(tasks):
                        nursery.start_soon(produce, a, b.address, task)
                await hb.wait_received(tasks * per_task)
                seen: dict[int, list[int]] = {task: [] for task in range(tasks)}
                for peer, (task, seq) in hb.received:
                    assert peer == a.address
                    seen[task].append(seq)
                for task in range(tasks):
                    assert seen[task] == list(range(per_task)), f"task {task}"
                assert hb.lost == []

    async def test_envelopes_queued_in_one_tick_leave_in_one_frame(
        self, transport: Transport, clock: trio.abc.Clock | None
    ) -> None:
        count = 500
        with trio.fail_after(TIMEOUT):
            async with self.pair(transport) as (a, _, b, hb):
                await self.connect(a, hb, b)
                frames_before = self.frames_sent(a)
                for seq in range(count):  # no checkpoint: one tick
                    a.send_nowait(b.address, [seq, "batched"])
                await hb.wait_received(1 + count)
                assert hb.envelopes()[1:] == [[seq, "batched"] for seq in range(count)]
                frames_after = self.frames_sent(a)
                if frames_before is not None and frames_after is not None:
                    assert frames_after - frames_before == 1

    async def test_batches_are_split_at_max_message_size(
        self, transport: Transport, clock: trio.abc.Clock | None
    ) -> None:
        # Each envelope encodes to 1 + 3 + 20,000 bytes: 3 fit in a frame.
        count, size = 10, 20_000
        per_frame = (self.MAX_MESSAGE_SIZE - 5) // (size + 4)
        with trio.fail_after(TIMEOUT):
            async with self.pair(transport) as (a, _, b, hb):
                await self.connect(a, hb, b)
                frames_before = self.frames_sent(a)
                for seq in range(count):
                    a.send_nowait(b.address, [bytes([seq]) * size])
                await hb.wait_received(1 + count)
                assert hb.envelopes()[1:] == [
                    [bytes([seq]) * size] for seq in range(count)
                ]
                frames_after = self.frames_sent(a)
                if frames_before is not None and frames_after is not None:
                    assert frames_after - frames_before == math.ceil(count / per_frame)

    # ------------------------------------------------------------------
    # Limits and bad envelopes

    async def test_envelope_over_the_limit_is_refused_at_send(
        self, transport: Transport, clock: trio.abc.Clock | None
    ) -> None:
        # [bin16 of n bytes] encodes to 1 + 3 + n bytes; a frame adds 5 at most.
        largest = self.MAX_MESSAGE_SIZE - 5 - 4
        with trio.fail_after(TIMEOUT):
            async with self.pair(transport) as (a, _, b, hb):
                with pytest.raises(MessageTooLargeError) as caught:
                    a.send_nowait(b.address, [b"x" * (largest + 1)])
                assert caught.value.size == self.MAX_MESSAGE_SIZE - 4
                assert caught.value.limit == self.MAX_MESSAGE_SIZE - 5
                with pytest.raises(MessageTooLargeError):
                    a.send_nowait(b.address, [b"x" * (2 * self.MAX_MESSAGE_SIZE)])
                a.send_nowait(b.address, [b"y" * largest])
                a.send_nowait(b.address, ["after"])
                await hb.wait_received(2)
                assert hb.envelopes() == [[b"y" * largest], ["after"]]

    @pytest.mark.parametrize(
        "bad",
        [
            pytest.param([object()], id="object"),
            pytest.param([2**70], id="huge-int"),
            pytest.param(["\ud800"], id="surrogate"),
            pytest.param([{(1, 2): "tuple key"}], id="tuple-key"),
            pytest.param(("not", "a", "list"), id="tuple"),
            pytest.param("text", id="str"),
        ],
    )
    async def test_unencodable_envelope_is_refused_at_send(
        self, transport: Transport, clock: trio.abc.Clock | None, bad: Any
    ) -> None:
        with trio.fail_after(TIMEOUT):
            async with self.pair(transport) as (a, _, b, hb):
                with pytest.raises(MalformedMessageError) as caught:
                    a.send_nowait(b.address, bad)
                assert caught.value.what == "envelope"
                assert caught.value.problems
                a.send_nowait(b.address, ["fine"])
                await hb.wait_received(1)
                assert hb.envelopes() == [["fine"]]

    async def test_full_queue_refuses_without_queueing(
        self, transport: Transport, clock: trio.abc.Clock | None
    ) -> None:
        with trio.fail_after(TIMEOUT):
            async with self.pair(transport) as (a, _, b, hb):
                await self.connect(a, hb, b)
                # By envelope count (no checkpoint: nothing is written meanwhile).
                for seq in range(self.MAX_QUEUED_ENVELOPES):
                    a.send_nowait(b.address, [seq])
                with pytest.raises(RunnerUnavailableError) as caught:
                    a.send_nowait(b.address, ["refused"])
                assert caught.value.detail == QUEUE_FULL
                assert caught.value.runner == str(b.address)
                await hb.wait_received(1 + self.MAX_QUEUED_ENVELOPES)
                # By bytes.
                chunk = 32 * 1024
                fits = self.MAX_QUEUED_BYTES // (chunk + 4)
                for seq in range(fits):
                    a.send_nowait(b.address, [bytes([seq]) * chunk])
                with pytest.raises(RunnerUnavailableError, match=QUEUE_FULL):
                    a.send_nowait(b.address, [b"z" * chunk])
                a.send_nowait(b.address, ["small still fits"])
                total = 1 + self.MAX_QUEUED_ENVELOPES + fits + 1
                await hb.wait_received(total)
                envelopes = hb.envelopes()
                assert ["refused"] not in envelopes
                assert [b"z" * chunk] not in envelopes
                assert envelopes[-1] == ["small still fits"]
                assert len(envelopes) == total
                assert hb.lost == []

    async def test_send_to_itself_is_refused(
        self, transport: Transport, clock: trio.abc.Clock | None
    ) -> None:
        with trio.fail_after(TIMEOUT):
            async with transport.open_endpoint(LOCALHOST, RecordingHandler()) as a:
                with pytest.raises(ValueError, match="itself"):
                    a.send_nowait(a.address, ["me"])

    # ------------------------------------------------------------------
    # Failures and liveness

    async def test_unreachable_peer_raises_quickly_and_again(
        self,
        transport: Transport,
        clock: trio.abc.Clock | None,
        unreachable: RunnerAddress,
    ) -> None:
        handler = RecordingHandler()
        with trio.fail_after(5):
            async with transport.open_endpoint(LOCALHOST, handler) as a:
                refused: RunnerUnavailableError | None = None
                try:
                    a.send_nowait(unreachable, ["lost"])
                except RunnerUnavailableError as exc:
                    refused = exc
                if refused is None:
                    # Queued for a connection attempt, which fails.
                    await handler.wait_lost(unreachable)
                    assert not a.is_connected(unreachable)
                else:
                    assert refused.runner == str(unreachable)
                with pytest.raises(RunnerUnavailableError) as caught:
                    a.send_nowait(unreachable, ["again"])
                assert caught.value.runner == str(unreachable)
                assert handler.received == []

    async def test_peer_close_is_reported_and_next_send_reconnects(
        self, transport: Transport, clock: trio.abc.Clock | None
    ) -> None:
        ha, hb = RecordingHandler(), RecordingHandler()
        with trio.fail_after(TIMEOUT):
            async with transport.open_endpoint(LOCALHOST, ha) as a:
                async with transport.open_endpoint(LOCALHOST, hb) as b:
                    where = b.address
                    await self.connect(a, hb, b)
                    b.send_nowait(a.address, ["from b"])
                    await ha.wait_received(1)
                await ha.wait_lost(where)
                assert not a.is_connected(where)
                assert hb.lost == []  # b closed it: not a loss for b
                hb2 = RecordingHandler()
                async with transport.open_endpoint(where, hb2) as b2:
                    assert b2.address == where
                    a.send_nowait(where, ["again"])
                    await hb2.wait_received(1)
                    assert hb2.received == [(a.address, ["again"])]
                    assert a.is_connected(where)
                    b2.send_nowait(a.address, ["back"])
                    await ha.wait_received(2)
                    assert ha.received[-1] == (where, ["back"])

    async def test_handler_exception_closes_only_that_connection(
        self, transport: Transport, clock: trio.abc.Clock | None
    ) -> None:
        ha, hb = RecordingHandler(), RecordingHandler(fail_on=["boom"])
        hc = RecordingHandler()
        with trio.fail_after(TIMEOUT):
            async with (
                transport.open_endpoint(LOCALHOST, ha) as a,
                transport.open_endpoint(LOCALHOST, hb) as b,
                transport.open_endpoint(LOCALHOST, hc) as c,
            ):
                await self.connect(a, hb, b)
                await self.connect(c, hb, b)
                a.send_nowait(b.address, ["boom"])
                await ha.wait_lost(b.address)
                await hb.wait_lost(a.address)
                assert not a.is_connected(b.address)
                # The other connection of b is untouched...
                c.send_nowait(b.address, ["still here"])
                await hb.wait_for(lambda: ["still here"] in hb.envelopes())
                assert hc.lost == []
                # ... and a reconnects on its next send.
                a.send_nowait(b.address, ["after"])
                await hb.wait_for(lambda: ["after"] in hb.envelopes())

    async def test_endpoint_close_drops_everything_cleanly(
        self, transport: Transport, clock: trio.abc.Clock | None
    ) -> None:
        ha, hb = RecordingHandler(), RecordingHandler()
        with trio.fail_after(TIMEOUT):
            async with transport.open_endpoint(LOCALHOST, hb) as b:
                async with transport.open_endpoint(LOCALHOST, ha) as a:
                    await self.connect(a, hb, b)
                    await self.connect(b, ha, a)
                    for seq in range(100):  # still queued when the block ends
                        a.send_nowait(b.address, [seq])
                        b.send_nowait(a.address, [seq])
                    where = a.address
                with pytest.raises(trio.ClosedResourceError):
                    a.send_nowait(b.address, ["after close"])
                assert not a.is_connected(b.address)
                await hb.wait_lost(where)
                assert ha.lost == []
                # The address is free again.
                async with transport.open_endpoint(where, RecordingHandler()) as again:
                    assert again.address == where

    async def test_cancelled_endpoint_closes_promptly(
        self, transport: Transport, clock: trio.abc.Clock | None
    ) -> None:
        hb = RecordingHandler()
        with trio.fail_after(TIMEOUT):
            async with transport.open_endpoint(LOCALHOST, hb) as b:
                where: list[RunnerAddress] = []

                async def serve(task_status: trio.TaskStatus[None]) -> None:
                    async with transport.open_endpoint(
                        LOCALHOST, RecordingHandler()
                    ) as a:
                        where.append(a.address)
                        await self.connect(a, hb, b)
                        task_status.started()
                        a.send_nowait(b.address, ["queued"])
                        await trio.sleep_forever()

                async with trio.open_nursery() as nursery:
                    await nursery.start(serve)
                    start = trio.current_time()
                    nursery.cancel_scope.cancel()
                assert trio.current_time() - start < 1.0
                await hb.wait_lost(where[0])

    async def test_connection_tasks_run_in_the_endpoints_context(
        self, transport: Transport, clock: trio.abc.Clock | None
    ) -> None:
        # A context variable set by whichever task sends first (an entity's
        # handler, say) must not leak into the connection's tasks, on either
        # side: handlers run in the context their endpoint was opened in.
        seen: list[tuple[str, str | None]] = []

        class Probe(RecordingHandler):
            def __init__(self, name: str) -> None:
                super().__init__()
                self.name = name

            def envelope_received(
                self, peer: RunnerAddress, envelope: Envelope
            ) -> None:
                seen.append((self.name, _PROBE.get()))
                super().envelope_received(peer, envelope)

        ha, hb = Probe("a"), Probe("b")
        with trio.fail_after(TIMEOUT):
            token = _PROBE.set("opener")
            try:
                async with (
                    transport.open_endpoint(LOCALHOST, ha) as a,
                    transport.open_endpoint(LOCALHOST, hb) as b,
                ):
                    _PROBE.set("sender")
                    a.send_nowait(b.address, ["first"])
                    await hb.wait_received(1)
                    b.send_nowait(a.address, ["reply"])
                    await ha.wait_received(1)
            finally:
                _PROBE.reset(token)
        assert seen == [("b", "opener"), ("a", "opener")]

    async def test_every_pair_connects_at_once(
        self, transport: Transport, clock: trio.abc.Clock | None
    ) -> None:
        with trio.fail_after(TIMEOUT):
            async with AsyncExitStack() as stack:
                handlers = [RecordingHandler() for _ in range(3)]
                endpoints = [
                    await stack.enter_async_context(
                        transport.open_endpoint(LOCALHOST, handler)
                    )
                    for handler in handlers
                ]
                # Both ends of every pair send in the same tick.
                for sender in endpoints:
                    for receiver in endpoints:
                        if sender is not receiver:
                            sender.send_nowait(receiver.address, [str(sender.address)])
                for endpoint, handler in zip(endpoints, handlers, strict=True):
                    await handler.wait_received(2)
                    senders = sorted(str(peer) for peer, _ in handler.received)
                    assert senders == sorted(
                        str(other.address)
                        for other in endpoints
                        if other is not endpoint
                    )
                    assert all([str(peer)] == env for peer, env in handler.received)
                    assert handler.lost == []
                    for other in endpoints:
                        if other is not endpoint:
                            assert endpoint.is_connected(other.address)
