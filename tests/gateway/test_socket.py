"""`ServerSocket`: the gateway's WebSocket after its upgrade, read in the
caller's task. A wsproto client on the other end of a memory stream (writes
that can wait) or a socket pair under an `Outbox` (writes that never wait)
checks the messages, pings, closes, size limit, protocol errors and
cancellation."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio
import trio.testing
from trio_websocket import ConnectionClosed
from wsproto import ConnectionType
from wsproto.connection import Connection, ConnectionState
from wsproto.events import (
    BytesMessage,
    CloseConnection,
    Event,
    Ping,
    Pong,
    TextMessage,
)

from trio_cluster.gateway._socket import (
    _BEHIND_SIZE,
    _RECEIVE_SIZE,
    LATER,
    MORE,
    ServerSocket,
)
from trio_cluster.transport._ws_outbox import Outbox

from .test_frames import client_frame

MAX = 1000


class Client:
    """A wsproto client on the other end of the server's stream."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.ws = Connection(ConnectionType.CLIENT)
        self.events: list[Event] = []

    async def send(self, event: Event) -> None:
        await self.stream.send_all(self.ws.send(event))

    async def send_raw(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def next_event(self) -> Event:
        """The next event the server sent (EOF: a 1006 close)."""
        while not self.events:
            data = await self.stream.receive_some(65536)
            self.ws.receive_data(bytes(data) or None)
            self.events.extend(self.ws.events())
        return self.events.pop(0)

    async def eof(self) -> bool:
        """Whether the server closed the stream (after what it sent)."""
        while True:
            data = await self.stream.receive_some(65536)
            if not data:
                return True


class Reader:
    """Runs `ServerSocket.read_messages`, keeping what it delivers."""

    def __init__(self, socket: ServerSocket, stop_after: int | None = None) -> None:
        self.socket = socket
        self.messages: list[bytes | str] = []
        self.stop_after = stop_after
        self.done = trio.Event()
        self._arrived = trio.Event()

    def deliver(self, message: bytes | str) -> bool:
        self.messages.append(message)
        self._arrived.set()
        return self.stop_after is None or len(self.messages) < self.stop_after

    async def wait_for(self, count: int) -> None:
        """Wait until ``count`` messages were delivered."""
        while len(self.messages) < count:
            self._arrived = trio.Event()
            await self._arrived.wait()

    async def run(self) -> None:
        try:
            await self.socket.read_messages(self.deliver)
        finally:
            self.done.set()


@asynccontextmanager
async def memory_pair(
    trailing: bytes = b"",
) -> AsyncIterator[tuple[ServerSocket, Client]]:
    server_stream, client_stream = trio.testing.memory_stream_pair()
    yield (
        ServerSocket(server_stream, trailing_data=trailing, max_message_size=MAX),
        Client(client_stream),
    )


@asynccontextmanager
async def tcp_pair() -> AsyncIterator[tuple[ServerSocket, Client]]:
    left, right = trio.socket.socketpair()
    outbox = Outbox(trio.SocketStream(left))
    client_stream = trio.SocketStream(right)
    try:
        yield ServerSocket(outbox, max_message_size=MAX), Client(client_stream)
    finally:
        await outbox.aclose()
        await client_stream.aclose()


Pair = Callable[[], Any]
pairs = pytest.mark.parametrize("pair", [memory_pair, tcp_pair], ids=["memory", "tcp"])


@pairs
async def test_messages_in_order_and_replies(
    pair: Pair, autojump_clock: trio.testing.MockClock
) -> None:
    async with pair() as (socket, client), trio.open_nursery() as nursery:
        reader = Reader(socket)
        nursery.start_soon(reader.run)
        await client.send(TextMessage(data="héllo"))
        await client.send(BytesMessage(data=b"\x00\x01"))
        # A message in parts (wsproto's), a ping among them, then a whole one.
        await client.send(TextMessage(data="ab", message_finished=False))
        await client.send(Ping(payload=b"p"))
        await client.send(TextMessage(data="cd", message_finished=True))
        await client.send(BytesMessage(data=b"x" * 900))
        assert await client.next_event() == Pong(payload=b"p")
        await socket.send_message("reply")
        await socket.send_message(b"\xff")
        assert await client.next_event() == TextMessage(data="reply")
        assert await client.next_event() == BytesMessage(data=b"\xff")
        with trio.fail_after(5):
            await reader.wait_for(4)
        assert reader.messages == ["héllo", b"\x00\x01", "abcd", b"x" * 900]
        assert socket.closed is None
        nursery.cancel_scope.cancel()


async def test_frames_behind_the_upgrade_are_read_first(
    autojump_clock: trio.testing.MockClock,
) -> None:
    trailing = client_frame(0x1, b"first") + client_frame(0x2, b"second")
    async with memory_pair(trailing) as (socket, client), trio.open_nursery() as n:
        reader = Reader(socket)
        n.start_soon(reader.run)
        await client.send(TextMessage(data="third"))
        with trio.fail_after(5):
            await reader.wait_for(3)
        assert reader.messages == ["first", b"second", "third"]
        n.cancel_scope.cancel()


@pairs
async def test_the_clients_close_is_answered_and_the_stream_closed(
    pair: Pair, autojump_clock: trio.testing.MockClock
) -> None:
    async with pair() as (socket, client):
        reader = Reader(socket)
        with trio.fail_after(5):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(reader.run)
                await client.send(TextMessage(data="last"))
                await client.send(CloseConnection(code=4321, reason="bye"))
                answer = await client.next_event()
                assert isinstance(answer, CloseConnection)
                assert answer.code == 4321
                assert await client.eof()
        assert reader.messages == ["last"]
        assert socket.closed is not None
        assert (socket.closed.code, socket.closed.reason) == (4321, "bye")
        with pytest.raises(ConnectionClosed):
            await socket.send_message("late")
        await socket.aclose()  # closed already: nothing to do


@pairs
async def test_aclose_sends_the_close_and_waits_for_the_answer(
    pair: Pair, autojump_clock: trio.testing.MockClock
) -> None:
    async with pair() as (socket, client):
        answered = trio.Event()

        async def client_side() -> None:
            event = await client.next_event()
            assert isinstance(event, CloseConnection)
            assert (event.code, event.reason) == (4001, "slow")
            await client.send_raw(client_frame(0x1, b"dropped"))  # after the close
            await client.send(event.response())
            answered.set()
            assert await client.eof()

        with trio.fail_after(5):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(client_side)
                await socket.aclose(4001, "slow")
                assert answered.is_set()
        assert socket.closed is not None
        assert socket.closed.code == 4001  # the client's answer
        assert client.ws.state is ConnectionState.CLOSED


@pairs
async def test_aclose_unread_shuts_the_stream_and_parses_nothing_more(
    pair: Pair, autojump_clock: trio.testing.MockClock
) -> None:
    """A close ``unread`` (a client that broke a rule): the close frame, then
    the end of the stream; what the client sends after it is not parsed
    (bytes that are a protocol error change nothing)."""
    async with pair() as (socket, client):

        async def client_side() -> None:
            event = await client.next_event()
            assert isinstance(event, CloseConnection)
            assert (event.code, event.reason) == (4008, "too fast")
            assert await client.eof()  # before the client closes anything
            await client.send_raw(client_frame(0x1, b"dropped") * 100)
            await client.send_raw(b"\xff\xff\xff")  # not a frame
            await client.stream.aclose()

        with trio.fail_after(5):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(client_side)
                await socket.aclose(4008, "too fast", unread=True)
        assert socket.closed is not None
        assert (socket.closed.code, socket.closed.reason) == (4008, "too fast")
        await socket.aclose()  # closed already: nothing to do


async def test_aclose_gives_up_when_cancelled_and_closes_the_stream(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with memory_pair() as (socket, client):
        with trio.move_on_after(1) as waited:
            await socket.aclose(1000, "done")  # the client never answers
        assert waited.cancelled_caught
        event = await client.next_event()
        assert isinstance(event, CloseConnection)
        assert await client.eof()


@pairs
async def test_a_message_over_the_limit_closes_1009(
    pair: Pair, autojump_clock: trio.testing.MockClock
) -> None:
    async with pair() as (socket, client):
        reader = Reader(socket)
        with trio.fail_after(5):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(reader.run)
                await client.send(TextMessage(data="ok"))
                await client.send(BytesMessage(data=b"x" * (MAX + 1)))
                event = await client.next_event()
                assert isinstance(event, CloseConnection)
                assert event.code == 1009
                assert event.reason == f"Exceeded maximum message size: {MAX} bytes"
                # Read on, dropping messages, until the client answers.
                await client.send_raw(client_frame(0x1, b"dropped"))
                assert not reader.done.is_set()
                await client.send(CloseConnection(code=1000))  # any answer
                assert await client.eof()
        assert reader.messages == ["ok"]
        assert socket.closed is not None
        assert socket.closed.code == 1009  # what the gateway counts


async def test_a_message_in_parts_over_the_limit_closes_1009(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with memory_pair() as (socket, client), trio.open_nursery() as nursery:
        reader = Reader(socket)
        nursery.start_soon(reader.run)
        for _ in range(3):
            await client.send(BytesMessage(data=b"y" * 400, message_finished=False))
        event = await client.next_event()
        assert isinstance(event, CloseConnection)
        assert event.code == 1009
        assert reader.messages == []
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize(
    ("frame", "code"),
    [
        (client_frame(0x1, b"\xff\xfe"), 1007),  # text that is not UTF-8
        (client_frame(0x2, b"x", masked=False), 1002),  # an unmasked frame
        (client_frame(0x2, b"x", rsv=1), 1002),  # an RSV bit, no extension
        (client_frame(0x3, b"x"), 1002),  # a reserved opcode
        (client_frame(0x0, b"x"), 1002),  # a continuation of nothing
        (client_frame(0x9, b"p" * 126), 1002),  # a ping over 125 bytes
        (client_frame(0x2, b"x", long_length=True), 1002),  # not minimal
    ],
)
async def test_a_protocol_error_closes_the_stream_without_a_close_frame(
    frame: bytes, code: int, autojump_clock: trio.testing.MockClock
) -> None:
    async with memory_pair() as (socket, client):
        reader = Reader(socket)
        with trio.fail_after(5):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(reader.run)
                await client.send(TextMessage(data="before"))
                await client.send_raw(frame + client_frame(0x1, b"after"))
                assert await client.eof()
        assert reader.messages == ["before"]
        assert socket.closed is not None
        assert socket.closed.code == code


@pairs
async def test_the_stream_ending_first_is_1006(
    pair: Pair, autojump_clock: trio.testing.MockClock
) -> None:
    async with pair() as (socket, client):
        reader = Reader(socket)
        with trio.fail_after(5):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(reader.run)
                await client.send(TextMessage(data="one"))
                await client.stream.aclose()
        assert reader.messages == ["one"]
        assert socket.closed is not None
        assert socket.closed.code == 1006
        with pytest.raises(ConnectionClosed):
            await socket.send_message("late")


async def test_messages_after_deliver_says_no_are_dropped(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with memory_pair() as (socket, client), trio.open_nursery() as nursery:
        reader = Reader(socket, stop_after=1)
        nursery.start_soon(reader.run)
        await client.send_raw(
            client_frame(0x1, b"one")
            + client_frame(0x1, b"two", fin=False)
            + client_frame(0x0, b"!")
            + client_frame(0x1, b"three")
        )
        await client.send(Ping(payload=b"still read"))
        assert await client.next_event() == Pong(payload=b"still read")
        assert reader.messages == ["one"]
        assert not reader.done.is_set()
        nursery.cancel_scope.cancel()


@pairs
async def test_cancelling_the_reader_leaves_the_socket_open(
    pair: Pair, autojump_clock: trio.testing.MockClock
) -> None:
    async with pair() as (socket, client):
        reader = Reader(socket)
        with trio.move_on_after(1):
            await reader.run()
        assert socket.closed is None
        await client.send(TextMessage(data="later"))
        async with trio.open_nursery() as nursery:
            nursery.start_soon(reader.run)
            with trio.fail_after(5):
                await reader.wait_for(1)
            nursery.cancel_scope.cancel()
        assert reader.messages == ["later"]
        await socket.send_message("still open")
        assert await client.next_event() == TextMessage(data="still open")


async def test_a_write_to_a_failed_stream_is_connection_closed_1006(
    autojump_clock: trio.testing.MockClock,
) -> None:
    left, right = trio.socket.socketpair()
    outbox = Outbox(trio.SocketStream(left))
    socket = ServerSocket(outbox, max_message_size=MAX)
    await outbox.aclose()
    right.close()
    with pytest.raises(ConnectionClosed) as caught:
        await socket.send_message("x")
    assert caught.value.reason is not None
    assert caught.value.reason.code == 1006
    assert socket.closed is not None


async def test_send_message_refuses_other_types(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with memory_pair() as (socket, _):
        with pytest.raises(TypeError):
            await socket.send_message(1234)  # type: ignore[arg-type]


class _Reads(trio.abc.Stream):
    """A stream that records how much each read asked for."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.asked: list[int | None] = []

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.stream.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.stream.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        self.asked.append(max_bytes)
        return bytes(await self.stream.receive_some(max_bytes))

    async def aclose(self) -> None:
        await self.stream.aclose()


async def test_a_socket_ahead_of_its_rate_lets_others_run_between_its_messages(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """The callback answers LATER (the socket is ahead of its rate): the
    other tasks run between every two of its messages, which stay in
    order, and its next read is a short one; MORE again: full reads."""
    ticks = 0
    seen: list[int] = []
    server_stream, client_stream = trio.testing.memory_stream_pair()
    reads = _Reads(server_stream)
    socket = ServerSocket(reads, max_message_size=MAX)
    client = Client(client_stream)

    async def other_task() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await trio.lowlevel.checkpoint()

    async with trio.open_nursery() as nursery:
        reader = Reader(socket)

        def deliver(message: bytes | str) -> int:
            seen.append(ticks)
            reader.deliver(message)
            return LATER if len(seen) <= 10 else MORE

        async def read() -> None:
            await socket.read_messages(deliver)

        nursery.start_soon(other_task)
        nursery.start_soon(read)
        with trio.fail_after(5):
            await client.send_raw(
                b"".join(client_frame(0x1, b"m%d" % n) for n in range(10))
            )
            await reader.wait_for(10)
            await client.send_raw(
                b"".join(client_frame(0x1, b"n%d" % n) for n in range(5))
            )
            await reader.wait_for(15)
            await client.send_raw(client_frame(0x1, b"last"))
            await reader.wait_for(16)
        assert reader.messages == [
            *(f"m{n}" for n in range(10)),
            *(f"n{n}" for n in range(5)),
            "last",
        ]
        # One scheduling batch per message, the other task running once in
        # each (before or after the reader: the order in a batch varies).
        assert seen[9] - seen[0] >= 8
        # The first read took the 10; the next one, behind, was short; the
        # 5 after it were MORE: full reads again.
        assert reads.asked[:3] == [_RECEIVE_SIZE, _BEHIND_SIZE, _RECEIVE_SIZE]
        nursery.cancel_scope.cancel()


@pairs
async def test_a_burst_of_messages_lets_other_tasks_run(
    pair: Pair, autojump_clock: trio.testing.MockClock
) -> None:
    """100 messages arriving in one read are delivered in order, and the
    reader lets other tasks run between every 32 of them (a client's burst
    cannot hold the others up for its whole length)."""
    ticks = 0
    seen: list[int] = []

    async def other_task() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await trio.lowlevel.checkpoint()

    async with pair() as (socket, client), trio.open_nursery() as nursery:
        reader = Reader(socket)

        def deliver(message: bytes | str) -> bool:
            seen.append(ticks)
            return reader.deliver(message)

        async def read() -> None:
            await socket.read_messages(deliver)

        burst = b"".join(client_frame(0x1, b"m%d" % n) for n in range(100))
        await client.send_raw(burst)
        nursery.start_soon(other_task)
        nursery.start_soon(read)
        with trio.fail_after(5):
            await reader.wait_for(100)
        assert reader.messages == [f"m{n}" for n in range(100)]
        # Within a share of 32 the other task does not run; between the
        # shares it does (once per scheduling batch: the shares take one
        # batch each, in some order with it).
        assert len(set(seen[:32])) == 1
        assert seen[99] >= seen[0] + 2
        nursery.cancel_scope.cancel()
