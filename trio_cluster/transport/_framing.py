"""The runner-to-runner wire format: hello, envelopes and frames (edge adapter, no I/O).

Theory of operation. Every message a transport carries (one WebSocket
message, or one memory-transport frame) is a single msgpack value:

* the first message in each direction of a connection is the *hello*,
  ``["trio_cluster", PROTOCOL_VERSION, "host:port"]``: the magic string, the
  protocol version the sender speaks and the address it announces (the
  ``str()`` of its `RunnerAddress`). A peer with another magic or version is
  refused (`decode_hello` says why). When the cluster authenticates, the
  dialer's hello also carries its challenge nonce, and the listener's its own
  nonce and its proofs of the cluster secret; the dialer then sends its
  proofs (`encode_proof`) and the listener confirms with `ACCEPTED` (see
  `trio_cluster.transport._ws_handshake`);
* every later message is a *frame*: a msgpack array of envelopes, each
  envelope itself an array.

An envelope is encoded once, by `encode_envelope`, when the runtime queues it:
that is where its size is checked and where an unencodable value is refused,
so the error reaches the caller of ``send_nowait``. A frame is then the msgpack
array header followed by the concatenated pre-encoded envelopes
(`frame_header`), so batching costs no re-encoding. Every encoded envelope is
at most ``max_message_size - FRAME_OVERHEAD`` bytes, so any single envelope fits
in a frame.

`decode_frame` refuses whatever a well-behaved peer never sends (bad msgpack,
not an array of arrays, over the size limit) with `MalformedMessageError`; the
caller closes that connection. msgpack's limits are derived from the frame's
length, so a hostile frame cannot make the decoder allocate more than a small
multiple of its own size.
"""

from __future__ import annotations

import ipaddress
import re
import struct
from typing import TYPE_CHECKING, Any, Final, Protocol

import attrs
import msgpack

from .._core._addresses import RunnerAddress
from .._core._auth import MAX_SECRETS, NONCE_SIZE, PROOF_SIZE, are_proofs
from .._core._checks import count
from .._errors import MalformedMessageError, MessageTooLargeError

if TYPE_CHECKING:
    from collections.abc import Sequence

    from .._transport_abc import Envelope

__all__ = [
    "ACCEPTED",
    "FRAME_OVERHEAD",
    "MAGIC",
    "MAX_HELLO_SIZE",
    "MIN_MESSAGE_SIZE",
    "PROTOCOL_VERSION",
    "Hello",
    "Packer",
    "check_max_message_size",
    "decode_frame",
    "decode_hello",
    "decode_proof",
    "encode_envelope",
    "encode_hello",
    "encode_proof",
    "frame_header",
    "new_packer",
]

PROTOCOL_VERSION: Final = 1
"""Version of the runner-to-runner protocol; both ends of a connection must
speak the same one."""

MAGIC: Final = "trio_cluster"
"""First item of every hello: tells a trio_cluster peer from anything else."""

FRAME_OVERHEAD: Final = 5
"""Largest msgpack array header (``0xdd`` and a 32-bit count), in bytes."""

MIN_MESSAGE_SIZE: Final = 1024
"""Smallest ``max_message_size`` a transport accepts (a hello must fit)."""

MAX_HELLO_SIZE: Final = 1024
"""Largest hello accepted, in bytes."""

_LABEL: Final = re.compile(r"[A-Za-z0-9_-]{1,63}")
_MAX_HOST_NAME: Final = 253
_UINT16: Final = struct.Struct(">BH")
_UINT32: Final = struct.Struct(">BI")
_CONTAINERS: Final = frozenset((list, tuple, dict))
_DECODE_ERRORS: Final = (ValueError, TypeError, msgpack.UnpackException)


def check_max_message_size(value: object) -> int:
    """Validate a ``max_message_size`` option (an int of at least 1 KiB).

    Raises:
        ConfigError: ``value`` is not an int, or is below `MIN_MESSAGE_SIZE`.
    """
    return count("max_message_size", value, minimum=MIN_MESSAGE_SIZE, unit="bytes")


class Packer(Protocol):
    """What `encode_envelope` needs of a msgpack packer."""

    def pack(self, obj: Any, /) -> bytes: ...


def new_packer() -> Packer:
    """A msgpack packer for `encode_envelope`. Reusing one saves about a
    microsecond per envelope; keep one per endpoint (a packer is not
    thread-safe)."""
    packer: Packer = msgpack.Packer(use_bin_type=True, datetime=False)
    return packer


def encode_envelope(
    envelope: Envelope, max_message_size: int, packer: Packer | None = None
) -> bytes:
    """Encode one envelope for a frame of at most ``max_message_size`` bytes
    (with ``packer`` from `new_packer`, or a fresh one).

    Returns:
        The msgpack encoding of ``envelope`` (an array).

    Raises:
        MalformedMessageError: ``envelope`` is not a list, or holds a value
            msgpack cannot encode, or one that would not decode on the other
            side (a map with a tuple key).
        MessageTooLargeError: the encoding is over
            ``max_message_size - FRAME_OVERHEAD`` bytes.
    """
    if not isinstance(envelope, list):
        raise MalformedMessageError(
            what="envelope",
            problems=[f"an envelope must be a list, got {type(envelope).__name__}"],
        )
    try:
        data = (new_packer() if packer is None else packer).pack(envelope)
    except (TypeError, ValueError, OverflowError) as exc:
        raise MalformedMessageError(
            what="envelope", problems=[f"not encodable with msgpack: {exc}"]
        ) from exc
    limit = max_message_size - FRAME_OVERHEAD
    if len(data) > limit:
        raise MessageTooLargeError(size=len(data), limit=limit)
    if not _CONTAINERS.isdisjoint(map(type, envelope)):
        # Some encodable values do not decode: a tuple map key becomes an
        # array, and a list cannot be a dict key. Refuse them here rather
        # than have the receiver drop the whole connection. A flat envelope
        # (the runtime's) skips this check.
        try:
            _unpack(data)
        except _DECODE_ERRORS as exc:
            raise MalformedMessageError(
                what="envelope", problems=[f"would not decode on the other side: {exc}"]
            ) from exc
    return data


def frame_header(count: int) -> bytes:
    """The msgpack array header of a frame of ``count`` envelopes."""
    if count < 16:
        return bytes((0x90 | count,))
    if count < 1 << 16:
        return _UINT16.pack(0xDC, count)
    return _UINT32.pack(0xDD, count)


def _unpack(data: bytes) -> Any:
    size = len(data)
    return msgpack.unpackb(
        data,
        raw=False,
        use_list=True,
        strict_map_key=False,
        max_str_len=size,
        max_bin_len=size,
        max_array_len=size,
        max_map_len=size // 2,
        max_ext_len=size,
    )


def _unpack_checked(data: bytes, what: str) -> Any:
    """Unpack a frame or hello; raise `MalformedMessageError` if it is not
    msgpack."""
    try:
        return _unpack(data)
    except _DECODE_ERRORS as exc:
        raise MalformedMessageError(
            what=what, problems=[f"not msgpack: {str(exc) or type(exc).__name__}"]
        ) from exc


def decode_frame(data: bytes, max_message_size: int) -> list[Envelope]:
    """Decode a frame received from a peer into its envelopes.

    Raises:
        MalformedMessageError: ``data`` is over ``max_message_size``, is not
            msgpack, is not an array, or holds an element that is not an
            array.
    """
    if len(data) > max_message_size:
        raise MalformedMessageError(
            what="frame",
            problems=[
                f"{len(data)} bytes is over max_message_size ({max_message_size})"
            ],
        )
    value = _unpack_checked(data, "frame")
    if not isinstance(value, list):
        raise MalformedMessageError(
            what="frame",
            problems=[f"a frame must be an array, got {type(value).__name__}"],
        )
    for index, envelope in enumerate(value):
        if not isinstance(envelope, list):
            raise MalformedMessageError(
                what="frame",
                problems=[
                    f"envelope {index} must be an array, got {type(envelope).__name__}"
                ],
            )
    return value


@attrs.frozen
class Hello:
    """A peer's hello, checked (see `decode_hello`)."""

    address: RunnerAddress
    """The address the peer announces."""
    nonce: bytes | None = None
    """Its challenge, if it authenticates (`NONCE_SIZE` bytes)."""
    proofs: tuple[bytes, ...] | None = None
    """Its proofs of the cluster secret (only in a listener's hello)."""


def encode_hello(
    address: RunnerAddress,
    nonce: bytes | None = None,
    proofs: Sequence[bytes] | None = None,
) -> bytes:
    """The hello announcing ``address``: ``[magic, version, address]``, then
    the sender's ``nonce`` if it authenticates, then (a listener's answer)
    its ``proofs``."""
    value: list[Any] = [MAGIC, PROTOCOL_VERSION, str(address)]
    if nonce is not None:
        value.append(nonce)
        if proofs is not None:
            value.append(list(proofs))
    data: bytes = msgpack.packb(value)
    return data


def _hello_problem(value: Any) -> str | None:
    if not isinstance(value, list) or len(value) < 2:
        return "a hello must be an array [magic, version, address]"
    magic, version = value[0], value[1]
    if magic != MAGIC:
        return f"not a trio_cluster peer: magic {magic!r:.80}, expected {MAGIC!r}"
    if type(version) is not int or version != PROTOCOL_VERSION:
        return (
            f"protocol version {version!r:.80} is not supported"
            f" (this runner speaks version {PROTOCOL_VERSION})"
        )
    if not 3 <= len(value) <= 5 or not isinstance(value[2], str):
        return (
            "a version 1 hello must be [magic, version, address string"
            " [, nonce [, proofs]]]"
        )
    if len(value) > 3 and not (
        isinstance(value[3], bytes) and len(value[3]) == NONCE_SIZE
    ):
        return f"a hello's nonce must be {NONCE_SIZE} bytes"
    if len(value) > 4 and not are_proofs(value[4]):
        return (
            f"a hello's proofs must be an array of 1 to {MAX_SECRETS}"
            f" binaries of {PROOF_SIZE} bytes"
        )
    return None


def _check_size(data: bytes | str, what: str) -> bytes:
    if not isinstance(data, bytes):
        raise MalformedMessageError(
            what=what, problems=[f"a {what} must be a binary message, got text"]
        )
    if len(data) > MAX_HELLO_SIZE:
        raise MalformedMessageError(
            what=what,
            problems=[f"{len(data)} bytes is over the {what} limit ({MAX_HELLO_SIZE})"],
        )
    return data


def decode_hello(data: bytes | str) -> Hello:
    """Check a peer's hello.

    Raises:
        MalformedMessageError: ``data`` is not a binary hello of at most
            `MAX_HELLO_SIZE` bytes, has another magic string or protocol
            version, announces no valid address (a port in 0..65535 and
            an IP address or host name this runner could dial back), or has
            a nonce or proofs of the wrong shape. ``problems[0]`` says
            which, in words fit for a log line or a close reason.
    """
    value = _unpack_checked(_check_size(data, "hello"), "hello")
    problem = _hello_problem(value)
    if problem is not None:
        raise MalformedMessageError(what="hello", problems=[problem])
    try:
        address = RunnerAddress.parse(value[2])
    except ValueError as exc:
        raise MalformedMessageError(what="hello", problems=[str(exc)]) from exc
    if not _is_host(address.host):
        raise MalformedMessageError(
            what="hello",
            problems=[f"not a host name or IP address: {address.host!r:.80}"],
        )
    nonce = value[3] if len(value) > 3 else None
    proofs = tuple(value[4]) if len(value) > 4 else None
    return Hello(address, nonce, proofs)


def encode_proof(proofs: Sequence[bytes]) -> bytes:
    """A dialer's answer to the listener's challenge: ``[magic, "proof",
    proofs]``."""
    data: bytes = msgpack.packb([MAGIC, "proof", list(proofs)])
    return data


def decode_proof(data: bytes | str) -> tuple[bytes, ...]:
    """The proofs of a dialer's answer (`encode_proof`).

    Raises:
        MalformedMessageError: it is not one.
    """
    value = _unpack_checked(_check_size(data, "proof"), "proof")
    if (
        not isinstance(value, list)
        or len(value) != 3
        or value[:2] != [MAGIC, "proof"]
        or not are_proofs(value[2])
    ):
        raise MalformedMessageError(
            what="proof",
            problems=[
                f"a proof must be [{MAGIC!r}, 'proof', 1 to {MAX_SECRETS}"
                f" binaries of {PROOF_SIZE} bytes]"
            ],
        )
    return tuple(value[2])


ACCEPTED: Final = msgpack.packb([MAGIC, "accepted"])
"""What a listener sends once it keeps an authenticated connection: the
dialer's signal that frames may flow."""


def _is_host(host: str) -> bool:
    """Whether ``host`` can be dialed back: an IP address, or a host name of
    at most 253 characters in labels of 1-63 ASCII letters, digits, '-' or
    '_' (anything else fails to resolve, some of it with `UnicodeError`)."""
    try:
        ipaddress.ip_address(host)
    except ValueError:
        name = host.removesuffix(".")
        return len(name) <= _MAX_HOST_NAME and all(
            _LABEL.fullmatch(label) for label in name.split(".")
        )
    return True
