"""Tests of the wire format shared by the transports: envelopes, frames, hello,
and the per-peer send queue that assembles frames."""

from __future__ import annotations

from collections.abc import Callable

import msgpack
import pytest
import trio
import trio.testing

from trio_cluster import (
    ConfigError,
    MalformedMessageError,
    MessageTooLargeError,
    RunnerAddress,
    RunnerUnavailableError,
)
from trio_cluster.transport import PROTOCOL_VERSION
from trio_cluster.transport._framing import (
    FRAME_OVERHEAD,
    MAGIC,
    Hello,
    check_max_message_size,
    decode_frame,
    decode_hello,
    decode_proof,
    encode_envelope,
    encode_hello,
    encode_proof,
    frame_header,
)
from trio_cluster.transport._peers import Limits, SendQueue

LIMIT = 4096
PEER = RunnerAddress("10.0.0.7", 4000)
NONCE = b"n" * 32
PROOF = b"p" * 32


def frame_of(*envelopes: list[object]) -> bytes:
    encoded = [encode_envelope(envelope, LIMIT) for envelope in envelopes]
    return frame_header(len(encoded)) + b"".join(encoded)


# ----------------------------------------------------------------------
# Envelopes and frames


def test_protocol_version_and_magic():
    assert PROTOCOL_VERSION == 1
    assert MAGIC == "trio_cluster"


def test_envelope_encodes_once_as_msgpack():
    envelope = [1, "a", b"b", None, 2.5, False, {"k": [1, {"n": None}]}, [3]]
    data = encode_envelope(envelope, LIMIT)
    assert msgpack.unpackb(data) == envelope


@pytest.mark.parametrize("count", [0, 1, 15, 16, 65535, 65536, 70000])
def test_frames_of_any_count_decode(count):
    envelopes = [[seq % 7] for seq in range(count)]
    frame = frame_header(count) + b"".join(
        encode_envelope(envelope, LIMIT) for envelope in envelopes
    )
    assert decode_frame(frame, len(frame)) == envelopes
    assert len(frame_header(count)) <= FRAME_OVERHEAD


def test_envelope_size_limit_leaves_room_for_the_header():
    limit = LIMIT - FRAME_OVERHEAD
    # [bin16 n] is 1 + 3 + n bytes.
    assert len(encode_envelope([b"x" * (limit - 4)], LIMIT)) == limit
    with pytest.raises(MessageTooLargeError) as caught:
        encode_envelope([b"x" * (limit - 3)], LIMIT)
    assert (caught.value.size, caught.value.limit) == (limit + 1, limit)
    assert "over the limit" in str(caught.value)


def assert_malformed(
    what: str, problem: str, fn: Callable[..., object], *args: object
) -> None:
    """``fn(*args)`` raises `MalformedMessageError` about ``what``, whose first
    problem says ``problem``."""
    with pytest.raises(MalformedMessageError) as caught:
        fn(*args)
    assert caught.value.what == what
    assert problem in caught.value.problems[0]


@pytest.mark.parametrize(
    ("envelope", "problem"),
    [
        ([object()], "not encodable with msgpack: can not serialize 'object'"),
        ([2**64], "not encodable"),
        (["\udcff"], "not encodable"),
        ([{(1,): 1}], "would not decode on the other side: unhashable"),
        ([[{(1,): 1}]], "would not decode"),
        ((1, 2), "an envelope must be a list, got tuple"),
        ({"a": 1}, "an envelope must be a list, got dict"),
    ],
)
def test_unencodable_envelopes_are_malformed(envelope, problem):
    assert_malformed("envelope", problem, encode_envelope, envelope, LIMIT)


def test_decodable_maps_with_odd_keys_pass():
    envelope: list[object] = [{1: "int key", b"b": "bytes key", None: 0}]
    assert decode_frame(frame_of(envelope), LIMIT) == [envelope]


@pytest.mark.parametrize(
    ("data", "problem"),
    [
        (b"\xc1", "not msgpack"),
        (b"\x92\x91\x01", "not msgpack"),  # truncated
        (b"\x91\x91\x01\x02", "not msgpack"),  # trailing data
        (msgpack.packb(7), "a frame must be an array, got int"),
        (msgpack.packb({"a": 1}), "a frame must be an array, got dict"),
        (msgpack.packb([[1], "x"]), "envelope 1 must be an array, got str"),
        (b"\x91" * 4000 + b"\xc0", "not msgpack: StackError"),  # too deep
        (b"\xdd\xff\xff\xff\xff", "exceeds max_array_len"),  # 4G elements
        (b"\x91\xc6\xff\xff\xff\xff", "incomplete input"),  # a 4 GiB bin
        (b"\x91\xdf\xff\xff\xff\xff", "exceeds max_map_len"),
        (b"\x91\xd9\x02\xff\xfe", "not msgpack"),  # invalid UTF-8
    ],
)
def test_bad_frames_are_malformed_without_allocating(data, problem):
    assert_malformed("frame", problem, decode_frame, data, LIMIT)


def test_frame_over_the_limit_is_malformed_before_decoding():
    frame = frame_of([b"x" * 100])
    with pytest.raises(MalformedMessageError, match="over max_message_size"):
        decode_frame(frame, len(frame) - 1)


@pytest.mark.parametrize("value", [1024, 4 << 20])
def test_max_message_size_check_accepts(value):
    assert check_max_message_size(value) == value


@pytest.mark.parametrize("value", [1023, 0, -1, 4.5, True, "1"])
def test_max_message_size_check_refuses(value):
    with pytest.raises(ConfigError, match="max_message_size"):
        check_max_message_size(value)


# ----------------------------------------------------------------------
# Hello


def test_hello_round_trip():
    assert decode_hello(encode_hello(PEER)) == Hello(PEER)
    for host in (
        "h" * 63,
        ("h" * 63 + ".") * 3 + "h" * 61,
        "a-b_c.example.",
        "fe80::1%eth0",
    ):
        address = RunnerAddress(host, 1)
        assert decode_hello(encode_hello(address)) == Hello(address)
    ipv6 = RunnerAddress("::1", 5)
    assert decode_hello(encode_hello(ipv6)) == Hello(ipv6)
    assert msgpack.unpackb(encode_hello(PEER)) == [MAGIC, PROTOCOL_VERSION, str(PEER)]


def test_hellos_with_a_nonce_and_proofs_round_trip():
    assert decode_hello(encode_hello(PEER, NONCE)) == Hello(PEER, NONCE)
    assert decode_hello(encode_hello(PEER, NONCE, [PROOF, PROOF])) == Hello(
        PEER, NONCE, (PROOF, PROOF)
    )
    assert decode_proof(encode_proof([PROOF])) == (PROOF,)


@pytest.mark.parametrize(
    "data",
    [
        "text",
        b"\xc1",
        msgpack.packb([MAGIC, "proof"]),
        msgpack.packb([MAGIC, "proof", []]),
        msgpack.packb([MAGIC, "proof", [b"short"]]),
        msgpack.packb([MAGIC, "proof", [PROOF] * 9]),
        msgpack.packb([MAGIC, "other", [PROOF]]),
        msgpack.packb(["HTTP", "proof", [PROOF]]),
        msgpack.packb([MAGIC, "proof", [PROOF], 1]),
        msgpack.packb([MAGIC, "proof", [PROOF] * 8]) + b"x" * 1024,
    ],
)
def test_bad_proofs_are_malformed(data):
    with pytest.raises(MalformedMessageError) as caught:
        decode_proof(data)
    assert caught.value.what == "proof"


@pytest.mark.parametrize(
    ("data", "problem"),
    [
        ("text", "a hello must be a binary message, got text"),
        (b"\xc1", "not msgpack"),
        (msgpack.packb("trio_cluster"), "a hello must be an array"),
        (msgpack.packb(["trio_cluster"]), "a hello must be an array"),
        (msgpack.packb(["HTTP", 1, "a:1"]), "not a trio_cluster peer: magic 'HTTP'"),
        (
            msgpack.packb([MAGIC, 2, "a:1"]),
            "protocol version 2 is not supported (this runner speaks version 1)",
        ),
        (msgpack.packb([MAGIC, 2]), "protocol version 2 is not supported"),
        (msgpack.packb([MAGIC, True, "a:1"]), "protocol version True"),
        (msgpack.packb([MAGIC, 1]), "[magic, version, address string"),
        (msgpack.packb([MAGIC, 1, 42]), "[magic, version, address string"),
        (msgpack.packb([MAGIC, 1, "a:1", "extra"]), "nonce must be 32 bytes"),
        (msgpack.packb([MAGIC, 1, "a:1", b"n" * 31]), "nonce must be 32 bytes"),
        (msgpack.packb([MAGIC, 1, "a:1", NONCE, []]), "proofs must be an array"),
        (msgpack.packb([MAGIC, 1, "a:1", NONCE, [b"p"]]), "binaries of 32 bytes"),
        (msgpack.packb([MAGIC, 1, "a:1", NONCE, [PROOF] * 9]), "1 to 8 binaries"),
        (msgpack.packb([MAGIC, 1, "a:1", NONCE, PROOF]), "proofs must be an array"),
        (msgpack.packb([MAGIC, 1, "a:1", NONCE, [PROOF], 0]), "address string ["),
        (msgpack.packb([MAGIC, 1, "no-port"]), "not a runner address"),
        (msgpack.packb([MAGIC, 1, "h:99999"]), "not a runner address"),
        (msgpack.packb([MAGIC, 1, "h" * 2000 + ":1"]), "over the hello limit"),
        # Issue 12, item 1: the version is an int, the host one that can be
        # dialed back (a label over 63 characters raised UnicodeError there).
        (msgpack.packb([MAGIC, 1.0, "a:1"]), "protocol version 1.0"),
        (msgpack.packb([MAGIC, 1, "h" * 64 + ":1"]), "not a host name"),
        (msgpack.packb([MAGIC, 1, ("h" * 60 + ".") * 5 + "h:1"]), "not a host name"),
        (msgpack.packb([MAGIC, 1, "a..b:1"]), "not a host name"),
        (msgpack.packb([MAGIC, 1, ".:1"]), "not a host name"),
        (msgpack.packb([MAGIC, 1, "a b:1"]), "not a host name"),
        (msgpack.packb([MAGIC, 1, "a\x00:1"]), "not a host name"),
        (msgpack.packb([MAGIC, 1, "h\u00e9:1"]), "not a host name"),
        (msgpack.packb([MAGIC, 1, "a/b:1"]), "not a host name"),
        (msgpack.packb([MAGIC, 1, "[fe80::zz]:1"]), "not a host name"),
        (msgpack.packb([MAGIC, 1, "h:" + "9" * 900]), "not a runner address"),
        (msgpack.packb([MAGIC, 1, "h:-1"]), "not a runner address"),
        (msgpack.packb([MAGIC, 1, "h:\u0661"]), "not a runner address"),
    ],
)
def test_bad_hellos_are_malformed(data, problem):
    with pytest.raises(MalformedMessageError) as caught:
        decode_hello(data)
    assert caught.value.what == "hello"
    assert problem in caught.value.problems[0]


# ----------------------------------------------------------------------
# The send queue


def limits(**overrides: int) -> Limits:
    values = {
        "max_message_size": 1024,
        "message_queue_size": 1,
        "max_queued_envelopes": 100,
        "max_queued_bytes": 4096,
    }
    values.update(overrides)
    return Limits(**values)


def test_take_frame_takes_everything_that_fits_in_order():
    queue = SendQueue(PEER, limits())
    envelopes = [[seq, b"x" * 300] for seq in range(7)]
    for envelope in envelopes:
        queue.push(encode_envelope(envelope, 1024))
    frames: list[int] = []
    while len(queue):
        frame, count = queue.take_frame()
        assert len(frame) <= 1024
        assert decode_frame(frame, 1024) == envelopes[len(frames) * 3 :][:count]
        frames.append(count)
    assert frames == [3, 3, 1]  # 306 bytes each: 3 fit in 1019
    assert queue.take_frame() == (b"\x90", 0)


def test_queue_limits_refuse_without_queueing():
    queue = SendQueue(PEER, limits(max_queued_envelopes=2, max_queued_bytes=1024))
    queue.push(b"a" * 10)
    queue.push(b"b" * 10)
    with pytest.raises(RunnerUnavailableError) as caught:
        queue.push(b"c")
    assert (caught.value.runner, caught.value.detail) == (str(PEER), "send queue full")
    assert len(queue) == 2
    assert queue.clear() == 2
    queue.push(b"x" * 1000)
    with pytest.raises(RunnerUnavailableError, match="send queue full"):
        queue.push(b"y" * 25)
    queue.push(b"y" * 24)  # exactly at the byte limit
    _, count = queue.take_frame()
    assert count == 1
    queue.push(b"z" * 1000)  # the bytes of the taken frame are free again


async def test_wait_blocks_until_something_is_queued(autojump_clock):
    queue = SendQueue(PEER, limits())
    woke: list[float] = []

    async def waiter():
        await queue.wait()
        woke.append(trio.current_time())

    async with trio.open_nursery() as nursery:
        nursery.start_soon(waiter)
        await trio.sleep(1)
        assert woke == []
        queue.push(b"\x90")
    assert woke == [1.0]
    with trio.testing.assert_checkpoints():
        await trio.lowlevel.checkpoint()
    await queue.wait()  # returns at once: something is queued


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"max_queued_bytes": 1023}, "at least max_message_size"),
        ({"message_queue_size": 0}, "message_queue_size"),
        ({"max_queued_envelopes": 1.5}, "max_queued_envelopes"),
    ],
)
def test_limits_validate(overrides, match):
    with pytest.raises(ConfigError, match=match):
        limits(**overrides)
