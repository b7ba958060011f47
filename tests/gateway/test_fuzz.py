"""Whatever one client sends, the gateway stays up and another client's
call is answered (generated messages, virtual time, memory streams)."""

from __future__ import annotations

import json

import attrs
import msgpack
import trio
import trio.testing
from hypothesis import given, settings, strategies as st
from trio_websocket import ConnectionClosed, WebSocketConnection

from trio_cluster.gateway import JSON, MSGPACK

from .app import decode, encode, exchange, gateway_definition, open_gateway
from .test_liveness import connect

KINDS = [
    "call",
    "stream",
    "credit",
    "cancel",
    "ping",
    "pong",
    "subscribe",
    "presence",
    "ack",
    "nope",
]
values = st.recursive(
    # Integers msgpack can carry (the client side must be able to send them).
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=6,
)
frames = st.fixed_dictionaries(
    {"t": st.sampled_from(KINDS)},
    optional={
        "id": st.integers(-2, 2**54) | values,
        "op": st.sampled_from(["Counter.add", "Counter.count", "Blocker.wait", "x"])
        | values,
        "key": st.sampled_from(["a", "", " b"]) | values,
        "msg": values,
        "credit": st.integers(-1, 2**21) | values,
        "n": st.integers(-1, 5) | values,
        "topic": st.sampled_from(["room:1", ""]) | values,
        "presence": st.booleans() | values,
        "epoch": st.text(max_size=4) | values,
        "seqs": st.lists(st.integers(-1, 3), max_size=3) | values,
    },
)


def as_message(item: object, subprotocol: str) -> bytes | str:
    if isinstance(item, bytes | str):
        return item
    if subprotocol == JSON:
        return json.dumps(item)
    return msgpack.packb(item)  # type: ignore[no-any-return]


async def _exercise(
    ws: WebSocketConnection, messages: list[object], subprotocol: str
) -> None:
    for item in messages:
        await ws.send_message(as_message(item, subprotocol))
    with trio.move_on_after(1.0):
        while True:
            answer = decode(await ws.get_message())
            assert answer["t"] in ("reply", "item", "end", "error", "ping", "pong")


@settings(max_examples=30)
@given(
    subprotocol=st.sampled_from([JSON, MSGPACK]),
    messages=st.lists(
        frames | st.binary(max_size=12) | st.text(max_size=12), max_size=12
    ),
)
def test_one_client_cannot_hurt_another(
    subprotocol: str, messages: list[object]
) -> None:
    async def scenario() -> None:
        gateway = attrs.evolve(
            gateway_definition(message_rate=None),
            topics=lambda name: name.startswith("room:"),
            presence=lambda client, topic: "someone",
        )
        async with open_gateway(gateway) as server, connect(server) as good:
            async with connect(server) as bad:
                closed: int | None = None
                try:
                    await _exercise(bad, messages, subprotocol)
                except ConnectionClosed as exc:
                    closed = -1 if exc.reason is None else exc.reason.code
                # Only an unreadable message closes the socket, with its code.
                assert closed in (None, 1003, 1007, 1009)
            call = {
                "t": "call",
                "id": 1,
                "op": "Counter.add",
                "key": "z",
                "msg": {"amount": 1},
            }
            answer = await exchange(good, json.loads(encode(call)))
            assert answer["t"] == "reply"
            assert answer["v"] >= 1

    trio.run(scenario, clock=trio.testing.MockClock(autojump_threshold=0))
