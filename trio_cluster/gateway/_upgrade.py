"""The WebSocket upgrade answered by the gateway itself (Trio driver helper).

Theory of operation. The gateway reads and parses the request head itself
(`read_head`) to refuse cheaply. It also checks the head's WebSocket fields
(RFC 6455 §4.2.1, the checks wsproto makes: `upgrade_refusal`) and writes the
``101 Switching Protocols`` answer (`accept_response`); the socket is then a
`ServerSocket` over the stream (`_socket`), whose `FastWSConnection` starts
in the data phase. So the head is parsed once, no HTTP state is kept for the
socket's life, and plain data frames are read and written without wsproto's
general machinery.
"""

from __future__ import annotations

import base64
import binascii
from typing import TYPE_CHECKING, Final

from wsproto.utilities import generate_accept_token

if TYPE_CHECKING:
    from ._http import Head

__all__ = ["Refusal", "accept_response", "head_rest", "upgrade_refusal"]

Refusal = tuple[int, str, tuple[tuple[str, str], ...]]
"""An HTTP status, its reason text and extra headers."""

_VERSION: Final = "13"


def upgrade_refusal(head: Head) -> Refusal | None:
    """Why ``head`` (a ``GET`` with ``Upgrade: websocket``) cannot be
    upgraded, as wsproto would refuse it; None if it can."""
    headers = head.headers
    tokens = {
        token.strip().lower() for token in headers.get("connection", "").split(",")
    }
    if "upgrade" not in tokens:
        return 400, "missing header 'Connection: Upgrade'", ()
    version = headers.get("sec-websocket-version")
    if version != _VERSION:
        status = 426 if version else 400
        return (
            status,
            "Sec-WebSocket-Version must be 13",
            (("Sec-WebSocket-Version", _VERSION),),
        )
    key = headers.get("sec-websocket-key")
    if key is None or not _valid_key(key):
        return 400, "missing or invalid header 'Sec-WebSocket-Key'", ()
    if "host" not in headers:
        return 400, "missing header 'Host'", ()
    return None


def _valid_key(key: str) -> bool:
    try:
        return len(base64.b64decode(key.strip(), validate=True)) == 16
    except (binascii.Error, ValueError):
        return False


def accept_response(head: Head, subprotocol: str) -> bytes:
    """The ``101`` answer to ``head`` (which passed `upgrade_refusal`)."""
    token = generate_accept_token(head.headers["sec-websocket-key"].strip().encode())
    return (
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
        b"Connection: Upgrade\r\nSec-WebSocket-Accept: " + token + b"\r\n"
        b"Sec-WebSocket-Protocol: " + subprotocol.encode("ascii") + b"\r\n\r\n"
    )


def head_rest(head: Head) -> bytes:
    """The bytes read after the request head (frames the client sent right
    behind its upgrade request)."""
    end = head.raw.find(b"\r\n\r\n")
    return b"" if end < 0 else head.raw[end + 4 :]
