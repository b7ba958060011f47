"""The gateway's wire protocol: subprotocols, frames, error codes, close
codes (pure: no I/O).

Theory of operation. Every WebSocket message is one *frame* (a map with a
kind ``"t"`` and the kind's fields) or a *batch*: a list of frames, handled
in order as if each had come alone (either side may batch; the gateway
does when frames wait for a slow socket). The two subprotocols carry the same
maps: ``trio_cluster.json.v1`` as JSON in text messages (a browser's
native ``WebSocket`` speaks it), ``trio_cluster.msgpack.v1`` as msgpack in
binary messages. The version is in the subprotocol's name: a later
incompatible protocol is a new name, and a server offers both while clients
move. Unknown fields of a frame are ignored (a newer peer may add some);
an unknown kind is answered with an ``unknown_kind`` error frame.

`decode_frames` turns a message into its frames, or raises `BadFrame`
with the close code to use (the message cannot be read at all: the socket is
closed). `parse_client_frame` turns a map into one of the client frame
records, or raises `FrameError`, which is answered with an error frame (the
socket stays up: one bad request never fails another). The full
description with examples is ``docs/gateway.md``.
"""

from __future__ import annotations

import enum
import json
from typing import TYPE_CHECKING, Any, Final

import attrs
import msgpack

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping

__all__ = [
    "JSON",
    "MAX_ACKS",
    "MAX_REQUEST_ID",
    "MSGPACK",
    "PROTOCOL_VERSION",
    "SUBPROTOCOLS",
    "Ack",
    "BadFrame",
    "Call",
    "Cancel",
    "ClientFrame",
    "CloseCode",
    "Credit",
    "ErrorCode",
    "FrameError",
    "ListPresence",
    "OpenStream",
    "Ping",
    "Pong",
    "Subscribe",
    "Unsubscribe",
    "decode_frame",
    "decode_frames",
    "encode_frame",
    "join_frames",
    "parse_client_frame",
    "ping_frame",
    "pong_frame",
]

PROTOCOL_VERSION: Final = 1
JSON: Final = "trio_cluster.json.v1"
MSGPACK: Final = "trio_cluster.msgpack.v1"
SUBPROTOCOLS: Final = (MSGPACK, JSON)
"""The subprotocols a gateway speaks, in its order of preference."""

MAX_REQUEST_ID: Final = 2**53 - 1
"""Request ids are integers 0..2**53-1 (exact in a JavaScript number)."""

MAX_CREDIT: Final = 1 << 20
"""Most items one ``credit`` frame (or a stream's opening) may grant."""


class CloseCode(enum.IntEnum):
    """WebSocket close codes the gateway sends."""

    NORMAL = 1000
    GOING_AWAY = 1001
    """The gateway is shutting down: reconnect (to another runner)."""
    UNSUPPORTED_DATA = 1003
    """A binary message on the JSON subprotocol, or text on msgpack."""
    INVALID_PAYLOAD = 1007
    """A message that is not valid JSON/msgpack, or not a map."""
    POLICY_VIOLATION = 1008
    MESSAGE_TOO_BIG = 1009
    INTERNAL_ERROR = 1011
    HEARTBEAT_TIMEOUT = 4000
    """Nothing heard from the client within ping_interval + ping_timeout."""
    SLOW_CONSUMER = 4001
    """The client did not read fast enough: its send queue was full, or one
    message took longer than send_timeout to write."""
    SESSION_DETACHED = 4002
    """The socket's session attached to another socket (the client
    connected again elsewhere), fell too far behind, or belongs to another
    user."""
    RATE_LIMITED = 4008
    """More messages than the per-connection rate limit allows."""


class ErrorCode(enum.StrEnum):
    """The ``code`` of an error frame."""

    BAD_FRAME = "bad_frame"
    """A frame of the wrong shape (missing or mistyped fields)."""
    UNKNOWN_KIND = "unknown_kind"
    BAD_REQUEST = "bad_request"
    """The request's message does not decode to the handler's type, or its
    entity id is invalid (or missing, or given to a service)."""
    NOT_FOUND = "not_found"
    """No exposed operation of that name."""
    DUPLICATE_ID = "duplicate_id"
    """A request id already in flight on this socket."""
    TOO_MANY_REQUESTS = "too_many_requests"
    """Over the socket's bound on concurrent requests."""
    FORBIDDEN = "forbidden"
    """The authorization hook refused the operation."""
    DECLARED = "declared"
    """The handler raised an error it declares: ``type`` and ``data``."""
    UNAVAILABLE = "unavailable"
    """The cluster could not serve it now (retryable)."""
    CANCELLED = "cancelled"
    """The answer to a ``cancel``: the request was cancelled."""
    INTERNAL = "internal"
    """Anything else (details are logged on the server only)."""


class BadFrame(Exception):
    """A message that cannot be read as a frame: close with ``code``."""

    def __init__(self, code: CloseCode, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


class FrameError(Exception):
    """A frame that is readable but wrong: answer an error frame."""

    def __init__(self, request_id: int | None, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.request_id = request_id
        self.code = code
        self.message = message


@attrs.frozen
class Call:
    """``{"t": "call", "id": 1, "op": "Counter.increment", "key": "a", "msg": {...}}``"""

    id: int
    op: str
    key: str | None
    msg: object


@attrs.frozen
class OpenStream:
    """``{"t": "stream", "id": 2, "op": ..., "key": ..., "msg": ..., "credit": 16}``"""

    id: int
    op: str
    key: str | None
    msg: object
    credit: int


@attrs.frozen
class Credit:
    """``{"t": "credit", "id": 2, "n": 16}``: the stream may send n more items."""

    id: int
    n: int


@attrs.frozen
class Cancel:
    """``{"t": "cancel", "id": 1}``: cancel that request's work."""

    id: int


@attrs.frozen
class Subscribe:
    """``{"t": "subscribe", "id": 3, "topic": "room:1", "since": {"epoch": "e", "offset": 7}}``"""

    id: int
    topic: str
    since: tuple[str, int] | None
    presence: bool = False
    """Whether the answer has the topic's presence, and presence diffs
    follow."""


@attrs.frozen
class ListPresence:
    """``{"t": "presence", "id": 5, "topic": "room:1"}``: answered with
    ``{connection id: data}``."""

    id: int
    topic: str


@attrs.frozen
class Unsubscribe:
    """``{"t": "unsubscribe", "id": 4, "topic": "room:1"}``"""

    id: int
    topic: str


@attrs.frozen
class Ack:
    """``{"t": "ack", "epoch": "e", "seqs": [1, 2]}``: the client got these
    pushes of its session."""

    epoch: str
    seqs: list[int]


@attrs.frozen
class Ping:
    """``{"t": "ping"}``: answer with a pong (either side sends them)."""


@attrs.frozen
class Pong:
    """``{"t": "pong"}``"""


ClientFrame = (
    Call
    | OpenStream
    | Credit
    | Cancel
    | Subscribe
    | Unsubscribe
    | ListPresence
    | Ack
    | Ping
    | Pong
)


def encode_frame(frame: Mapping[str, Any], subprotocol: str) -> bytes | str:
    """One frame as a WebSocket message of ``subprotocol``.

    Raises:
        ValueError: a value the format cannot carry (bytes, NaN in JSON).
    """
    if subprotocol == JSON:
        try:
            return _JSON_ENCODER.encode(frame)
        except TypeError as exc:
            raise ValueError(str(exc)) from None
    try:
        return _PACKER.pack(frame)  # type: ignore[no-any-return]
    except (TypeError, OverflowError) as exc:
        raise ValueError(str(exc)) from None


# NOTE: one encoder of each kind for every frame: ``json.dumps`` with options
# and ``msgpack.packb`` make a new one per call, which costs more than
# encoding a small frame. A `msgpack.Packer` empties its buffer when a
# ``pack`` fails, and a frame is encoded in one synchronous call: sharing
# them is safe.
_JSON_ENCODER: Final = json.JSONEncoder(separators=(",", ":"), allow_nan=False)
_PACKER: Final = msgpack.Packer()


_PINGS: Final = {
    JSON: encode_frame({"t": "ping"}, JSON),
    MSGPACK: encode_frame({"t": "ping"}, MSGPACK),
}
_PONGS: Final = {
    JSON: encode_frame({"t": "pong"}, JSON),
    MSGPACK: encode_frame({"t": "pong"}, MSGPACK),
}


def ping_frame(subprotocol: str) -> bytes | str:
    """The ``ping`` frame of ``subprotocol``, encoded (once, for every
    socket)."""
    return _PINGS[subprotocol]


def pong_frame(subprotocol: str) -> bytes | str:
    """The ``pong`` frame of ``subprotocol``, encoded once."""
    return _PONGS[subprotocol]


def decode_frames(message: bytes | str, subprotocol: str) -> list[dict[str, Any]]:
    """The frames of a received message: one frame, or a list of frames
    (a batch), in order.

    Raises:
        BadFrame: the wrong message type for the subprotocol, not valid
            JSON/msgpack, or not a frame (a map with a string ``"t"``) nor
            a list of frames.
    """
    value = _decode(message, subprotocol)
    # NOTE: `_is_frame` inlined for the commonest message, one frame.
    if type(value) is dict and type(value.get("t")) is str:
        return [value]
    if isinstance(value, list):
        if not all(_is_frame(item) for item in value):
            raise BadFrame(CloseCode.INVALID_PAYLOAD, "a batch is a list of frames")
        return value
    if not _is_frame(value):
        raise BadFrame(CloseCode.INVALID_PAYLOAD, 'a frame is a map with a string "t"')
    return [value]


def _is_frame(value: object) -> bool:
    return isinstance(value, dict) and isinstance(value.get("t"), str)


def join_frames(messages: list[bytes | str], subprotocol: str) -> bytes | str:
    """One message carrying the already encoded frames ``messages`` as a
    batch (a JSON array, a msgpack array), without decoding them again."""
    if subprotocol == JSON:
        return (
            "["
            + ",".join(message for message in messages if isinstance(message, str))
            + "]"
        )
    count = len(messages)
    if count < 16:
        header = bytes([0x90 | count])
    elif count < 1 << 16:
        header = b"\xdc" + count.to_bytes(2, "big")
    else:
        header = b"\xdd" + count.to_bytes(4, "big")
    return header + b"".join(
        message for message in messages if isinstance(message, bytes)
    )


def decode_frame(message: bytes | str, subprotocol: str) -> dict[str, Any]:
    """A received message as one frame map (not a batch).

    Raises:
        BadFrame: the wrong message type for the subprotocol, not valid
            JSON/msgpack, or not a map with a string ``"t"``.
    """
    value = _decode(message, subprotocol)
    if not _is_frame(value):
        raise BadFrame(CloseCode.INVALID_PAYLOAD, 'a frame is a map with a string "t"')
    return value  # type: ignore[no-any-return]


def _decode(message: bytes | str, subprotocol: str) -> Any:
    try:
        if subprotocol == JSON:
            if not isinstance(message, str):
                raise BadFrame(CloseCode.UNSUPPORTED_DATA, "binary message on JSON")
            value = json.loads(message)
        else:
            if not isinstance(message, bytes):
                raise BadFrame(CloseCode.UNSUPPORTED_DATA, "text message on msgpack")
            value = msgpack.unpackb(message, strict_map_key=False)
    except BadFrame:
        raise
    except (ValueError, TypeError, msgpack.UnpackException) as exc:
        raise BadFrame(CloseCode.INVALID_PAYLOAD, f"not a frame: {exc}") from None
    return value


def _request_id(frame: Mapping[str, Any]) -> int:
    value = frame.get("id")
    if (
        isinstance(value, bool)
        or not isinstance(value, int)
        or not 0 <= value <= MAX_REQUEST_ID
    ):
        raise FrameError(
            None,
            ErrorCode.BAD_FRAME,
            f'"id" must be an integer 0..2**53-1, got {value!r:.40}',
        )
    return value


def _target(frame: Mapping[str, Any], request_id: int) -> tuple[str, str | None]:
    op = frame.get("op")
    key = frame.get("key")
    if not isinstance(op, str) or not op:
        raise FrameError(request_id, ErrorCode.BAD_FRAME, '"op" must be a string')
    if key is not None and not isinstance(key, str):
        raise FrameError(request_id, ErrorCode.BAD_FRAME, '"key" must be a string')
    return op, key


def _count(frame: Mapping[str, Any], name: str, request_id: int) -> int:
    value = frame.get(name)
    if (
        isinstance(value, bool)
        or not isinstance(value, int)
        or not 0 <= value <= MAX_CREDIT
    ):
        raise FrameError(
            request_id,
            ErrorCode.BAD_FRAME,
            f'"{name}" must be an integer 0..{MAX_CREDIT}',
        )
    return value


def _call(frame: Mapping[str, Any]) -> Call:
    request_id = frame.get("id")
    op = frame.get("op")
    key = frame.get("key")
    # NOTE: the checks of `_request_id` and `_target` for the plain types a
    # decoder makes, inlined (every call frame comes here); anything else
    # takes them, which accept subclasses or raise.
    if (
        type(request_id) is not int
        or not 0 <= request_id <= MAX_REQUEST_ID
        or type(op) is not str
        or not op
        or (key is not None and type(key) is not str)
    ):
        request_id = _request_id(frame)
        op, key = _target(frame, request_id)
    # `Call(request_id, op, key, msg)`, made as `value_exit` makes an `Exit`:
    # the fields set through their slots, not a frozen ``__init__``'s
    # ``object.__setattr__`` per field (the same object).
    call: Call = _new_object(Call)
    _set_call_id(call, request_id)
    _set_call_op(call, op)
    _set_call_key(call, key)
    _set_call_msg(call, frame.get("msg"))
    return call


_new_object = object.__new__
_set_call_id = Call.__dict__["id"].__set__
_set_call_op = Call.__dict__["op"].__set__
_set_call_key = Call.__dict__["key"].__set__
_set_call_msg = Call.__dict__["msg"].__set__


def _stream(frame: Mapping[str, Any]) -> OpenStream:
    request_id = _request_id(frame)
    op, key = _target(frame, request_id)
    return OpenStream(
        request_id, op, key, frame.get("msg"), _count(frame, "credit", request_id)
    )


def _topic(frame: Mapping[str, Any], request_id: int) -> str:
    topic = frame.get("topic")
    if not isinstance(topic, str) or not topic:
        raise FrameError(request_id, ErrorCode.BAD_FRAME, '"topic" must be a string')
    return topic


def _subscribe(frame: Mapping[str, Any]) -> Subscribe:
    request_id = _request_id(frame)
    topic = _topic(frame, request_id)
    since = frame.get("since")
    presence = frame.get("presence", False)
    if not isinstance(presence, bool):
        raise FrameError(request_id, ErrorCode.BAD_FRAME, '"presence" must be a bool')
    if since is None:
        return Subscribe(request_id, topic, None, presence)
    epoch = since.get("epoch") if isinstance(since, dict) else None
    offset = since.get("offset") if isinstance(since, dict) else None
    if (
        not isinstance(epoch, str)
        or isinstance(offset, bool)
        or not isinstance(offset, int)
        or not 0 <= offset <= MAX_REQUEST_ID
    ):
        raise FrameError(
            request_id,
            ErrorCode.BAD_FRAME,
            '"since" must be {"epoch": string, "offset": integer >= 0}',
        )
    return Subscribe(request_id, topic, (epoch, offset), presence)


def _list_presence(frame: Mapping[str, Any]) -> ListPresence:
    request_id = _request_id(frame)
    return ListPresence(request_id, _topic(frame, request_id))


def _unsubscribe(frame: Mapping[str, Any]) -> Unsubscribe:
    request_id = _request_id(frame)
    return Unsubscribe(request_id, _topic(frame, request_id))


MAX_ACKS: Final = 1000
"""Most sequence numbers one ``ack`` frame carries."""


def _ack(frame: Mapping[str, Any]) -> Ack:
    epoch, seqs = frame.get("epoch"), frame.get("seqs")
    if (
        not isinstance(epoch, str)
        or not isinstance(seqs, list)
        or len(seqs) > MAX_ACKS
        or not all(
            isinstance(seq, int)
            and not isinstance(seq, bool)
            and 0 <= seq <= MAX_REQUEST_ID
            for seq in seqs
        )
    ):
        raise FrameError(
            None,
            ErrorCode.BAD_FRAME,
            f'an ack is {{"epoch": string, "seqs": [up to {MAX_ACKS} integers]}}',
        )
    return Ack(epoch, seqs)


def _credit(frame: Mapping[str, Any]) -> Credit:
    request_id = _request_id(frame)
    return Credit(request_id, _count(frame, "n", request_id))


_PARSERS: Final[dict[str, Callable[[Mapping[str, Any]], ClientFrame]]] = {
    "call": _call,
    "stream": _stream,
    "credit": _credit,
    "cancel": lambda frame: Cancel(_request_id(frame)),
    "subscribe": _subscribe,
    "unsubscribe": _unsubscribe,
    "presence": _list_presence,
    "ack": _ack,
    "ping": lambda frame: Ping(),
    "pong": lambda frame: Pong(),
}


def parse_client_frame(frame: Mapping[str, Any]) -> ClientFrame:
    """The record of a client frame.

    Raises:
        FrameError: an unknown kind, or fields of the wrong type (with the
            request id when it could be read).
    """
    parser = _PARSERS.get(frame["t"])
    if parser is None:
        request_id = frame.get("id")
        raise FrameError(
            request_id
            if isinstance(request_id, int) and not isinstance(request_id, bool)
            else None,
            ErrorCode.UNKNOWN_KIND,
            f"unknown frame kind {frame['t']!r:.40}",
        )
    return parser(frame)


def error_frame(
    request_id: int | None,
    code: ErrorCode,
    message: str,
    *,
    type_name: str | None = None,
    data: object = None,
) -> dict[str, Any]:
    """``{"t": "error", "id": 1, "code": ..., "message": ..., "type": ..., "data": ...}``"""
    frame: dict[str, Any] = {
        "t": "error",
        "id": request_id,
        "code": str(code),
        "message": message,
    }
    if type_name is not None:
        frame["type"] = type_name
    if data is not None:
        frame["data"] = data
    return frame
