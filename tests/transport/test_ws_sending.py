"""Tests of how the WebSocket transport writes and reads: the `Outbox` (writes
that never wait for the peer), frames sent from the calling task
(`Endpoint.send`, the reader's answers), what must hold whoever sends
(order, whole frames under cancellation, a slow peer blocking nobody), and
frames handled in trio-websocket's reader task (the `Tap`).

Real sockets on loopback; each test keeps its timeouts short.
"""

from __future__ import annotations

import socket
from typing import Any

import msgpack
import pytest
import trio
import trio_websocket
from wsproto.events import BytesMessage

from trio_cluster import RunnerAddress
from trio_cluster.testing import RecordingHandler
from trio_cluster.transport import WebSocketEndpoint, _ws_connection
from trio_cluster.transport._framing import encode_hello
from trio_cluster.transport._ws_connection import Connection
from trio_cluster.transport._ws_outbox import (
    Outbox,
    can_write_message,
    open_outbox,
    outbox_of,
)

from .test_websocket import (
    LOCALHOST,
    TIMEOUT,
    free_port,
    make_transport,
    raw_client,
    wait_connected,
)

BIG = 4 * 1024 * 1024
"""More than loopback socket buffers take at once."""
PATTERN = bytes(range(256)) * (BIG // 256)
"""`BIG` bytes whose order a reader can check."""


def _outbox(nursery: trio.Nursery, stream: trio.SocketStream) -> Outbox:
    """`open_outbox` over a TCP-like stream: an `Outbox`."""
    outbox = open_outbox(nursery, stream)
    assert isinstance(outbox, Outbox)
    return outbox


@pytest.fixture
async def socket_pair():
    a, b = trio.socket.socketpair()
    left, right = trio.SocketStream(a), trio.SocketStream(b)
    yield left, right
    await left.aclose()
    await right.aclose()


async def read_exactly(stream: trio.abc.ReceiveStream, size: int) -> bytes:
    data = bytearray()
    while len(data) < size:
        chunk = await stream.receive_some(size - len(data))
        assert chunk, "end of stream"
        data += chunk
    return bytes(data)


# ----------------------------------------------------------------------
# Outbox


async def test_outbox_writes_at_once_and_keeps_the_rest_in_order(socket_pair):
    left, right = socket_pair
    big = PATTERN
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            outbox = _outbox(nursery, left)
            await outbox.send_all(b"first")
            assert outbox.backlog == 0
            # The peer reads nothing yet: send_all does not wait, the rest
            # stays in the backlog, and later data goes behind it.
            await outbox.send_all(big)
            assert 0 < outbox.backlog <= len(big)
            await outbox.send_all(b"last")
            assert outbox.backlog > 4
            received = await read_exactly(right, 5 + len(big) + 4)
            assert received == b"first" + big + b"last"
            await outbox.wait_drained()
            assert outbox.backlog == 0
            nursery.cancel_scope.cancel()


async def test_outbox_held_bytes_go_out_in_front_of_the_next_write(socket_pair):
    left, right = socket_pair
    with trio.fail_after(TIMEOUT):
        outbox = Outbox(left)
        outbox.hold_nowait(b"HTTP/1.1 101 ")
        outbox.hold_nowait(b"...\r\n\r\n")
        with trio.move_on_after(0.1) as scope:
            await right.receive_some(100)
        assert scope.cancelled_caught  # nothing written yet
        outbox.write_nowait(b"frame")
        # One write: what the peer reads at once is all of it.
        assert await right.receive_some(100) == b"HTTP/1.1 101 ...\r\n\r\nframe"
        outbox.write_nowait(b"next")
        assert await read_exactly(right, 4) == b"next"


async def test_outbox_send_eof_writes_everything_first(socket_pair):
    left, right = socket_pair
    big = PATTERN
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            outbox = _outbox(nursery, left)
            outbox.hold_nowait(b"held ")
            await outbox.send_all(big)
            assert outbox.backlog  # the peer reads nothing yet
            received = bytearray()
            ended = trio.Event()

            async def read_to_the_end() -> None:
                while chunk := await right.receive_some(65536):
                    received.extend(chunk)
                ended.set()

            nursery.start_soon(read_to_the_end)
            await outbox.send_eof()  # waits for the backlog
            assert outbox.backlog == 0
            await ended.wait()
            assert bytes(received) == b"held " + big
            await right.send_all(b"still read")
            assert await outbox.receive_some(100) == b"still read"
            nursery.cancel_scope.cancel()


async def test_outbox_wait_drained_waits_for_the_peer(socket_pair):
    left, right = socket_pair
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            outbox = _outbox(nursery, left)
            await outbox.send_all(b"x" * BIG)
            assert outbox.backlog
            with trio.move_on_after(0.2) as scope:
                await outbox.wait_drained()
            assert scope.cancelled_caught  # nobody read
            await read_exactly(right, BIG)
            await outbox.wait_drained()
            nursery.cancel_scope.cancel()


async def test_outbox_cancelled_send_all_writes_nothing(socket_pair):
    left, right = socket_pair
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            outbox = open_outbox(nursery, left)
            with trio.CancelScope() as scope:
                scope.cancel()
                await outbox.send_all(b"never")
            await outbox.send_all(b"sent")
            assert await read_exactly(right, 4) == b"sent"
            nursery.cancel_scope.cancel()


async def test_outbox_reports_a_broken_connection(socket_pair):
    left, right = socket_pair
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            outbox = open_outbox(nursery, left)
            right.socket.setsockopt(
                socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00"
            )
            await right.aclose()

            async def write_until_it_fails() -> None:
                for _ in range(100):  # the first writes may still be taken
                    await outbox.send_all(b"x" * 65536)
                    await trio.sleep(0.01)

            with pytest.raises(trio.BrokenResourceError):
                await write_until_it_fails()
            with pytest.raises(trio.BrokenResourceError):
                await outbox.send_all(b"again")
            nursery.cancel_scope.cancel()


async def test_outbox_close_when_cancelled_drops_the_backlog(socket_pair):
    left, _ = socket_pair
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            outbox = _outbox(nursery, left)
            await outbox.send_all(b"x" * BIG)
            assert outbox.backlog
            with trio.move_on_after(0.1):
                await outbox.aclose()  # waits for a reader that never comes
            with pytest.raises(trio.ClosedResourceError):
                await outbox.send_all(b"late")
            nursery.cancel_scope.cancel()


# ----------------------------------------------------------------------
# Sending from the calling task


def connection(endpoint: WebSocketEndpoint, peer: RunnerAddress) -> Connection:
    conn = endpoint._peers[peer].connection
    assert conn is not None
    return conn


async def test_send_writes_from_the_calling_task_when_idle():
    transport = make_transport()
    ha, hb = RecordingHandler(), RecordingHandler()
    with trio.fail_after(TIMEOUT):
        async with (
            transport.open_endpoint(LOCALHOST, ha) as a,
            transport.open_endpoint(LOCALHOST, hb) as b,
        ):
            a.send_nowait(b.address, ["connect"])
            await hb.wait_received(1)
            conn = connection(a, b.address)
            assert conn.can_send_now()
            frames = a.statistics().frames_sent
            await a.send(b.address, ["inline"])
            # Written before send returned: no writer task was involved.
            assert a.statistics().frames_sent == frames + 1
            await hb.wait_received(2)
            assert hb.received[-1] == (a.address, ["inline"])


async def test_cancelled_send_still_writes_the_whole_frame():
    # The caller is cancelled before it sends: the envelope was queued, so
    # it must leave whole, and the connection stays usable. (Sent with
    # trio-websocket's send_message, its lock would raise Cancelled after
    # the frame was taken from the queue: it would be lost.)
    transport = make_transport()
    ha, hb = RecordingHandler(), RecordingHandler()
    with trio.fail_after(TIMEOUT):
        async with (
            transport.open_endpoint(LOCALHOST, ha) as a,
            transport.open_endpoint(LOCALHOST, hb) as b,
        ):
            a.send_nowait(b.address, ["connect"])
            await hb.wait_received(1)
            assert connection(a, b.address).can_send_now()
            with trio.CancelScope() as scope:
                scope.cancel()
                await a.send(b.address, ["cancelled caller"])
            assert scope.cancelled_caught
            await a.send(b.address, ["after"])
            await hb.wait_received(3)
            assert [envelope for _, envelope in hb.received[1:]] == [
                ["cancelled caller"],
                ["after"],
            ]
            assert a.is_connected(b.address)


async def test_concurrent_senders_keep_the_queue_order():
    # Callers sending from their own task, callers queueing, the writer
    # and the reader's answers all send on one connection, some frames
    # large enough to leave a backlog: the peer gets every envelope in the
    # order it was queued.
    transport = make_transport(max_message_size=1024 * 1024)
    ha = RecordingHandler()
    queued: list[list[Any]] = []

    class Echo(RecordingHandler):
        def envelope_received(self, peer, envelope):
            super().envelope_received(peer, envelope)
            if envelope[0] == "ask":
                answer: list[object] = ["answer", envelope[1]]
                queued.append(answer)
                b.send_nowait(peer, answer)

    hb = Echo()
    senders, per_sender = 8, 60
    big = "x" * 200_000
    with trio.fail_after(TIMEOUT * 3):
        async with (
            transport.open_endpoint(LOCALHOST, ha) as a,
            transport.open_endpoint(LOCALHOST, hb) as b,
        ):
            a.send_nowait(b.address, ["connect"])
            await hb.wait_received(1)
            await b.send(a.address, ["connect"])
            await ha.wait_received(1)
            queued.clear()

            async def sender(number: int) -> None:
                for seq in range(per_sender):
                    envelope: list[object] = ["ask", (number, seq)]
                    if seq % 7 == 3:
                        envelope.append(big)
                    if seq % 2:
                        a.send_nowait(b.address, envelope)
                    else:
                        await a.send(b.address, envelope)
                    await trio.lowlevel.checkpoint()

            # The order of the queue: what every sending path pushes.
            sent: list[list[object]] = []
            queue = a._peers[b.address].queue
            push = queue.push

            def record(data: bytes, *, wake: bool = True) -> None:
                push(data, wake=wake)
                sent.append(msgpack.unpackb(data))

            queue.push = record  # type: ignore[method-assign]
            async with trio.open_nursery() as nursery:
                for number in range(senders):
                    nursery.start_soon(sender, number)
            total = senders * per_sender
            await hb.wait_received(1 + total)
            await ha.wait_received(1 + total)
    received = [envelope for _, envelope in hb.received[1:]]
    assert len(sent) == total
    assert received == sent
    answers = [envelope for _, envelope in ha.received[1:]]
    assert answers == [[e[0], list(e[1])] for e in queued]
    assert len(answers) == total


async def test_a_peer_that_does_not_read_blocks_no_caller():
    # A peer that stops reading: frames for it wait in the outbox (one at a
    # time) and in the bounded queue, and every caller still returns at
    # once, cancelled or not; the connection stays up.
    transport = make_transport(max_message_size=1024 * 1024)
    handler = RecordingHandler()
    peer = RunnerAddress("127.0.0.1", free_port())
    with trio.fail_after(TIMEOUT):
        async with (
            transport.open_endpoint(LOCALHOST, handler) as a,
            raw_client(a) as ws,
        ):
            await ws.send_message(encode_hello(peer))
            assert await ws.get_message() == encode_hello(a.address)
            await wait_connected(a, peer)
            conn = connection(a, peer)
            # The raw client's reader stops after 8 messages: fill the
            # socket buffers until the outbox holds a backlog.
            for _ in range(200):
                a.send_nowait(peer, ["filler", "x" * 500_000])
                await trio.sleep(0.001)
                if conn._outbox is not None and conn._outbox.backlog:
                    break
            assert conn._outbox is not None
            assert conn._outbox.backlog
            assert not conn.can_send_now()
            with trio.fail_after(1):
                await a.send(peer, ["queued, not written"])
                with trio.CancelScope() as scope:
                    scope.cancel()
                    await a.send(peer, ["cancelled"])
                assert scope.cancelled_caught
            assert a.is_connected(peer)
            # The peer reads again: everything arrives, in order.
            frames: list[object] = []
            while True:
                message = await ws.get_message()
                frames.extend(msgpack.unpackb(message))
                if frames[-1] == ["cancelled"]:
                    break
            assert frames[-2:] == [["queued, not written"], ["cancelled"]]


# ----------------------------------------------------------------------
# Reading in trio-websocket's reader task (the Tap)


async def test_frames_right_behind_the_listeners_hello_arrive_in_order():
    # A listener sends frames right behind its hello: some wait in
    # trio-websocket's channel before the connection (and its tap) exists,
    # some arrive while the tap hands those over, the rest after. All are
    # delivered, in order.
    count = 50
    handler = RecordingHandler()

    async def listener(request: trio_websocket.WebSocketRequest) -> None:
        ws = await request.accept()
        await ws.get_message()  # the dialer's hello
        # The hello and the first frames in one write (trio-websocket's
        # protocol object and stream: its API writes one message at a time).
        messages = [encode_hello(address)]
        messages += [msgpack.packb([["n", seq]]) for seq in range(count // 2)]
        await ws._stream.send_all(
            b"".join(ws._wsproto.send(BytesMessage(data=m)) for m in messages)
        )
        for seq in range(count // 2, count):
            await ws.send_message(msgpack.packb([["n", seq]]))
        await trio.sleep_forever()

    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            server = await nursery.start(
                trio_websocket.serve_websocket, listener, "127.0.0.1", 0, None
            )
            address = RunnerAddress("127.0.0.1", server.port)
            for attempt in range(5):
                transport = make_transport()
                handler = RecordingHandler()
                async with transport.open_endpoint(LOCALHOST, handler) as a:
                    a.send_nowait(address, ["hello", attempt])
                    await handler.wait_received(count)
                    assert [e for _, e in handler.received] == [
                        ["n", seq] for seq in range(count)
                    ]
            nursery.cancel_scope.cancel()


async def test_without_wsproto_access_the_writer_sends_everything(monkeypatch):
    # A trio-websocket whose wsproto object is not found: no synchronous
    # writes, every frame through send_message by the writer, in order.
    monkeypatch.setattr(_ws_connection, "can_write_message", lambda ws: False)
    transport = make_transport()
    ha, hb = RecordingHandler(), RecordingHandler()
    with trio.fail_after(TIMEOUT):
        async with (
            transport.open_endpoint(LOCALHOST, ha) as a,
            transport.open_endpoint(LOCALHOST, hb) as b,
        ):
            a.send_nowait(b.address, ["connect"])
            await hb.wait_received(1)
            assert not connection(a, b.address).can_send_now()
            frames = a.statistics().frames_sent
            await a.send(b.address, ["queued"])
            assert a.statistics().frames_sent == frames  # left to the writer
            for seq in range(20):
                a.send_nowait(b.address, [seq])
            await hb.wait_received(22)
            assert [e for _, e in hb.received[1:]] == [["queued"]] + [
                [seq] for seq in range(20)
            ]


async def test_the_installed_trio_websocket_takes_the_direct_paths():
    """The direct paths read trio-websocket's private attributes (its message
    channel, stream and wsproto object) and fall back to the public API when
    they are not there: this fails when a trio-websocket release changes them,
    instead of every connection silently taking the slower path."""
    transport = make_transport()
    ha, hb = RecordingHandler(), RecordingHandler()
    with trio.fail_after(TIMEOUT):
        async with (
            transport.open_endpoint(LOCALHOST, ha) as a,
            transport.open_endpoint(LOCALHOST, hb) as b,
        ):
            a.send_nowait(b.address, ["connect"])
            await hb.wait_received(1)
            conn = connection(a, b.address)
            assert conn.tapped
            assert outbox_of(conn.ws) is not None
            assert can_write_message(conn.ws)


class _Batches(RecordingHandler):
    """Records how the connection hands envelopes over: the size of each
    `envelopes_received` call."""

    def __init__(self) -> None:
        super().__init__()
        self.batches: list[int] = []

    def envelopes_received(self, peer: RunnerAddress, envelopes: Any) -> None:
        self.batches.append(len(envelopes))
        super().envelopes_received(peer, envelopes)


async def test_a_frames_envelopes_are_handed_over_in_slices():
    # One call per slice of a frame (the handler sets up once for all of
    # them: the runtime's context variables), in order.
    transport = make_transport()
    ha, hb = RecordingHandler(), _Batches()
    count = _ws_connection.DISPATCH_SLICE + 5
    with trio.fail_after(TIMEOUT):
        async with (
            transport.open_endpoint(LOCALHOST, ha) as a,
            transport.open_endpoint(LOCALHOST, hb) as b,
        ):
            a.send_nowait(b.address, ["connect"])
            await hb.wait_received(1)
            for number in range(count):  # queued in one step: one frame
                a.send_nowait(b.address, ["n", number])
            await hb.wait_received(1 + count)
            assert hb.batches == [1, _ws_connection.DISPATCH_SLICE, 5]
            assert [envelope for _, envelope in hb.received[1:]] == [
                ["n", number] for number in range(count)
            ]
            assert b.statistics().envelopes_received == 1 + count
