"""The runner-to-runner protocol: envelopes and their validation (edge adapter).

Envelopes are short lists whose first item is the kind. Call ids are chosen
by the calling runner and unique per (caller, connection lifetime); the owner
echoes them back. Payloads are the handler codecs' bytes, so an envelope never
needs the user's types to be decoded.

========================  ===================================================
kind                      fields
========================  ===================================================
``REQUEST``               call id, mode (call / discard / stream), entity type,
                          entity id, shard group, shard number, handler tag,
                          payload, seconds left before the caller's deadline
                          (or None), and optionally the call metadata (a map
                          of str to str, sent only when there is some)
``REPLY``                 call id, encoded final reply (`ReplyCodec` exit)
``NOT_DELIVERED``         call id, reason: the handler did not run; route again
``STREAM_ITEM``           call id, item number (1, 2, 3, ... per stream),
                          encoded item
``STREAM_END``            call id, how many items were sent, encoded end
                          (`ReplyCodec.encode_stream_end`)
``STREAM_CREDIT``         call id, the highest item number the caller
                          accepts (cumulative: it only ever grows)
``INTERRUPT``             call id: the caller gave up; cancel the handler
``PERSISTED``             request id, entity type, entity id, shard group,
                          shard number, wants reply: a persisted request was
                          stored for a shard the receiver serves
``PERSISTED_REPLY``       request id, encoded final reply
``BROADCAST``             name, payload
========================  ===================================================

`parse` checks every field (its type, the range of a number, the length of
text), so a malformed envelope from a peer is a `MalformedMessageError`
(logged and dropped), never an `IndexError` or a NaN deadline deep in the
runtime. Numbering and credit
make stream envelopes idempotent: see `trio_cluster._engine._streams`.
"""

from __future__ import annotations

import enum
import functools
import math
from typing import TYPE_CHECKING, Any, Final, NamedTuple

from .._call_metadata import metadata_problem
from .._core._addresses import (
    MAX_ENTITY_ID_LENGTH,
    EntityAddress,
    EntityId,
    ShardId,
)
from .._core._config import _MAX_SHARDS_PER_GROUP
from .._errors import MalformedMessageError

if TYPE_CHECKING:
    from .._transport_abc import Envelope

__all__ = ["MAX_REASON_LENGTH", "MAX_SECONDS_LEFT", "Kind", "Mode", "parse"]


class Kind(enum.IntEnum):
    REQUEST = 1
    REPLY = 2
    NOT_DELIVERED = 3
    STREAM_ITEM = 4
    STREAM_END = 5
    STREAM_CREDIT = 6
    INTERRUPT = 7
    PERSISTED = 8
    PERSISTED_REPLY = 9
    BROADCAST = 10


class Mode(enum.IntEnum):
    CALL = 0
    DISCARD = 1
    STREAM = 2


MAX_SECONDS_LEFT: Final = 1e9
"""Longest deadline a ``REQUEST`` carries, in seconds (about 31 years): a
caller whose deadline is further away sends None (no deadline)."""
MAX_REASON_LENGTH: Final = 1024
"""Longest ``NOT_DELIVERED`` reason accepted, in characters."""
_MAX_TYPE_NAME: Final = 150  # `_registry`: type names are 1-150 characters
_MAX_GROUP_NAME: Final = 64  # `_core._config`: group names are 1-64 characters
_MAX_HANDLER_NAME: Final = 100  # `_handlers`: wire names are 1-100 characters
_MAX_BROADCAST_NAME: Final = 200  # `_broadcast`: names are 1-200 characters
_MAX_U64: Final = (1 << 64) - 1
MAX_CALL_ID: Final = _MAX_U64
"""The largest call id on the wire (a ``REQUEST``'s or a ``REPLY``'s)."""
_REQUEST: Final = int(Kind.REQUEST)
_REPLY: Final = int(Kind.REPLY)
_MIN_MODE: Final = int(min(Mode))
_MAX_MODE: Final = int(max(Mode))
_MAX_I64: Final = (1 << 63) - 1


class _Field(NamedTuple):
    """What one field may hold: its exact types (msgpack decodes to exactly
    these, so a bool, an int subclass, is refused where an int is expected)
    and the bounds of its value (a number) or of its length (text, bytes)."""

    name: str
    types: frozenset[type]
    low: float = 0
    high: float = _MAX_U64


def _text(name: str, longest: int, shortest: int = 1) -> _Field:
    return _Field(name, frozenset({str}), shortest, longest)


_CALL_ID: Final = _Field("call id", frozenset({int}))
_REQUEST_ID: Final = _Field("request id", frozenset({int}), 0, _MAX_I64)
_BYTES: Final = _Field("payload", frozenset({bytes}), 0, math.inf)
# Payloads need no bound of their own: a frame is at most max_message_size.
_ADDRESS: Final = (
    _text("entity type", _MAX_TYPE_NAME),
    _text("entity id", MAX_ENTITY_ID_LENGTH),
    _text("shard group", _MAX_GROUP_NAME),
    _Field("shard number", frozenset({int}), 1, _MAX_SHARDS_PER_GROUP),
)

_SHAPES: Final[dict[Kind, tuple[_Field, ...]]] = {
    Kind.REQUEST: (
        _CALL_ID,
        _Field("mode", frozenset({int}), _MIN_MODE, _MAX_MODE),
        *_ADDRESS,
        _text("handler tag", _MAX_HANDLER_NAME),
        _BYTES,
        # The caller never sends a negative, infinite or NaN time left.
        _Field(
            "seconds left", frozenset({int, float, type(None)}), 0, MAX_SECONDS_LEFT
        ),
        # Optional: left out when the call carries none (`_OPTIONAL`).
        _Field("metadata", frozenset({dict})),
    ),
    Kind.REPLY: (_CALL_ID, _BYTES),
    Kind.NOT_DELIVERED: (_CALL_ID, _text("reason", MAX_REASON_LENGTH, 0)),
    # Item numbers start at 1, counts and credit limits at 0.
    Kind.STREAM_ITEM: (_CALL_ID, _Field("item number", frozenset({int}), 1), _BYTES),
    Kind.STREAM_END: (_CALL_ID, _Field("item count", frozenset({int})), _BYTES),
    Kind.STREAM_CREDIT: (_CALL_ID, _Field("credit limit", frozenset({int}))),
    Kind.INTERRUPT: (_CALL_ID,),
    Kind.PERSISTED: (
        _REQUEST_ID,
        *_ADDRESS,
        _Field("wants reply", frozenset({bool})),
    ),
    Kind.PERSISTED_REPLY: (_REQUEST_ID, _BYTES),
    Kind.BROADCAST: (_text("broadcast name", _MAX_BROADCAST_NAME), _BYTES),
}
_KINDS: Final = {int(kind): kind for kind in Kind}
_OPTIONAL: Final = {Kind.REQUEST: 1}
"""How many trailing fields of a kind may be left out."""


def parse(envelope: Envelope) -> tuple[Kind, list[Any]]:
    """Check an envelope from a peer; return its kind and fields.

    Every field is checked: its exact type, and the range of a number (NaN
    and infinities are out of every range) or the length of text, so what
    the runtime reads from the fields is what a well-behaved peer sends.

    Raises:
        MalformedMessageError: unknown kind, wrong length, a field of the
            wrong type, a number out of range, text too long or empty.
    """
    if _plain(envelope):
        return _KINDS[envelope[0]], envelope[1:]
    return _checked(envelope)


def _checked(envelope: Envelope) -> tuple[Kind, list[Any]]:
    """`parse`, field by field (the reference `_plain` must agree with).

    Raises:
        MalformedMessageError: as `parse`.
    """
    if not envelope or type(envelope[0]) is not int:
        raise MalformedMessageError(what="envelope", problems=["missing kind"])
    kind = _KINDS.get(envelope[0])
    if kind is None:
        raise MalformedMessageError(
            what="envelope", problems=[f"unknown kind {envelope[0]!r}"]
        )
    shape = _SHAPES[kind]
    fields = envelope[1:]
    if not len(shape) - _OPTIONAL.get(kind, 0) <= len(fields) <= len(shape):
        expected = (
            f"{len(shape) - _OPTIONAL[kind]} to {len(shape)}"
            if kind in _OPTIONAL
            else str(len(shape))
        )
        raise MalformedMessageError(
            what=f"{kind.name} envelope",
            problems=[f"expected {expected} fields, got {len(fields)}"],
        )
    for index, (field, value) in enumerate(zip(shape, fields, strict=False)):
        # The common cases inline (a call per field costs more than the
        # check); anything else, and every failure, through `_problem`.
        value_type = type(value)
        if value_type in field.types:
            if value_type is int or value_type is float:
                if field.low <= value <= field.high:
                    continue
            elif value_type is str or value_type is bytes:
                if field.low <= len(value) <= field.high:
                    continue
            elif value is None or value_type is bool:
                continue
        problem = _problem(field, value)
        if problem is not None:
            raise MalformedMessageError(
                what=f"{kind.name} envelope",
                problems=[f"field {index + 1} ({field.name}): {problem}"],
            )
    return kind, fields


def _plain(envelope: Envelope) -> bool:
    """Whether ``envelope`` is a ``REPLY``, or a ``REQUEST`` without metadata,
    whose every field is well formed: the two envelopes of every remote
    call, checked in one expression (the field loop of `parse` costs about
    twice as much). False says nothing: `parse` then checks field by field,
    which is also where every error comes from. Accepts only what that loop
    accepts (the bounds are those of `_SHAPES`)."""
    size = len(envelope)
    if size == 3:
        kind, call_id, payload = envelope
        wanted, rest = _REPLY, type(payload) is bytes
    elif size == 10:
        (
            kind,
            call_id,
            mode,
            entity_type,
            entity_id,
            group,
            number,
            tag,
            payload,
            left,
        ) = envelope
        left_type = type(left)
        wanted = _REQUEST
        rest = (
            type(mode) is int
            and _MIN_MODE <= mode <= _MAX_MODE
            and type(entity_type) is str
            and 0 < len(entity_type) <= _MAX_TYPE_NAME
            and type(entity_id) is str
            and 0 < len(entity_id) <= MAX_ENTITY_ID_LENGTH
            and type(group) is str
            and 0 < len(group) <= _MAX_GROUP_NAME
            and type(number) is int
            and 1 <= number <= _MAX_SHARDS_PER_GROUP
            and type(tag) is str
            and 0 < len(tag) <= _MAX_HANDLER_NAME
            and type(payload) is bytes
            and (
                left is None
                or (
                    (left_type is float or left_type is int)
                    and 0 <= left <= MAX_SECONDS_LEFT
                )
            )
        )
    else:
        return False
    return (
        rest
        and kind == wanted
        and type(kind) is int
        and type(call_id) is int
        and 0 <= call_id <= _MAX_U64
    )


def _problem(field: _Field, value: Any) -> str | None:
    """What is wrong with ``value`` as ``field``, or None."""
    kind = type(value)
    if kind not in field.types:
        return f"unexpected {kind.__name__}"
    if kind is int or kind is float:
        if field.low <= value <= field.high:
            return None
        if value < field.low:
            return f"{value} is below {field.low}"
        if value > field.high:
            return f"{value} is above {field.high}"
        return f"{value} is not a number"
    if kind is str or kind is bytes:
        if field.low <= len(value) <= field.high:
            return None
        unit = "characters" if kind is str else "bytes"
        if not value:
            return "empty"
        return f"{len(value)} {unit}, over {field.high}"
    if kind is dict:
        return metadata_problem(value)
    return None  # None, or a bool


def address_fields(address: EntityAddress) -> list[Any]:
    """The (type, id, group, number) fields that name an entity."""
    return [
        address.entity_type,
        address.entity_id.value,
        address.shard.group,
        address.shard.number,
    ]


def address_from(fields: list[Any]) -> EntityAddress:
    """Inverse of `address_fields`.

    Raises:
        MalformedMessageError: the id is not a valid entity id.
    """
    return address_of(*fields)


def address_of(
    entity_type: str, entity_id: str, group: str, number: int
) -> EntityAddress:
    """The address named by an envelope's four address fields (checked by
    `parse`).

    Raises:
        MalformedMessageError: the id is not a valid entity id.
    """
    try:
        return _address(entity_type, entity_id, group, number)
    except (TypeError, ValueError) as exc:
        raise MalformedMessageError(
            what="entity address", problems=[str(exc)]
        ) from None


_SHARD_IDS: Final[dict[ShardId, ShardId]] = {}
"""One object per shard id a runner of this process serves or knows the
owner of (see `shard_id`)."""


def shard_id(shard: ShardId) -> ShardId:
    """The one object equal to ``shard`` that the shard tables of this
    process key their hosts and owners by, and that the addresses of
    envelopes (`address_of`) and of client handles hold: a dict lookup with
    the very key object skips ``ShardId.__eq__``, a Python call (every
    request looks its shard up). Only shard ids of an assignment or a
    served shard are kept (a bounded set: never one named by a peer)."""
    return _SHARD_IDS.setdefault(shard, shard)


@functools.lru_cache(maxsize=4096)
def _address(
    entity_type: str, entity_id: str, group: str, number: int
) -> EntityAddress:
    # Cached: the same hot entities are addressed over and over, and building
    # (and validating) the three frozen objects costs several microseconds.
    # Field types were checked by `parse`, so the key is hashable. The shard
    # id is the object of `shard_id` if there is one (not added if not: the
    # fields come from a peer).
    shard = ShardId(group, number)
    shard = _SHARD_IDS.get(shard, shard)
    return EntityAddress(entity_type, EntityId(entity_id), shard)
