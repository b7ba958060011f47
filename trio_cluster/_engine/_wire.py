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
                          (or None)
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

`parse` checks shapes, types and the range of the stream counters, so a
malformed envelope from a peer is a `MalformedMessageError` (logged and
dropped), never an `IndexError` deep in the runtime. Numbering and credit
make stream envelopes idempotent: see `trio_cluster._engine._streams`.
"""

from __future__ import annotations

import enum
import functools
from typing import TYPE_CHECKING, Any, Final

from .._core._addresses import EntityAddress, EntityId, ShardId
from .._errors import MalformedMessageError

if TYPE_CHECKING:
    from .._transport_abc import Envelope

__all__ = ["Kind", "Mode", "parse"]


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


_INT: Final[frozenset[type]] = frozenset({int})
_STR: Final[frozenset[type]] = frozenset({str})
_BYTES: Final[frozenset[type]] = frozenset({bytes})
_BOOL: Final[frozenset[type]] = frozenset({bool})
_OPT_FLOAT: Final[frozenset[type]] = frozenset({int, float, type(None)})

# Exact field types after the kind, per kind: msgpack decodes to exactly these
# (so a bool, an int subclass, is refused where an int is expected).
_SHAPES: Final[dict[Kind, tuple[frozenset[type], ...]]] = {
    Kind.REQUEST: (
        _INT,
        _INT,
        _STR,
        _STR,
        _STR,
        _INT,
        _STR,
        _BYTES,
        _OPT_FLOAT,
    ),
    Kind.REPLY: (_INT, _BYTES),
    Kind.NOT_DELIVERED: (_INT, _STR),
    Kind.STREAM_ITEM: (_INT, _INT, _BYTES),
    Kind.STREAM_END: (_INT, _INT, _BYTES),
    Kind.STREAM_CREDIT: (_INT, _INT),
    Kind.INTERRUPT: (_INT,),
    Kind.PERSISTED: (_INT, _STR, _STR, _STR, _INT, _BOOL),
    Kind.PERSISTED_REPLY: (_INT, _BYTES),
    Kind.BROADCAST: (_STR, _BYTES),
}
# Smallest value of the counters, by kind and field index (after the kind):
# item numbers start at 1, counts and credit limits at 0.
_MINIMUMS: Final[dict[Kind, tuple[tuple[int, int], ...]]] = {
    Kind.STREAM_ITEM: ((1, 1),),
    Kind.STREAM_END: ((1, 0),),
    Kind.STREAM_CREDIT: ((1, 0),),
}
_KINDS: Final = {int(kind): kind for kind in Kind}


def parse(envelope: Envelope) -> tuple[Kind, list[Any]]:
    """Check an envelope from a peer; return its kind and fields.

    Raises:
        MalformedMessageError: unknown kind, wrong length or field types, a
            stream counter out of range.
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
    if len(fields) != len(shape):
        raise MalformedMessageError(
            what=f"{kind.name} envelope",
            problems=[f"expected {len(shape)} fields, got {len(fields)}"],
        )
    for index, value in enumerate(fields):
        if type(value) not in shape[index]:
            raise MalformedMessageError(
                what=f"{kind.name} envelope",
                problems=[f"field {index + 1}: unexpected {type(value).__name__}"],
            )
    for index, minimum in _MINIMUMS.get(kind, ()):
        if fields[index] < minimum:
            raise MalformedMessageError(
                what=f"{kind.name} envelope",
                problems=[f"field {index + 1}: {fields[index]} is below {minimum}"],
            )
    return kind, fields


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
    entity_type, entity_id, group, number = fields
    try:
        return _address(entity_type, entity_id, group, number)
    except (TypeError, ValueError) as exc:
        raise MalformedMessageError(
            what="entity address", problems=[str(exc)]
        ) from None


@functools.lru_cache(maxsize=4096)
def _address(
    entity_type: str, entity_id: str, group: str, number: int
) -> EntityAddress:
    # Cached: the same hot entities are addressed over and over, and building
    # (and validating) the three frozen objects costs several microseconds.
    # Field types were checked by `parse`, so the key is hashable.
    return EntityAddress(entity_type, EntityId(entity_id), ShardId(group, number))
