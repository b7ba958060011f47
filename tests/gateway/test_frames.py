"""`FastWSConnection` reads what wsproto alone reads: the same messages,
control frames and closes, in the same order, however the bytes are cut
into reads (pure, generated frames)."""

from __future__ import annotations

import itertools
import os

import pytest
from hypothesis import given, settings, strategies as st
from wsproto import ConnectionType
from wsproto.connection import Connection, ConnectionState
from wsproto.events import (
    BytesMessage,
    CloseConnection,
    Event,
    Message,
    Ping,
    Pong,
    TextMessage,
)

from trio_cluster.gateway._frames import FastWSConnection, data_frame

MAX_FRAME = 300


def client_frame(
    opcode: int,
    payload: bytes,
    *,
    fin: bool = True,
    rsv: int = 0,
    masked: bool = True,
    long_length: bool = False,
    mid_length: bool = False,
) -> bytes:
    size = len(payload)
    first = (0x80 if fin else 0) | rsv << 4 | opcode
    mask_bit = 0x80 if masked else 0
    if long_length:
        header = bytes((first, mask_bit | 127)) + size.to_bytes(8, "big")
    elif mid_length:
        header = bytes((first, mask_bit | 126)) + size.to_bytes(2, "big")
    elif size < 126:
        header = bytes((first, mask_bit | size))
    elif size < 1 << 16:
        header = bytes((first, mask_bit | 126)) + size.to_bytes(2, "big")
    else:
        header = bytes((first, mask_bit | 127)) + size.to_bytes(8, "big")
    if not masked:
        return header + payload
    key = os.urandom(4)
    return header + key + bytes(b ^ key[i % 4] for i, b in enumerate(payload))


payloads = st.binary(max_size=400) | st.sampled_from([b"", b"x" * 126, b"y" * 299])
texts = st.text(max_size=200).map(str.encode) | st.just(b"\xff\xfe bad utf-8")

frames = st.one_of(
    st.builds(lambda p: client_frame(0x2, p), payloads),
    st.builds(lambda p: client_frame(0x1, p), texts),
    # a fragmented message: first, continuations (a ping among them), last
    st.builds(
        lambda a, b, op: (
            client_frame(op, a, fin=False)
            + client_frame(0x9, b"p")
            + client_frame(0x0, b, fin=False)
            + client_frame(0x0, b"end")
        ),
        payloads,
        payloads,
        st.sampled_from([0x1, 0x2]),
    ),
    # a fragment left open: the frames after it are wsproto's to judge
    st.builds(
        lambda p, op: client_frame(op, p, fin=False),
        payloads,
        st.sampled_from([0x1, 0x2]),
    ),
    st.builds(lambda p: client_frame(0x9, p[:100]), payloads),
    st.builds(lambda p: client_frame(0xA, p[:100]), payloads),
    # wrong ones: wsproto refuses them (and closes)
    st.builds(lambda p: client_frame(0x2, p, rsv=4), payloads),
    st.builds(lambda p: client_frame(0x2, p, masked=False), payloads),
    st.builds(lambda p: client_frame(0x2, p, long_length=True), payloads),
    st.builds(lambda p: client_frame(0x2, p, mid_length=True), payloads),
    st.builds(lambda p: client_frame(0x0, p), payloads),
    st.builds(lambda p: client_frame(0x3, p), payloads),
    st.just(client_frame(0x8, (1000).to_bytes(2, "big") + b"bye")),
)


def whole(events: list[Event]) -> list[object]:
    """Events with message parts joined into messages, as trio-websocket
    joins them; nothing after the first close."""
    out: list[object] = []
    parts: list[bytes | str] = []
    for event in events:
        if isinstance(event, Message):
            parts.append(event.data)
            if event.message_finished:
                kind = "text" if isinstance(event, TextMessage) else "bytes"
                joined = "".join(parts) if kind == "text" else b"".join(parts)  # type: ignore[arg-type]
                out.append((kind, joined))
                parts = []
        elif isinstance(event, Ping | Pong):
            out.append((type(event).__name__, bytes(event.payload)))
        elif isinstance(event, CloseConnection):
            out.append(("close", event.code))
            break
    return out


def read(connection: Connection | FastWSConnection, chunks: list[bytes]) -> list[Event]:
    events: list[Event] = []
    for chunk in chunks:
        if connection.state is ConnectionState.CLOSED:
            break
        connection.receive_data(chunk)
        events.extend(connection.events())
    return events


@settings(max_examples=300)
@given(stream=st.lists(frames, max_size=8), cuts=st.lists(st.integers(0, 3000)))
def test_fast_reading_is_wsprotos(stream: list[bytes], cuts: list[int]) -> None:
    data = b"".join(stream)
    points = sorted({0, len(data), *(cut for cut in cuts if cut < len(data))})
    chunks = [data[a:b] for a, b in itertools.pairwise(points)]
    expected = whole(read(Connection(ConnectionType.SERVER), chunks))
    fast = FastWSConnection(max_frame=MAX_FRAME)
    assert whole(read(fast, chunks)) == expected


@settings(max_examples=300)
@given(
    stream=st.lists(frames, max_size=8),
    cuts=st.lists(st.integers(0, 3000)),
    close_after=st.integers(0, 8),
)
def test_fast_reading_after_the_servers_close_is_wsprotos(
    stream: list[bytes], cuts: list[int], close_after: int
) -> None:
    """The server sends its close amid the stream (it closes a client that
    broke a rule): what is read from then on, a frame begun before
    included, is still read as wsproto reads it."""
    data = b"".join(stream)
    points = sorted({0, len(data), *(cut for cut in cuts if cut < len(data))})
    chunks = [data[a:b] for a, b in itertools.pairwise(points)]
    before, after = chunks[:close_after], chunks[close_after:]
    results = []
    for connection in (
        Connection(ConnectionType.SERVER),
        FastWSConnection(max_frame=MAX_FRAME),
    ):
        events = read(connection, before)
        if connection.state is ConnectionState.OPEN:
            connection.send(CloseConnection(code=4008))
        events += read(connection, after)
        results.append(whole(events))
    assert results[1] == results[0]


def test_a_frame_begun_before_the_servers_close_is_read_whole() -> None:
    fast = FastWSConnection(max_frame=MAX_FRAME)
    frame = client_frame(0x1, b"late")
    fast.receive_data(frame[:3])
    fast.send(CloseConnection(code=4008))
    fast.receive_data(frame[3:] + client_frame(0x8, (1000).to_bytes(2, "big")))
    assert whole(list(fast.events())) == [("text", "late"), ("close", 1000)]


def test_trailing_data_is_read() -> None:
    fast = FastWSConnection(client_frame(0x2, b"early"), max_frame=MAX_FRAME)
    assert whole(list(fast.events())) == [("bytes", b"early")]


@pytest.mark.parametrize("size", [0, 1, 125, 126, 65535, 65536, 70000])
@pytest.mark.parametrize("message", ["text", b"bytes"])
def test_data_frame_is_what_wsproto_writes(size: int, message: str | bytes) -> None:
    body = message * size if size else message[:0]
    event = TextMessage(data=body) if isinstance(body, str) else BytesMessage(data=body)
    assert data_frame(body) == Connection(ConnectionType.SERVER).send(event)
    assert FastWSConnection(max_frame=MAX_FRAME).send(event) == data_frame(body)


def test_a_frame_over_max_frame_goes_to_wsproto_as_it_comes() -> None:
    fast = FastWSConnection(max_frame=MAX_FRAME)
    frame = client_frame(0x2, b"z" * (MAX_FRAME + 1))
    fast.receive_data(frame[:100])
    [part] = fast.events()  # not held back: wsproto streams it
    assert isinstance(part, BytesMessage)
    assert not part.message_finished


def test_plain_frames_after_a_fragmented_message_are_read_here() -> None:
    fast = FastWSConnection(max_frame=MAX_FRAME)
    fast.receive_data(client_frame(0x2, b"a", fin=False) + client_frame(0x0, b"b"))
    assert whole(list(fast.events())) == [("bytes", b"ab")]
    frame = client_frame(0x2, b"whole")
    fast.receive_data(frame[:8])
    assert list(fast.events()) == []  # held until complete: read here
    fast.receive_data(frame[8:])
    assert whole(list(fast.events())) == [("bytes", b"whole")]


def test_take_events_gives_plain_messages_as_their_payloads() -> None:
    fast = FastWSConnection(max_frame=1000)
    fast.receive_data(
        client_frame(0x2, b"ab")
        + client_frame(0x1, "hé".encode())
        + client_frame(0x9, b"p")
        + client_frame(0x2, b"x" * 1001)  # over max_frame: wsproto's
    )
    events = fast.take_events()
    assert events[:2] == [b"ab", "hé"]
    assert isinstance(events[2], Ping)
    assert events[3] == BytesMessage(data=b"x" * 1001)
    assert fast.take_events() == ()
