"""Hypothesis strategies for the wire fuzzing suite (`test_wire_fuzz`): what a
hand-driven peer sends a runner after the handshake (`scripts`; what an
outsider sends instead of a handshake is in `wire_outsiders`).

Every generated REQUEST carries a `Mark` payload whose tag says what the test
expects of it: a tag in `Script.expected` must run exactly once (a valid
request), one in `Script.maybe` at most once (a valid request that may be
interrupted or cut off), and `FORBIDDEN` or `OUTSIDER` never (every hostile
variant is refused by construction: each mutation makes exactly the field it
names invalid for every value it draws).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Final

import attrs
import msgpack
from hypothesis import strategies as st

from trio_cluster._call_metadata import MAX_CARRIED_ENTRIES, MAX_CARRIED_SIZE
from trio_cluster._core._addresses import MAX_ENTITY_ID_LENGTH
from trio_cluster._engine._wire import MAX_REASON_LENGTH, Kind, Mode

__all__ = [
    "BROADCAST",
    "FORBIDDEN",
    "MSGPACK_INT",
    "NOT_BYTES",
    "NOT_INT",
    "NOT_TEXT",
    "OUTSIDER",
    "Mark",
    "Place",
    "Script",
    "Target",
    "frame",
    "mark_payload",
    "request",
    "scripts",
    "weird_text",
]

FORBIDDEN: Final = "forbidden"
"""The tag of every hostile request: a handler run with it is a bug."""
OUTSIDER: Final = "outsider"
"""The tag of every request from a peer without the cluster secret."""
BROADCAST: Final = "probe"
"""The name of the broadcast the fuzzed runner declares."""
_U64: Final = (1 << 64) - 1
_MSGPACK_INT: Final = st.integers(-(1 << 63), (1 << 64) - 1)
"""Integers msgpack can encode."""
_NO_METADATA: Final = object()
"""No metadata field: a request of the shorter shape."""
_I64: Final = (1 << 63) - 1


@attrs.frozen
class Mark:
    """The message of every handler of the fuzzed entity."""

    tag: str


def mark_payload(tag: str) -> bytes:
    """The encoded `Mark` with ``tag`` (what the runner's codec decodes)."""
    data: bytes = msgpack.packb({"tag": tag})
    return data


@attrs.frozen
class Place:
    """An entity of the fuzzed type and the shard it belongs to."""

    entity_id: str
    group: str
    number: int


@attrs.frozen
class Target:
    """What the strategies need to know of the runner under test."""

    entity_type: str
    served: tuple[Place, ...]
    """Entities whose shard the runner under test serves."""
    barrier: Place
    """Another one, that the scripts leave alone (see `test_wire_fuzz`)."""
    elsewhere: tuple[Place, ...]
    """Entities whose shard the other runner serves."""
    shards: int
    shard_of: Callable[[str], int | None]
    """The shard number of an entity id (None: not a valid id)."""
    max_message_size: int


@attrs.frozen
class Script:
    """What an authenticated peer sends after the handshake."""

    messages: tuple[bytes | str, ...]
    expected: dict[str, int]
    """Tags and how many times their handler runs (if the connection is
    not cut)."""
    maybe: dict[str, int]
    """Tags and how many times their handler runs at most."""
    call_ids: frozenset[int]
    """The call ids of the REQUESTs sent: the only ones answered."""
    last: str
    """``ok``: the last message is harmless; ``fatal``: it makes the runner
    close the connection; ``maybe``: either."""
    eager: bool
    """Frames are sent right behind the proof, before ``ACCEPTED``."""


# ----------------------------------------------------------------------
# Values


def _weird_text(max_size: int = 40) -> st.SearchStrategy[str]:
    return st.text(
        st.characters(codec="utf-8", exclude_categories=["Cs"]), max_size=max_size
    )


_NOT_INT: Final = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.booleans(),
    st.none(),
    _weird_text(10),
    st.binary(max_size=10),
    st.lists(st.integers(0, 3), max_size=2),
)
_NOT_TEXT: Final = st.one_of(
    st.integers(-(1 << 63), _U64), st.none(), st.booleans(), st.binary(max_size=10)
)
_NOT_BYTES: Final = st.one_of(
    _weird_text(10), st.integers(0, 255), st.none(), st.lists(st.integers(0, 255))
)


def _bad_u64(low: int = 0) -> st.SearchStrategy[Any]:
    """A value that is not an int in ``[low, 2**64)``."""
    return st.one_of(_NOT_INT, st.integers(-(1 << 63), low - 1))


def _too_long(limit: int) -> st.SearchStrategy[str]:
    return st.integers(limit + 1, limit + 300).map(lambda n: "x" * n)


def _bad_text(limit: int) -> st.SearchStrategy[Any]:
    return st.one_of(_NOT_TEXT, st.just(""), _too_long(limit))


_BAD_SECONDS: Final = st.one_of(
    st.just(math.nan),
    st.just(math.inf),
    st.just(-math.inf),
    st.floats(max_value=-1e-9, allow_infinity=False),
    st.floats(min_value=1e9 + 1, allow_infinity=False),
    st.integers(-(1 << 63), -1),
    st.booleans(),
    _weird_text(5),
    st.binary(max_size=5),
)
_GOOD_SECONDS: Final = st.one_of(
    st.none(), st.floats(5.0, 1e9), st.integers(5, 1_000_000_000)
)
_BAD_PAYLOAD: Final = st.one_of(
    st.just(b"\xc1"),
    st.just(b""),
    # Not a map (the message's encoding): no random bytes decode as one.
    st.binary(max_size=64).filter(
        lambda data: not data or not (0x80 <= data[0] <= 0x8F or data[0] >= 0xDE)
    ),
    st.sampled_from(
        [
            msgpack.packb({"tag": 5}),
            msgpack.packb({"wrong": FORBIDDEN}),
            msgpack.packb([FORBIDDEN]),
            msgpack.packb(FORBIDDEN),
            msgpack.packb({"tag": [FORBIDDEN]}),
        ]
    ),
)


# ----------------------------------------------------------------------
# Requests


_HANDLERS: Final = {
    # handler tag: (delivery mode, whether the strategy may interrupt it)
    "mark": Mode.CALL,
    "mark_later": Mode.CALL,
    "hang": Mode.CALL,
    "marks": Mode.STREAM,
}


def _request(
    call_id: Any,
    mode: Any,
    place: Place | tuple[Any, Any, Any],
    entity_type: Any,
    tag: Any,
    payload: Any,
    left: Any,
    metadata: Any = _NO_METADATA,
) -> list[Any]:
    if isinstance(place, Place):
        entity_id, group, number = place.entity_id, place.group, place.number
    else:
        entity_id, group, number = place
    request = [
        Kind.REQUEST,
        call_id,
        mode,
        entity_type,
        entity_id,
        group,
        number,
        tag,
        payload,
        left,
    ]
    if metadata is not _NO_METADATA:
        request.append(metadata)
    return request


_GOOD_METADATA: Final = st.one_of(
    st.just(_NO_METADATA),
    st.dictionaries(
        st.text(min_size=1, max_size=64).filter(lambda k: "\x00" not in k),
        st.text(max_size=100).filter(lambda v: "\x00" not in v),
        max_size=5,
    ),
    st.just({"traceparent": "00-" + "1" * 32 + "-" + "2" * 16 + "-01"}),
)
"""Call metadata a member may send with a valid request (or none)."""

_BAD_METADATA: Final = st.one_of(
    _NOT_BYTES.filter(lambda v: not isinstance(v, dict)),
    st.just({"": "empty key"}),
    st.just({"k": 1}),
    st.just({1: "v"}),
    st.just({"k": "\x00"}),
    st.just({f"k{i}": "v" for i in range(MAX_CARRIED_ENTRIES + 1)}),
    st.just({"k": "v" * (MAX_CARRIED_SIZE + 1)}),
    st.just({"k" * 65: "v"}),
)
"""Call metadata no runner sends: the request is malformed."""


@st.composite
def _valid_request(
    draw: st.DrawFn, target: Target, call_id: int, tag: str, *, hangs: bool
) -> list[Any]:
    """A request the runner runs."""
    handler = draw(
        st.sampled_from([h for h in sorted(_HANDLERS) if hangs or h != "hang"])
    )
    mode = _HANDLERS[handler]
    if handler == "mark" and draw(st.booleans()):
        mode = Mode.DISCARD
    place = draw(st.sampled_from(target.served))
    left = draw(_GOOD_SECONDS)
    return _request(
        call_id,
        mode,
        place,
        target.entity_type,
        handler,
        mark_payload(tag),
        left,
        draw(_GOOD_METADATA),
    )


@st.composite
def _hostile_request(draw: st.DrawFn, target: Target, call_id: int) -> list[Any]:
    """A REQUEST of the right length that the runner refuses: one field is
    wrong (its type, its range, or what it names)."""
    place = draw(st.sampled_from(target.served))
    fields: dict[str, Any] = {
        "call_id": call_id,
        "mode": Mode.CALL,
        "place": place,
        "entity_type": target.entity_type,
        "tag": "mark",
        "payload": mark_payload(FORBIDDEN),
        "left": None,
    }
    problem = draw(
        st.sampled_from(
            [
                "call_id",
                "mode",
                "entity_type",
                "unknown_type",
                "entity_id",
                "weird_id",
                "group",
                "number",
                "wrong_shard",
                "elsewhere",
                "tag",
                "unknown_tag",
                "wrong_mode",
                "payload",
                "left",
                "metadata",
            ]
        )
    )
    if problem == "call_id":
        fields["call_id"] = draw(_bad_u64())
    elif problem == "mode":
        fields["mode"] = draw(st.one_of(_NOT_INT, st.integers(3, _U64), st.just(-1)))
    elif problem == "entity_type":
        fields["entity_type"] = draw(_bad_text(150))
    elif problem == "unknown_type":
        fields["entity_type"] = draw(
            st.one_of(st.just("Nope"), _weird_text(150)).filter(
                lambda name: name not in ("", target.entity_type)
            )
        )
    elif problem == "entity_id":
        bad_id = draw(_bad_text(MAX_ENTITY_ID_LENGTH))
        fields["place"] = (bad_id, place.group, place.number)
    elif problem == "weird_id":
        # Any text, named with a shard it does not belong to.
        weird = draw(_weird_text(MAX_ENTITY_ID_LENGTH))
        real = target.shard_of(weird)
        number = draw(st.integers(1, target.shards).filter(lambda n: n != real))
        fields["place"] = (weird, place.group, number)
    elif problem == "group":
        group = draw(st.one_of(_bad_text(64), st.just("nogroup"), _weird_text(64)))
        if group == place.group:
            group = "nogroup"
        fields["place"] = (place.entity_id, group, place.number)
    elif problem == "number":
        number = draw(st.one_of(_NOT_INT, st.integers(-(1 << 63), 0)))
        fields["place"] = (place.entity_id, place.group, number)
    elif problem == "wrong_shard":
        # A valid shard number, not the entity's: served here or not.
        number = draw(
            st.integers(1, target.shards + 5).filter(lambda n: n != place.number)
        )
        fields["place"] = (place.entity_id, place.group, number)
    elif problem == "elsewhere":
        fields["place"] = draw(st.sampled_from(target.elsewhere))
    elif problem == "tag":
        fields["tag"] = draw(_bad_text(100))
    elif problem == "unknown_tag":
        fields["tag"] = draw(
            st.one_of(st.just("no_such"), _weird_text(100)).filter(
                lambda name: name not in ("", *_HANDLERS, "keep")
            )
        )
    elif problem == "wrong_mode":
        fields["tag"], fields["mode"] = draw(
            st.sampled_from(
                [
                    ("keep", Mode.CALL),  # persisted: never from a REQUEST
                    ("keep", Mode.DISCARD),
                    ("marks", Mode.CALL),
                    ("marks", Mode.DISCARD),
                    ("mark", Mode.STREAM),
                    ("hang", Mode.STREAM),
                ]
            )
        )
    elif problem == "payload":
        fields["payload"] = draw(st.one_of(_BAD_PAYLOAD, _NOT_BYTES))
    elif problem == "metadata":
        fields["metadata"] = draw(_BAD_METADATA)
    else:
        fields["left"] = draw(_BAD_SECONDS)
    return _request(**fields)


# ----------------------------------------------------------------------
# Every other kind (none of them can run a handler on the owner)


def _address_fields(target: Target) -> st.SearchStrategy[list[Any]]:
    good = st.sampled_from(target.served + target.elsewhere).map(
        lambda p: [target.entity_type, p.entity_id, p.group, p.number]
    )
    bad = st.tuples(
        st.one_of(st.just(target.entity_type), _bad_text(150)),
        st.one_of(_weird_text(20), _bad_text(MAX_ENTITY_ID_LENGTH)),
        st.one_of(st.just("default"), _bad_text(64)),
        st.one_of(st.integers(-5, target.shards + 5), _NOT_INT),
    ).map(list)
    return st.one_of(good, bad)


def _call_id(known: list[int]) -> st.SearchStrategy[Any]:
    """A call id: one of ours, any other, or no call id at all."""
    options = [st.integers(0, _U64), _bad_u64()]
    if known:
        options.insert(0, st.sampled_from(known))
    return st.one_of(*options)


def _counted(low: int = 0) -> st.SearchStrategy[Any]:
    return st.one_of(st.integers(low, _U64), _bad_u64(low))


def _bytes() -> st.SearchStrategy[Any]:
    return st.one_of(st.binary(max_size=200), _BAD_PAYLOAD, _NOT_BYTES)


def _other_envelope(target: Target, known: list[int]) -> st.SearchStrategy[list[Any]]:
    """An envelope of any kind but REQUEST, fields valid or not; or of an
    unknown kind, or of the wrong length."""
    ids = _call_id(known)
    request_ids = st.one_of(
        st.integers(0, _I64), st.integers(_I64 + 1, _U64), _bad_u64()
    )
    kinds = [
        st.tuples(st.just(Kind.REPLY), ids, _bytes()),
        st.tuples(
            st.just(Kind.NOT_DELIVERED),
            ids,
            st.one_of(_weird_text(100), _too_long(MAX_REASON_LENGTH), _NOT_TEXT),
        ),
        st.tuples(st.just(Kind.STREAM_ITEM), ids, _counted(1), _bytes()),
        st.tuples(st.just(Kind.STREAM_END), ids, _counted(), _bytes()),
        st.tuples(st.just(Kind.STREAM_CREDIT), ids, _counted()),
        st.tuples(st.just(Kind.INTERRUPT), ids),
        st.tuples(
            st.just(Kind.PERSISTED),
            request_ids,
            _address_fields(target),
            st.one_of(st.booleans(), _NOT_INT),
        ).map(lambda t: (t[0], t[1], *t[2], t[3])),
        st.tuples(st.just(Kind.PERSISTED_REPLY), request_ids, _bytes()),
        st.tuples(
            st.just(Kind.BROADCAST),
            st.one_of(st.just(BROADCAST), _weird_text(30), _bad_text(200)),
            st.one_of(_BAD_PAYLOAD, _NOT_BYTES),
        ),
        # Unknown kinds, and no kind at all.
        st.tuples(
            st.one_of(
                st.integers(11, _U64),
                st.integers(-(1 << 63), 0),
                _NOT_INT,
                st.just("REQUEST"),
            ),
            st.integers(0, 10),
        ),
        st.just(()),
    ]
    envelope = st.one_of(*kinds).map(list)
    # Truncated, or with a field too many.
    reshaped = st.tuples(envelope, st.integers(-3, 1)).map(
        lambda t: t[0][: len(t[0]) + t[1]] if t[1] < 0 else [*t[0], None]
    )
    return st.one_of(envelope, reshaped)


# ----------------------------------------------------------------------
# Scripts


def _frame(envelopes: list[Any]) -> bytes:
    data: bytes = msgpack.packb(envelopes, use_bin_type=True)
    return data


@st.composite
def _last_message(
    draw: st.DrawFn, target: Target, tail: list[Any]
) -> tuple[bytes | str, str]:
    """A message that is no proper frame, and whether it makes the runner
    close the connection (``fatal``), or may (``maybe``), or not (``ok``)."""
    good = _frame(tail or [[Kind.INTERRUPT, 1]])
    kind = draw(
        st.sampled_from(
            [
                "text",
                "truncated",
                "not_msgpack",
                "random",
                "empty",
                "empty_frame",
                "oversized",
                "not_an_array",
                "not_an_envelope",
                "many_empty",
            ]
        )
    )
    if kind == "text":
        return draw(st.one_of(_weird_text(50), st.just(good.hex()))), "fatal"
    if kind == "truncated":
        return good[: draw(st.integers(0, len(good) - 1))], "fatal"
    if kind == "not_msgpack":
        return b"\xc1" + draw(st.binary(max_size=50)), "fatal"
    if kind == "random":
        return draw(st.binary(min_size=1, max_size=200)), "maybe"
    if kind == "empty":
        return b"", "fatal"
    if kind == "empty_frame":
        return b"\x90", "ok"
    if kind == "oversized":
        extra = draw(st.integers(1, 1000))
        return b"\x00" * (target.max_message_size + extra), "fatal"
    if kind == "not_an_array":
        value = draw(
            st.one_of(
                _MSGPACK_INT,
                _weird_text(20),
                st.dictionaries(st.integers(0, 9), _MSGPACK_INT, max_size=3),
                st.binary(max_size=10),
                st.none(),
            )
        )
        return msgpack.packb(value), "fatal"
    if kind == "not_an_envelope":
        # The frame is refused whole: nothing in it is delivered.
        where = draw(st.integers(0, len(tail)))
        stray = draw(st.one_of(_MSGPACK_INT, st.none(), _weird_text(10)))
        return _frame([*tail[:where], stray, *tail[where:]]), "fatal"
    count = draw(st.integers(1, 2000))
    return _frame([[]] * count), "ok"


@st.composite
def scripts(
    draw: st.DrawFn, target: Target, *, max_envelopes: int = 12, hangs: bool = True
) -> Script:
    """What an authenticated peer sends: valid requests and broadcasts (each
    tagged ``ok<n>``), hostile envelopes of every kind, control envelopes
    naming the valid requests' call ids, duplicates, a second request reusing
    a valid call id (which must not run), all shuffled and split into
    frames; maybe a last message that is no proper frame. With ``hangs``,
    valid requests include calls of a handler that never returns (the
    peer's INTERRUPT or its leaving must cancel it)."""
    next_id = 1
    envelopes: list[list[Any]] = []
    valid: dict[int, str] = {}  # call id -> tag
    requests: dict[int, list[Any]] = {}  # call id -> valid request
    broadcasts: set[str] = set()
    request_ids: set[int] = set()
    # Valid requests and broadcasts.
    for n in range(draw(st.integers(0, 4))):
        tag = f"ok{n}"
        if draw(st.integers(0, 5)) == 0:
            envelopes.append([Kind.BROADCAST, BROADCAST, mark_payload(tag)])
            broadcasts.add(tag)
        else:
            requests[next_id] = draw(_valid_request(target, next_id, tag, hangs=hangs))
            envelopes.append(requests[next_id])
            valid[next_id] = tag
            request_ids.add(next_id)
            next_id += 1
    # Hostile requests and other kinds.
    for _ in range(draw(st.integers(0, max_envelopes))):
        if draw(st.booleans()):
            envelopes.append(draw(_hostile_request(target, next_id)))
            request_ids.add(next_id)
            next_id += 1
        else:
            envelopes.append(draw(_other_envelope(target, sorted(valid))))
    # Duplicates, anywhere.
    for _ in range(draw(st.integers(0, 3))):
        if envelopes:
            envelopes.append(draw(st.sampled_from(envelopes)))
    order = draw(st.permutations(range(len(envelopes))))
    envelopes = [envelopes[i] for i in order]
    # A second request under a valid call id, behind the first: ignored as
    # a repeat, so its (forbidden) handler never runs.
    if valid and draw(st.booleans()) is True:
        reused = draw(st.sampled_from(sorted(valid)))
        first = next(
            i
            for i, e in enumerate(envelopes)
            if len(e) in (10, 11)
            and e[0] == Kind.REQUEST
            and type(e[1]) is int  # not True, which equals 1
            and e[1] == reused
        )
        where = draw(st.integers(first + 1, len(envelopes)))
        place = draw(st.sampled_from(target.served))
        envelopes.insert(
            where,
            _request(
                reused,
                Mode.CALL,
                place,
                target.entity_type,
                "mark",
                mark_payload(FORBIDDEN),
                None,
            ),
        )
    # Frames.
    messages: list[bytes | str] = []
    rest = envelopes
    while rest:
        size = draw(st.integers(1, len(rest)))
        messages.append(_frame(rest[:size]))
        rest = rest[size:]
    last = "ok"
    if draw(st.booleans()):
        tail = (
            draw(st.lists(st.sampled_from(envelopes), max_size=3)) if envelopes else []
        )
        message, last = draw(_last_message(target, tail))
        messages.append(message)
    eager = draw(st.integers(0, 7)) == 0
    # What runs: each valid request once, unless an interrupt may cancel it
    # before its handler starts; each broadcast once per copy delivered.
    interrupted = {
        e[1]
        for e in envelopes
        if len(e) == 2
        and type(e[0]) in (int, Kind)  # `Kind.INTERRUPT` itself, or 7
        and e[0] == Kind.INTERRUPT
        and type(e[1]) is int
    }
    # A request behind a hanging one, on the same entity, waits for ever.
    hanging = {(e[1], e[4]) for e in requests.values() if e[7] == "hang"}
    cut_off = {
        call_id
        for call_id, e in requests.items()
        if call_id in interrupted
        or any(entity == e[4] and hang != call_id for hang, entity in hanging)
    }
    expected = {tag: 1 for call_id, tag in valid.items() if call_id not in cut_off}
    maybe = {tag: 1 for call_id, tag in valid.items() if call_id in cut_off}
    for tag in broadcasts:
        copies = [Kind.BROADCAST, BROADCAST, mark_payload(tag)]
        expected[tag] = sum(e == copies for e in envelopes)
    if last != "ok" or eager:
        maybe.update(expected)
        expected = {}
    return Script(
        messages=tuple(messages),
        expected=expected,
        maybe=maybe,
        call_ids=frozenset(request_ids),
        last=last,
        eager=eager,
    )


# Shared with `wire_outsiders`.
MSGPACK_INT = _MSGPACK_INT
NOT_BYTES = _NOT_BYTES
NOT_INT = _NOT_INT
NOT_TEXT = _NOT_TEXT
frame = _frame
request = _request
weird_text = _weird_text
