"""A length-prefixed binary protocol over ``trio.serve_tcp``, in front of
entities.

``python examples/length_prefixed.py`` serves the protocol on
127.0.0.1:9000 and calls it: a ping, concurrent adds to counters (entities
of the runner) answered by request id, a request that misses its deadline,
and a frame over the size limit, which closes that connection only.

Every frame is ``[length: 4 bytes, big-endian][type: 1 byte][payload]``,
``length`` counting the type byte and the payload (the seed's protocol).
`Framer` is the whole parser and does no I/O: feed it bytes as they come
(one read may hold half a frame, or many), take the complete frames out.
It refuses a frame whose header announces more than ``max_frame`` bytes as
soon as the header is in (`FrameTooLargeError`), before buffering any of
it: a peer cannot make the server hold more than one frame's worth.

Requests carry an id the reply repeats, so a connection runs many at once
and answers them in any order; each gets at most ``timeout`` seconds (the
client's wish, capped by the server). Replies and errors are JSON.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import AsyncIterator
from functools import partial
from typing import Any, Final

import attrs
import trio

import trio_cluster as tc

PING: Final = 1
PONG: Final = 2
CALL: Final = 3
REPLY: Final = 4
ERROR: Final = 5

MAX_FRAME: Final = 64 * 1024
"""Largest frame, type byte and payload, in bytes."""
MAX_TIMEOUT: Final = 30.0
"""Longest time a request may take, in seconds."""


class ProtocolError(Exception):
    """The peer broke the framing: the connection cannot go on."""


@attrs.define(eq=False)
class FrameTooLargeError(ProtocolError):
    """A frame over the limit (announced by a peer, or about to be sent)."""

    length: int
    limit: int

    def __str__(self) -> str:
        return f"frame of {self.length} bytes, over the limit of {self.limit}"


@attrs.frozen
class Frame:
    type: int
    payload: bytes = b""


def encode(frame: Frame, *, max_frame: int = MAX_FRAME) -> bytes:
    """The bytes of ``frame``.

    Raises:
        FrameTooLargeError: its payload is over the limit.
        ValueError: its type is not a byte.
    """
    length = 1 + len(frame.payload)
    if length > max_frame:
        raise FrameTooLargeError(length, max_frame)
    return length.to_bytes(4, "big") + bytes([frame.type]) + frame.payload


class Framer:
    """Frames out of a byte stream (sans-IO: no reads, no writes)."""

    def __init__(self, *, max_frame: int = MAX_FRAME) -> None:
        self._max_frame = max_frame
        self._buffer = bytearray()

    def feed(self, data: bytes | bytearray) -> list[Frame]:
        """Add bytes just read; the frames they complete, in order.

        Raises:
            FrameTooLargeError: a header announces a frame over the limit.
            ProtocolError: a header announces an empty frame (no type).
        """
        self._buffer += data
        frames = []
        while len(self._buffer) >= 4:
            length = int.from_bytes(self._buffer[:4], "big")
            if length == 0:
                raise ProtocolError("empty frame: no type byte")
            if length > self._max_frame:
                raise FrameTooLargeError(length, self._max_frame)
            if len(self._buffer) < 4 + length:
                break  # the rest of this frame is still on its way
            frames.append(Frame(self._buffer[4], bytes(self._buffer[5 : 4 + length])))
            del self._buffer[: 4 + length]
        return frames

    def end(self) -> None:
        """The stream ended.

        Raises:
            ProtocolError: in the middle of a frame.
        """
        if self._buffer:
            raise ProtocolError(f"stream ended {len(self._buffer)} bytes into a frame")


async def read_frames(
    stream: trio.abc.ReceiveStream, framer: Framer
) -> AsyncIterator[Frame]:
    """The frames of ``stream`` until it ends (errors as `Framer.feed`/`end`)."""
    while data := await stream.receive_some():
        for frame in framer.feed(data):
            yield frame
    framer.end()


# ----------------------------------------------------------------------
# The server: frames in, entity calls, frames out


@attrs.frozen
class Add:
    amount: int


class Counter(tc.Entity):
    type_name = "Counter"
    concurrency = 16  # adds overlap: their replies come back in any order

    def __init__(self) -> None:
        self.value = 0

    @tc.rpc
    async def add(self, msg: Add) -> int:
        await trio.sleep(msg.amount / 1000)  # some work: replies overtake
        self.value += msg.amount
        return self.value


async def handle_call(
    runner: tc.Runner, payload: bytes, send: trio.MemorySendChannel[Frame]
) -> None:
    """Run one CALL: ``{"id", "key", "amount", "timeout"}`` -> a REPLY
    ``{"id", "value"}`` or an ERROR ``{"id", "error"}``."""
    request_id = None
    try:
        request = json.loads(payload)
        request_id = request["id"]
        timeout = min(float(request.get("timeout", MAX_TIMEOUT)), MAX_TIMEOUT)
        counter = runner.client(Counter)(str(request["key"]))
        with trio.fail_after(timeout):
            value = await counter.add(Add(int(request["amount"])))
        answer = Frame(REPLY, json.dumps({"id": request_id, "value": value}).encode())
    except trio.TooSlowError:
        answer = Frame(
            ERROR, json.dumps({"id": request_id, "error": "timeout"}).encode()
        )
    except (ValueError, KeyError, TypeError, tc.ClusterError) as exc:
        error = {"id": request_id, "error": f"{type(exc).__name__}: {exc}"}
        answer = Frame(ERROR, json.dumps(error).encode())
    await send.send(answer)


async def serve_connection(runner: tc.Runner, stream: trio.abc.Stream) -> None:
    """Serve one client (``trio.serve_tcp``'s handler): its requests run
    concurrently, one task writes the frames."""
    send, receive = trio.open_memory_channel[Frame](64)

    async def write() -> None:
        async for frame in receive:
            await stream.send_all(encode(frame))

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(write)
            async with send:  # closed after the last reply: the writer ends
                await handle_frames(runner, stream, send)
    except* (trio.BrokenResourceError, trio.ClosedResourceError):
        pass  # the client went away
    finally:
        await trio.aclose_forcefully(stream)


async def handle_frames(
    runner: tc.Runner,
    stream: trio.abc.ReceiveStream,
    send: trio.MemorySendChannel[Frame],
) -> None:
    try:
        async with trio.open_nursery() as requests:
            async for frame in read_frames(stream, Framer()):
                if frame.type == PING:
                    await send.send(Frame(PONG, frame.payload))
                elif frame.type == CALL:
                    requests.start_soon(handle_call, runner, frame.payload, send)
                else:
                    await send.send(Frame(ERROR, b'{"error": "unknown frame type"}'))
    except* ProtocolError as group:  # this connection ends, no other
        error = {"error": str(group.exceptions[0])}
        await send.send(Frame(ERROR, json.dumps(error).encode()))


# ----------------------------------------------------------------------
# A client: requests correlated with their replies by id


class FramedClient:
    def __init__(self, stream: trio.abc.Stream) -> None:
        self._stream = stream
        self._ids = itertools.count(1)
        self._waiting: dict[int, tuple[trio.Event, list[dict[str, Any]]]] = {}
        self._pongs: list[trio.Event] = []
        self._lock = trio.Lock()

    async def read(self) -> None:
        """Hand each reply to its caller (run it in a task)."""
        async for frame in read_frames(self._stream, Framer()):
            if frame.type == PONG:
                self._pongs.pop(0).set()
                continue
            answer = json.loads(frame.payload)
            if answer.get("id") is None:  # about the connection: it ends
                raise ProtocolError(f"server error: {answer['error']}")
            waiting = self._waiting.pop(answer["id"], None)
            if waiting is not None:  # else a reply to a request given up
                waiting[1].append(answer)
                waiting[0].set()

    async def _send(self, frame: Frame) -> None:
        async with self._lock:
            await self._stream.send_all(encode(frame))

    async def ping(self) -> None:
        pong = trio.Event()
        self._pongs.append(pong)
        await self._send(Frame(PING, b"hi"))
        await pong.wait()

    async def add(self, key: str, amount: int) -> int:
        """Add to counter ``key``. The caller's deadline (its cancel scope's)
        travels with the request: the server gives up at the same time.

        Raises:
            RuntimeError: the server answered an error.
        """
        request_id = next(self._ids)
        done: tuple[trio.Event, list[dict[str, Any]]] = (trio.Event(), [])
        self._waiting[request_id] = done
        left = trio.current_effective_deadline() - trio.current_time()
        request = {"id": request_id, "key": key, "amount": amount}
        if left < MAX_TIMEOUT:
            request["timeout"] = left
        try:
            await self._send(Frame(CALL, json.dumps(request).encode()))
            await done[0].wait()
        finally:
            self._waiting.pop(request_id, None)
        answer = done[1][0]
        if "error" in answer:
            raise RuntimeError(answer["error"])
        value: int = answer["value"]
        return value


async def main(port: int = 0) -> list[str]:
    lines: list[str] = []
    async with (
        tc.open_runner(entities=[Counter]) as runner,
        trio.open_nursery() as nursery,
    ):
        listeners = await nursery.start(
            partial(
                trio.serve_tcp,
                partial(serve_connection, runner),
                port,
                host="127.0.0.1",
            )
        )
        port = listeners[0].socket.getsockname()[1]
        async with (
            await trio.open_tcp_stream("127.0.0.1", port) as stream,
            trio.open_nursery() as reading,
        ):
            client = FramedClient(stream)
            reading.start_soon(client.read)
            await client.ping()
            lines.append("ping: pong")
            done: list[str] = []

            async def add(key: str, amount: int) -> None:
                value = await client.add(key, amount)
                done.append(f"{key} +{amount} = {value}")

            async with trio.open_nursery() as requests:  # answered as they finish
                for amount in (300, 100, 200):
                    requests.start_soon(add, "a", amount)
            lines.append("replies in finishing order: " + ", ".join(done))
            with trio.move_on_after(0.1):  # the server stops it too
                await client.add("b", 500)  # (it takes 0.5 s)
            await trio.sleep(0.5)
            value = await client.add("b", 1)
            lines.append(f"after a request given up: b +1 = {value}")
            reading.cancel_scope.cancel()
        async with await trio.open_tcp_stream("127.0.0.1", port) as greedy:
            await greedy.send_all((10**9).to_bytes(4, "big"))  # 1 GB, it says
            framer = Framer()
            frames = [frame async for frame in read_frames(greedy, framer)]
            lines.append(f"a 1 GB frame: {json.loads(frames[0].payload)['error']}")
        nursery.cancel_scope.cancel()
    print(*lines, sep="\n")
    return lines


if __name__ == "__main__":
    trio.run(main, 9000)
