"""Hand-driven WebSocket peers for tests of the runner port: they speak the
handshake message by message (with the core's proofs, but not the
endpoint's code), so a test can stop, skip or corrupt any step."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager

import trio
import trio_websocket

from trio_cluster import RunnerAddress
from trio_cluster._core._auth import ClusterSecrets
from trio_cluster._groups import unwrap_single
from trio_cluster.transport._framing import (
    ACCEPTED,
    decode_hello,
    encode_hello,
    encode_proof,
)
from trio_cluster.transport._ws_auth import DIALER, LISTENER
from trio_cluster.transport._ws_handshake import RESOURCE

SECRET = b"a cluster secret of enough bytes"
OTHER_SECRET = b"another secret, for another one"


class NotAccepted(Exception):
    """The runner did not accept the handshake (its close reason, if any)."""


@asynccontextmanager
async def raw_websocket(
    address: RunnerAddress, *, message_queue_size: int = 8
) -> AsyncIterator[trio_websocket.WebSocketConnection]:
    """A plain trio-websocket client connected to ``address``; the TCP stream
    is closed on exit (trio-websocket leaves it open when the server closes
    first)."""
    stream = await trio.open_tcp_stream(address.host, address.port)
    try:
        async with unwrap_single(), trio.open_nursery() as nursery:
            ws = await trio_websocket.wrap_client_stream(
                nursery,
                stream,
                str(address),
                RESOURCE,
                message_queue_size=message_queue_size,
            )
            yield ws
            nursery.cancel_scope.cancel()
    finally:
        await trio.aclose_forcefully(stream)


async def handshake(
    ws: trio_websocket.WebSocketConnection,
    me: RunnerAddress,
    listener: RunnerAddress,
    secrets: Sequence[bytes] = (),
    *,
    nonce: bytes = b"n" * 32,
    check_listener: bool = True,
) -> None:
    """Open a connection as the runner ``me`` would, proving ``secrets``
    (none: an unauthenticated hello); with ``check_listener`` False, the
    listener's proofs are not checked (to present wrong proofs of our own).

    Raises:
        NotAccepted: the listener closed the connection, or answered with
            proofs that do not check out.
    """
    try:
        await ws.send_message(encode_hello(me, nonce if secrets else None))
        reply = decode_hello(await ws.get_message())
        if not secrets:
            return
        keys = ClusterSecrets.of(secrets)
        assert reply.nonce is not None
        parts = (nonce, reply.nonce, str(me).encode(), str(listener).encode())
        if check_listener and not keys.verify(LISTENER, parts, reply.proofs):
            raise NotAccepted("the listener's proofs are wrong")
        await ws.send_message(encode_proof(keys.prove(DIALER, parts)))
        if await ws.get_message() != ACCEPTED:
            raise NotAccepted("no ACCEPTED")
    except trio_websocket.ConnectionClosed as exc:
        reason = exc.reason
        text = "closed" if reason is None else f"{reason.code} {reason.reason}"
        raise NotAccepted(text) from exc


@asynccontextmanager
async def raw_peer(
    listener: RunnerAddress,
    me: RunnerAddress,
    secrets: Sequence[bytes] = (),
    *,
    check_listener: bool = True,
) -> AsyncIterator[trio_websocket.WebSocketConnection]:
    """A hand-driven peer of the endpoint at ``listener`` announcing ``me``,
    past the handshake.

    Raises:
        NotAccepted: the handshake failed.
    """
    async with raw_websocket(listener) as ws:
        await handshake(ws, me, listener, secrets, check_listener=check_listener)
        yield ws
