"""The gateway's frames (pure): both subprotocols carry the same maps, and
every bad frame is a typed refusal, never a crash."""

from __future__ import annotations

import contextlib
import json

import msgpack
import pytest
from hypothesis import given, strategies as st

from trio_cluster.gateway import JSON, MSGPACK
from trio_cluster.gateway._protocol import (
    MAX_REQUEST_ID,
    BadFrame,
    Call,
    Cancel,
    CloseCode,
    Credit,
    ErrorCode,
    FrameError,
    OpenStream,
    Ping,
    Pong,
    decode_frame,
    decode_frames,
    encode_frame,
    error_frame,
    join_frames,
    parse_client_frame,
)

FRAMES = [
    (
        {"t": "call", "id": 1, "op": "A.b", "key": "k", "msg": {"x": 1}},
        Call(1, "A.b", "k", {"x": 1}),
    ),
    ({"t": "call", "id": 2, "op": "svc.m", "msg": None}, Call(2, "svc.m", None, None)),
    (
        {"t": "stream", "id": 3, "op": "A.s", "key": "k", "msg": [], "credit": 5},
        OpenStream(3, "A.s", "k", [], 5),
    ),
    ({"t": "credit", "id": 3, "n": 7}, Credit(3, 7)),
    ({"t": "cancel", "id": MAX_REQUEST_ID}, Cancel(MAX_REQUEST_ID)),
    ({"t": "ping"}, Ping()),
    ({"t": "pong", "extra": "ignored"}, Pong()),
]


@pytest.mark.parametrize("subprotocol", [JSON, MSGPACK])
@pytest.mark.parametrize(("frame", "parsed"), FRAMES)
def test_client_frames_round_trip(
    subprotocol: str, frame: dict[str, object], parsed: object
) -> None:
    message = encode_frame(frame, subprotocol)
    assert isinstance(message, str) == (subprotocol == JSON)
    assert parse_client_frame(decode_frame(message, subprotocol)) == parsed


@pytest.mark.parametrize(
    ("frame", "request_id", "code"),
    [
        ({"t": "call", "op": "A.b"}, None, ErrorCode.BAD_FRAME),
        ({"t": "call", "id": True, "op": "A.b"}, None, ErrorCode.BAD_FRAME),
        ({"t": "call", "id": 2**53, "op": "A.b"}, None, ErrorCode.BAD_FRAME),
        ({"t": "call", "id": 1.5, "op": "A.b"}, None, ErrorCode.BAD_FRAME),
        ({"t": "call", "id": 1}, 1, ErrorCode.BAD_FRAME),
        ({"t": "call", "id": 1, "op": ""}, 1, ErrorCode.BAD_FRAME),
        ({"t": "call", "id": 1, "op": "A.b", "key": 5}, 1, ErrorCode.BAD_FRAME),
        ({"t": "stream", "id": 1, "op": "A.b"}, 1, ErrorCode.BAD_FRAME),
        (
            {"t": "stream", "id": 1, "op": "A.b", "credit": 2**21},
            1,
            ErrorCode.BAD_FRAME,
        ),
        ({"t": "credit", "id": 1, "n": "many"}, 1, ErrorCode.BAD_FRAME),
        ({"t": "publish", "id": 4}, 4, ErrorCode.UNKNOWN_KIND),
        ({"t": "publish", "id": "x"}, None, ErrorCode.UNKNOWN_KIND),
    ],
)
def test_wrong_frames_are_refused_with_their_id(
    frame: dict[str, object], request_id: int | None, code: ErrorCode
) -> None:
    with pytest.raises(FrameError) as caught:
        parse_client_frame(frame)
    assert caught.value.request_id == request_id
    assert caught.value.code == code


@pytest.mark.parametrize(
    ("message", "subprotocol", "code"),
    [
        (b"{}", JSON, CloseCode.UNSUPPORTED_DATA),
        ("{}", MSGPACK, CloseCode.UNSUPPORTED_DATA),
        ("{", JSON, CloseCode.INVALID_PAYLOAD),
        ("[]", JSON, CloseCode.INVALID_PAYLOAD),
        ('{"t": 1}', JSON, CloseCode.INVALID_PAYLOAD),
        (b"\xc1", MSGPACK, CloseCode.INVALID_PAYLOAD),
        (b"\x93\x01\x02\x03", MSGPACK, CloseCode.INVALID_PAYLOAD),
        (msgpack.packb({"t": "call"}) + b"\x00", MSGPACK, CloseCode.INVALID_PAYLOAD),
    ],
)
def test_unreadable_messages_name_their_close_code(
    message: bytes | str, subprotocol: str, code: CloseCode
) -> None:
    with pytest.raises(BadFrame) as caught:
        decode_frame(message, subprotocol)
    assert caught.value.code == code


def test_values_a_format_cannot_carry_are_a_value_error() -> None:
    with pytest.raises(ValueError, match="not JSON serializable"):
        encode_frame({"t": "reply", "id": 1, "v": b"bytes"}, JSON)
    with pytest.raises(ValueError, match="Out of range float"):
        encode_frame({"t": "reply", "id": 1, "v": float("nan")}, JSON)
    assert encode_frame({"t": "reply", "id": 1, "v": b"bytes"}, MSGPACK)


def test_error_frames_carry_type_and_data_only_when_given() -> None:
    assert error_frame(1, ErrorCode.NOT_FOUND, "no") == {
        "t": "error",
        "id": 1,
        "code": "not_found",
        "message": "no",
    }
    frame = error_frame(2, ErrorCode.DECLARED, "x", type_name="E", data={"a": 1})
    assert (frame["type"], frame["data"]) == ("E", {"a": 1})


@given(st.binary(max_size=64) | st.text(max_size=64))
@pytest.mark.parametrize("subprotocol", [JSON, MSGPACK])
def test_any_message_is_a_frame_or_a_typed_refusal(
    subprotocol: str, message: bytes | str
) -> None:
    try:
        frame = decode_frame(message, subprotocol)
    except BadFrame:
        return
    with contextlib.suppress(FrameError):
        parse_client_frame(frame)


def test_json_frames_are_compact_text() -> None:
    assert encode_frame({"t": "ping"}, JSON) == json.dumps(
        {"t": "ping"}, separators=(",", ":")
    )


@pytest.mark.parametrize("subprotocol", [JSON, MSGPACK])
@pytest.mark.parametrize("count", [1, 2, 15, 16, 300])
def test_batches_join_encoded_frames_and_decode_in_order(
    subprotocol: str, count: int
) -> None:
    frames = [{"t": "item", "id": 1, "v": number} for number in range(count)]
    joined = join_frames(
        [encode_frame(frame, subprotocol) for frame in frames], subprotocol
    )
    assert decode_frames(joined, subprotocol) == frames
    single = encode_frame(frames[0], subprotocol)
    assert decode_frames(single, subprotocol) == frames[:1]


@pytest.mark.parametrize("subprotocol", [JSON, MSGPACK])
def test_a_batch_of_anything_but_frames_is_unreadable(subprotocol: str) -> None:
    for value in ([{"t": "ping"}, 3], [{"t": "ping"}, {"id": 1}], [[{"t": "ping"}]]):
        with pytest.raises(BadFrame) as caught:
            decode_frames(_raw(value, subprotocol), subprotocol)
        assert caught.value.code == CloseCode.INVALID_PAYLOAD
    with pytest.raises(BadFrame):
        decode_frame(_raw([{"t": "ping"}], subprotocol), subprotocol)  # one frame only


def _raw(value: object, subprotocol: str) -> bytes | str:
    return json.dumps(value) if subprotocol == JSON else msgpack.packb(value)
