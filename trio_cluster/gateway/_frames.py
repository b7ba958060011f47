"""WebSocket data frames read and written without wsproto's general
machinery, for the common case (pure: no I/O).

Theory of operation. Almost every frame a gateway socket carries is a whole
data message: one unfragmented text or binary frame, masked from the client,
unmasked to it, no extension (the gateway negotiates none). wsproto handles
every frame through layers of generators and objects, which costs more than
the rest of a small request. `FastWSConnection` is the wsproto object of a
server connection whose handshake is done (wsproto's low-level
`Connection` underneath) that reads such frames itself:

* a complete frame with FIN set, no RSV bit, opcode text or binary, the
  mask bit set, a minimally encoded length not over ``max_frame``, and (for
  text) valid UTF-8, becomes a `BytesMessage` / `TextMessage` event here;
* every other frame (control frames, fragments, anything wrong, anything
  larger) is handed, whole and in order, to wsproto's `Connection`, whose
  events are taken at once, so events keep the frames' order. A frame that
  is larger than ``max_frame`` is handed over as its bytes arrive (wsproto
  streams it; trio-websocket stops it at ``max_message_size``). A fragmented
  message is wsproto's until its last fragment; once wsproto reports a close
  (received, or a protocol error), everything after is wsproto's;
* `data_frame` builds an unmasked server frame around a message.

So wsproto keeps deciding everything but the plain case, and the events a
client's bytes produce are the same, however they are cut into reads
(`tests/gateway/test_frames.py` checks this against wsproto alone).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final

from wsproto import ConnectionType, WSConnection
from wsproto.connection import Connection, ConnectionState
from wsproto.events import BytesMessage, CloseConnection, TextMessage

if TYPE_CHECKING:
    from collections.abc import Iterator, Sequence

    from wsproto.events import Event

__all__ = ["FastWSConnection", "data_frame"]

_OPEN: Final = ConnectionState.OPEN
"""A module constant: on Python 3.11 reading an enum member through its
class costs a call of the enum's metaclass (per frame, here)."""
_TEXT = 0x1
_BINARY = 0x2
_CONTINUATION = 0x0


def data_frame(message: bytes | str) -> bytes:
    """One unmasked, unfragmented server frame carrying ``message`` (binary
    for bytes, text for a string)."""
    if isinstance(message, str):
        payload = message.encode()
        first = 0x80 | _TEXT
    else:
        payload = message
        first = 0x80 | _BINARY
    size = len(payload)
    if size < 126:
        return bytes((first, size)) + payload
    if size < 1 << 16:
        return bytes((first, 126)) + size.to_bytes(2, "big") + payload
    return bytes((first, 127)) + size.to_bytes(8, "big") + payload


def _unmask(payload: bytes, key: bytes) -> bytes:
    size = len(payload)
    if not size:
        return b""
    stream = (key * ((size >> 2) + 1))[:size]
    return (
        int.from_bytes(payload, "little") ^ int.from_bytes(stream, "little")
    ).to_bytes(size, "little")


def _as_event(event: Event | bytes | str) -> Event:
    """An item of `FastWSConnection.take_events` as a wsproto event."""
    if isinstance(event, bytes):
        return BytesMessage(data=event)
    if isinstance(event, str):
        return TextMessage(data=event)
    return event


class FastWSConnection(WSConnection):
    """A server `WSConnection` whose handshake is done, reading plain data
    frames itself (see the module docstring).

    Args:
        trailing_data: bytes received after the request head.
        max_frame: the largest payload read here (larger frames are
            wsproto's).
    """

    def __init__(self, trailing_data: bytes = b"", *, max_frame: int) -> None:
        self.client = False
        self.connection = None
        """wsproto's `Connection`, made when a frame is first its to read or
        write (a close, a control frame): an idle socket has none."""
        self._max_frame = max_frame
        self._buffer = b""
        """Bytes received and not parsed yet (part of a frame)."""
        self._events: list[Event | bytes | str] | None = None
        """Events produced and not taken yet, in order (a message read here:
        its payload, see `take_events`)."""
        self._passing = 0
        """Bytes of the current frame still to hand to wsproto as they come."""
        self._fragmented = False
        """Whether wsproto is in the middle of a fragmented message."""
        self._wsproto_only = False
        """Whether every byte goes to wsproto (it reported a close)."""
        if trailing_data:
            self.receive_data(trailing_data)

    def _wsproto(self) -> Connection:
        connection = self.connection
        if connection is None:
            connection = self.connection = Connection(ConnectionType.SERVER)
        return connection

    @property
    def state(self) -> ConnectionState:
        connection = self.connection
        return _OPEN if connection is None else connection.state

    def send(self, event: Event) -> bytes:
        if (
            isinstance(event, BytesMessage | TextMessage)
            and event.message_finished
            and self.state is _OPEN
        ):
            data = event.data
            return data_frame(bytes(data) if isinstance(data, bytearray) else data)
        return self._wsproto().send(event)

    def events(self) -> Iterator[Event]:  # type: ignore[override]
        return iter([_as_event(event) for event in self.take_events()])

    def take_events(self) -> Sequence[Event | bytes | str]:
        """The events produced since the last call, in order, where a whole
        message read here (one plain frame, within ``max_frame``) is its
        payload itself: bytes (binary) or a string (text). A message read
        here never comes between the parts of a message wsproto reads
        (those come first, in order). `events` gives the same as wsproto
        events."""
        events = self._events
        if events is None:
            return ()
        self._events = None
        return events

    def receive_data(self, data: bytes | None) -> None:
        connection = self.connection
        if (
            data is None
            or self._wsproto_only
            or (connection is not None and connection.state is not _OPEN)
        ):
            if self._buffer:  # the start of a frame: wsproto reads it whole
                buffered, self._buffer = self._buffer, b""
                self._to_wsproto(buffered)
            self._to_wsproto(data)
            return
        if self._buffer:
            data = self._buffer + data
            self._buffer = b""
        self._parse(data)

    def _event(self, event: Event | bytes | str) -> None:
        if self._events is None:
            self._events = [event]
        else:
            self._events.append(event)

    def _to_wsproto(self, data: bytes | None) -> None:
        connection = self._wsproto()
        connection.receive_data(data)
        for event in connection.events():
            self._event(event)
            if isinstance(event, CloseConnection):
                self._wsproto_only = True

    def _parse(self, data: bytes) -> None:
        """Read the frames of ``data``; keep an incomplete one's bytes."""
        pos, end = 0, len(data)
        while pos < end:
            if self._wsproto_only:
                self._to_wsproto(data[pos:])
                return
            if self._passing:
                chunk = data[pos : pos + self._passing]
                self._passing -= len(chunk)
                pos += len(chunk)
                self._to_wsproto(chunk)
                continue
            if end - pos < 2:
                break
            first, second = data[pos], data[pos + 1]
            size = second & 0x7F
            head = pos + 2
            minimal = True
            if size == 126:
                if end - pos < 4:
                    break
                size = int.from_bytes(data[head : head + 2], "big")
                head += 2
                minimal = size >= 126
            elif size == 127:
                if end - pos < 10:
                    break
                size = int.from_bytes(data[head : head + 8], "big")
                head += 8
                minimal = (1 << 16) <= size < (1 << 63)
            masked = second & 0x80
            if masked:
                head += 4
            opcode = first & 0x0F
            fast = (
                first & 0xF0 == 0x80  # FIN, no RSV bit
                and opcode in (_TEXT, _BINARY)
                and masked
                and minimal
                and size <= self._max_frame
                and not self._fragmented
            )
            frame_end = head + size
            if not fast:
                self._track_fragments(first, opcode)
                if frame_end > end:  # wsproto takes it as it comes
                    self._passing = frame_end - end
                    self._to_wsproto(data[pos:])
                    return
                self._to_wsproto(data[pos:frame_end])
                pos = frame_end
                continue
            if frame_end > end:
                break
            payload = _unmask(data[head:frame_end], data[head - 4 : head])
            if opcode == _BINARY:
                self._event(payload)
            else:
                try:
                    text = payload.decode()
                except UnicodeDecodeError:
                    self._to_wsproto(data[pos:frame_end])  # wsproto refuses it
                    pos = frame_end
                    continue
                self._event(text)
            pos = frame_end
        if pos < end:
            self._buffer = data[pos:]

    def _track_fragments(self, first: int, opcode: int) -> None:
        """Note whether a frame handed to wsproto starts or ends a
        fragmented message (its continuation frames are wsproto's too)."""
        if opcode in (_TEXT, _BINARY):
            self._fragmented = not first & 0x80
        elif opcode == _CONTINUATION and first & 0x80:
            self._fragmented = False
