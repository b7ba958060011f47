"""Hypothesis strategies for the wire fuzzing suite (`test_wire_fuzz`): what
an outsider (a peer without the cluster secret) sends instead of a proper
handshake (`outsider_scripts`)."""

from __future__ import annotations

from typing import Any, Final

import attrs
import msgpack
from hypothesis import strategies as st

from trio_cluster._engine._wire import Kind, Mode

from .wire_strategies import (
    BROADCAST,
    MSGPACK_INT as _MSGPACK_INT,
    NOT_BYTES as _NOT_BYTES,
    NOT_INT as _NOT_INT,
    NOT_TEXT as _NOT_TEXT,
    OUTSIDER,
    Target,
    frame as _frame,
    mark_payload,
    request as _request,
    weird_text as _weird_text,
)

__all__ = ["Computed", "OutsiderScript", "outsider_scripts"]

_U64: Final = (1 << 64) - 1


@attrs.frozen
class Computed:
    """A proof the test computes once it has the listener's hello:
    ``other``, a correct proof of another secret; ``echo``, the listener's
    own proofs sent back."""

    what: str


@attrs.frozen
class OutsiderScript:
    """What a peer without the secret sends: ``hello`` first, then (after
    reading the listener's hello when ``wait_hello``) ``then``."""

    hello: bytes | str
    wait_hello: bool
    then: tuple[bytes | str | Computed, ...]
    announce: str
    """Whose address the hello announces (``outsider``, ``member``: the
    other runner's, ``listener``: the runner's own), for the report."""


# ----------------------------------------------------------------------
# Outsiders


_MAGIC: Final = "trio_cluster"
_PROOF: Final = 32
_NONCE: Final = 32


def _hello(*items: Any) -> bytes:
    data: bytes = msgpack.packb(list(items), use_bin_type=True)
    return data


@st.composite
def _bad_hello(draw: st.DrawFn, address: str) -> bytes | str:
    """A first message that is no acceptable hello."""
    nonce = b"n" * _NONCE
    kind = draw(
        st.sampled_from(
            [
                "random",
                "text",
                "value",
                "oversized",
                "magic",
                "version",
                "address",
                "nonce",
                "proofs",
                "long",
            ]
        )
    )
    if kind == "random":
        return draw(st.binary(max_size=300))
    if kind == "text":
        return draw(
            st.one_of(_weird_text(100), st.just(_hello(_MAGIC, 1, address).hex()))
        )
    if kind == "value":
        value: bytes = msgpack.packb(
            draw(
                st.one_of(
                    st.lists(st.one_of(_MSGPACK_INT, _weird_text(20)), max_size=5),
                    st.dictionaries(_weird_text(5), _MSGPACK_INT, max_size=3),
                    _MSGPACK_INT,
                    st.none(),
                )
            )
        )
        return value
    if kind == "oversized":
        return _hello(_MAGIC, 1, address, nonce, [b"p" * 2000])
    if kind == "magic":
        magic = draw(st.one_of(_weird_text(20), st.just(_MAGIC.upper()), _NOT_TEXT))
        return _hello(magic if magic != _MAGIC else "other", 1, address, nonce)
    if kind == "version":
        version = draw(st.one_of(st.integers(2, _U64), st.just(0), _NOT_INT))
        return _hello(_MAGIC, version, address, nonce)
    if kind == "address":
        bad = draw(
            st.one_of(
                st.sampled_from(["", "nohost", "127.0.0.1:99999", "::::", "a b:1"]),
                st.just("x" * 300 + ":1"),
                _NOT_TEXT,
            )
        )
        return _hello(_MAGIC, 1, bad, nonce)
    if kind == "nonce":
        wrong = draw(
            st.one_of(
                st.binary(max_size=_NONCE - 1),
                st.binary(min_size=_NONCE + 1, max_size=100),
                _NOT_BYTES,
            )
        )
        return _hello(_MAGIC, 1, address, wrong)
    if kind == "proofs":
        # A dialer's hello carries no proofs.
        return _hello(_MAGIC, 1, address, nonce, [b"p" * _PROOF])
    return _hello(_MAGIC, 1, address, nonce, [b"p" * _PROOF], "more")


@st.composite
def _bad_proof(draw: st.DrawFn, frame: bytes) -> bytes | str | Computed:
    """What a peer without the secret answers the listener's challenge
    with."""
    kind = draw(
        st.sampled_from(
            ["random_proofs", "shape", "frame", "text", "other", "echo", "hello"]
        )
    )
    if kind == "random_proofs":
        proofs = draw(
            st.lists(
                st.binary(min_size=_PROOF, max_size=_PROOF), min_size=1, max_size=8
            )
        )
        return _hello(_MAGIC, "proof", proofs)
    if kind == "shape":
        return _hello(
            *draw(
                st.sampled_from(
                    [
                        (_MAGIC, "proof", []),
                        (_MAGIC, "proof", [b"p" * (_PROOF - 1)]),
                        (_MAGIC, "proof", [b"p" * _PROOF] * 9),
                        (_MAGIC, "proof"),
                        ("other", "proof", [b"p" * _PROOF]),
                        (_MAGIC, "accepted"),
                    ]
                )
            )
        )
    if kind == "frame":
        return frame  # a frame where the proof belongs
    if kind == "text":
        return draw(_weird_text(50))
    if kind == "hello":
        return _hello(_MAGIC, 1, "127.0.0.1:9", b"n" * _NONCE)
    return Computed(kind)


@st.composite
def outsider_scripts(
    draw: st.DrawFn, target: Target, addresses: dict[str, str]
) -> OutsiderScript:
    """What a peer without the cluster secret sends: a bad hello; a good one
    without a nonce (no secret); or a good one with a nonce, then no valid
    proof (wrong secret, garbage, a frame, nothing awaited). Then frames of
    valid-shaped requests and broadcasts tagged `OUTSIDER`.

    ``addresses`` maps ``outsider``, ``member`` and ``listener`` to the
    address strings a hello may announce."""
    place = draw(st.sampled_from(target.served))
    request = _request(
        1, Mode.CALL, place, target.entity_type, "mark", mark_payload(OUTSIDER), None
    )
    frame = _frame([request, [Kind.BROADCAST, BROADCAST, mark_payload(OUTSIDER)]])
    announce = draw(st.sampled_from(sorted(addresses)))
    address = addresses[announce]
    nonce = b"n" * _NONCE
    frames = tuple(draw(st.lists(st.just(frame), max_size=2)))
    kind = draw(st.sampled_from(["bad_hello", "no_nonce", "bad_proof", "eager"]))
    if kind == "bad_hello":
        return OutsiderScript(draw(_bad_hello(address)), False, frames, announce)
    if kind == "no_nonce":
        return OutsiderScript(_hello(_MAGIC, 1, address), False, frames, announce)
    hello = _hello(_MAGIC, 1, address, nonce)
    if kind == "eager":
        # Frames right behind the hello, before the listener's challenge.
        return OutsiderScript(hello, False, (frame, *frames), announce)
    proof = draw(_bad_proof(frame))
    return OutsiderScript(hello, True, (proof, *frames), announce)
