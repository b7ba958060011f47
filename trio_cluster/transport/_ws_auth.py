"""Cluster authentication in the WebSocket handshake (Trio driver of the
transport edge; the proofs themselves are `trio_cluster._core._auth`).

Theory of operation. When the endpoints hold `ClusterSecrets`, a connection
opens in four messages, each at most `MAX_HELLO_SIZE` bytes:

1. dialer: its hello, with a fresh nonce ``nd``;
2. listener: its hello, with a fresh nonce ``nl`` and its proofs of
   ``("trio_cluster runner listener", nd, nl, dialer, listener)``, the last
   two being the addresses the hellos announce;
3. dialer: once the listener's proofs check out, its own proofs of
   ``("trio_cluster runner dialer", nd, nl, dialer, listener)``;
4. listener: once the dialer's proofs check out and the connection is the
   pair's one (`keep_inbound`), `ACCEPTED`; or a close (`DUPLICATE`).

Both ends prove, so neither talks to a process without the secret: an
outsider can neither call handlers nor pose as a runner to receive what is
sent to it. The listener proves first, with a nonce of its own in the proof,
so what an outsider gets from it is good for nothing else (a proof in the
dialer's role is another message). Until message 4 the listener reads no
frame and hands nothing to the runtime: a peer that fails is closed
(`CloseCode.POLICY_VIOLATION`, reason ``authentication failed``: no hint of
what was wrong) and counted in ``unauthenticated_peers``.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Final

from .._core._auth import NONCE_SIZE
from .._errors import MalformedMessageError
from ._framing import ACCEPTED, decode_proof, encode_hello, encode_proof
from ._ws_connection import ConnectFailedError
from ._ws_handshake import receive_unless_duplicate, remote_host

if TYPE_CHECKING:
    from trio_websocket import WebSocketConnection

    from .._core._addresses import RunnerAddress
    from .._core._auth import ClusterSecrets
    from ._framing import Hello
    from ._ws_handshake import Refusals

__all__ = [
    "DIALER",
    "LISTENER",
    "authenticate_dialer",
    "authenticate_listener",
    "new_nonce",
]

LISTENER: Final = "trio_cluster runner listener"
"""The label of a listener's proofs."""
DIALER: Final = "trio_cluster runner dialer"
"""The label of a dialer's proofs."""

FAILED: Final = "authentication failed"
"""The close reason sent to a peer that failed: nothing more."""


def new_nonce() -> bytes:
    """A challenge nonce from the operating system's random source."""
    return os.urandom(NONCE_SIZE)


def _parts(
    dialer_nonce: bytes,
    listener_nonce: bytes,
    dialer: RunnerAddress,
    listener: RunnerAddress,
) -> tuple[bytes, ...]:
    return (dialer_nonce, listener_nonce, str(dialer).encode(), str(listener).encode())


async def authenticate_dialer(
    ws: WebSocketConnection,
    hello: Hello,
    *,
    local: RunnerAddress,
    remote: str,
    secrets: ClusterSecrets,
    refusals: Refusals,
) -> bool:
    """The listener's side, after a dialer's ``hello`` with a nonce: send our
    hello with our proofs, then check the dialer's (messages 2 and 3).

    Returns:
        Whether the dialer proved the secret. If not, the connection is
        refused (see `Refusals`): unauthenticated for wrong proofs, bad
        input for a message that is no proof.

    Raises:
        ConnectionClosed, OSError...: the dialer went away.
    """
    assert hello.nonce is not None
    nonce = new_nonce()
    parts = _parts(hello.nonce, nonce, hello.address, local)
    await ws.send_message(encode_hello(local, nonce, secrets.prove(LISTENER, parts)))
    answer = await ws.get_message()
    what = f"the connection from {remote} ({hello.address})"
    key = remote_host(remote)
    try:
        proofs = decode_proof(answer)
    except MalformedMessageError as exc:
        await refusals.bad(ws, exc.problems[0], key=key, what=what)
        return False
    if secrets.verify(DIALER, parts, proofs):
        return True
    await refusals.unauthenticated(
        ws, "wrong proof of the cluster secret", key=key, what=what, sent=FAILED
    )
    return False


async def authenticate_listener(
    ws: WebSocketConnection,
    hello: Hello,
    *,
    nonce: bytes,
    local: RunnerAddress,
    secrets: ClusterSecrets,
    refusals: Refusals,
) -> bool:
    """The dialer's side, after the listener's ``hello`` (checked by
    `check_server_hello`): check its proofs, send ours, wait for `ACCEPTED`
    (messages 2 to 4). ``nonce`` is the one our hello carried.

    Returns:
        True once accepted; False if the listener closed the connection as
        a duplicate (it keeps its own connection to us).

    Raises:
        ConnectFailedError: the connection was refused (see `Refusals`):
            the listener's proofs are wrong (unauthenticated), or it
            answered ours with something else than `ACCEPTED` (bad input).
        ConnectionClosed: the listener refused our proofs or went away.
    """
    assert hello.nonce is not None
    parts = _parts(nonce, hello.nonce, local, hello.address)
    what = f"the connection to {hello.address}"
    if not secrets.verify(LISTENER, parts, hello.proofs):
        problem = "the runner there does not prove the cluster secret"
        await refusals.unauthenticated(
            ws, problem, key=hello.address, what=what, sent=FAILED
        )
        raise ConnectFailedError(problem)
    await ws.send_message(encode_proof(secrets.prove(DIALER, parts)))
    answer = await receive_unless_duplicate(ws)
    if answer is None:
        return False
    if answer != ACCEPTED:
        problem = "the runner there answered our proofs with something else"
        await refusals.bad(ws, problem, key=hello.address, what=what)
        raise ConnectFailedError(problem)
    return True
