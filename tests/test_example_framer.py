"""examples/length_prefixed.py: the sans-IO `Framer` under any
fragmentation (Hypothesis), its limits, the server over memory streams in
virtual time, and the example over real TCP."""

from __future__ import annotations

import json

import pytest
import trio
import trio.testing
from hypothesis import given, strategies as st

from .helpers import load_example

example = load_example("length_prefixed")
Frame, Framer = example.Frame, example.Framer

frames = st.builds(Frame, st.integers(0, 255), st.binary(max_size=300))


@given(
    st.lists(frames, max_size=20),
    st.lists(st.integers(0, 10_000), max_size=30),
)
def test_frames_come_out_whole_whatever_the_reads(
    sent: list[object], cuts: list[int]
) -> None:
    data = b"".join(example.encode(frame) for frame in sent)
    points = sorted({cut % (len(data) + 1) for cut in cuts})
    framer = Framer()
    received = []
    for start, stop in zip([0, *points], [*points, len(data)], strict=True):
        received += framer.feed(data[start:stop])
    framer.end()
    assert received == sent


def test_a_frame_over_the_limit_is_refused_at_its_header() -> None:
    framer = Framer(max_frame=100)
    assert framer.feed(example.encode(Frame(7, b"x" * 99))) == [Frame(7, b"x" * 99)]
    header = (101).to_bytes(4, "big")
    assert framer.feed(header[:3]) == []
    with pytest.raises(example.FrameTooLargeError) as caught:
        framer.feed(header[3:])  # before any of its 101 bytes arrived
    assert (caught.value.length, caught.value.limit) == (101, 100)
    with pytest.raises(example.FrameTooLargeError):
        example.encode(Frame(1, b"x" * 100), max_frame=100)


def test_broken_framing_is_a_protocol_error() -> None:
    with pytest.raises(example.ProtocolError, match="empty frame"):
        Framer().feed(b"\x00\x00\x00\x00")
    framer = Framer()
    assert framer.feed(example.encode(Frame(1, b"abc"))[:-1]) == []
    with pytest.raises(example.ProtocolError, match="7 bytes into a frame"):
        framer.end()
    with pytest.raises(ValueError, match="range"):
        example.encode(Frame(256))


async def open_connection(runner: object, nursery: trio.Nursery) -> trio.abc.Stream:
    client_end, server_end = trio.testing.memory_stream_pair()
    nursery.start_soon(example.serve_connection, runner, server_end)
    return client_end


async def test_the_server_in_virtual_time(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with (
        example.tc.open_runner(entities=[example.Counter]) as runner,
        trio.open_nursery() as nursery,
    ):
        stream = await open_connection(runner, nursery)
        client = example.FramedClient(stream)
        nursery.start_soon(client.read)
        await client.ping()
        finished: list[tuple[int, int, float]] = []

        async def add(amount: int) -> None:
            value = await client.add("a", amount)
            finished.append((amount, value, trio.current_time()))

        start = trio.current_time()
        async with trio.open_nursery() as requests:
            for amount in (300, 100, 200):
                requests.start_soon(add, amount)
        # Concurrent, answered as they finish (id correlation).
        assert [(a, v, round(t - start, 3)) for a, v, t in finished] == [
            (100, 100, 0.1),
            (200, 300, 0.2),
            (300, 600, 0.3),
        ]
        # The caller's deadline travels: the server stops the request too.
        with trio.move_on_after(0.1):
            await client.add("b", 500)
        await trio.sleep(1)
        assert await client.add("b", 1) == 1
        with pytest.raises(RuntimeError, match="ValueError"):
            await client.add("b", "many")
        # Broken framing ends that connection (with an error frame), and
        # no other.
        broken = await open_connection(runner, nursery)
        await broken.send_all(b"\x00\x00\x00\x00")
        framer = Framer()
        received = [frame async for frame in example.read_frames(broken, framer)]
        assert [frame.type for frame in received] == [example.ERROR]
        assert json.loads(received[0].payload) == {"error": "empty frame: no type byte"}
        assert await client.add("a", 1) == 601
        nursery.cancel_scope.cancel()


async def test_length_prefixed_example(capsys: pytest.CaptureFixture[str]) -> None:
    """Real TCP on 127.0.0.1."""
    with trio.fail_after(60):
        lines = await example.main()
    assert lines == [
        "ping: pong",
        "replies in finishing order: a +100 = 100, a +200 = 300, a +300 = 600",
        "after a request given up: b +1 = 1",
        "a 1 GB frame: frame of 1000000000 bytes, over the limit of 65536",
    ]
    assert "ping: pong" in capsys.readouterr().out
