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
from ._ws_connection import CloseCode, ConnectFailedError
from ._ws_handshake import receive_unless_duplicate, refuse, remote_host

if TYPE_CHECKING:
    from trio_websocket import WebSocketConnection

    from .._core._addresses import RunnerAddress
    from .._core._auth import ClusterSecrets
    from .._log_limit import LogLimiter
    from ._framing import Hello
    from ._peers import Counters

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
    counters: Counters,
    warnings: LogLimiter,
    close_timeout: float,
) -> bool:
    """The listener's side, after a dialer's ``hello`` with a nonce: send our
    hello with our proofs, then check the dialer's (messages 2 and 3).

    Returns:
        Whether the dialer proved the secret. If not, the connection is
        closed (`CloseCode.POLICY_VIOLATION` for wrong proofs, counted in
        ``unauthenticated_peers``; `CloseCode.PROTOCOL_ERROR` for a message
        that is no proof, counted in ``bad_peers``) and the problem logged.

    Raises:
        ConnectionClosed, OSError...: the dialer went away.
    """
    assert hello.nonce is not None
    nonce = new_nonce()
    parts = _parts(hello.nonce, nonce, hello.address, local)
    await ws.send_message(encode_hello(local, nonce, secrets.prove(LISTENER, parts)))
    answer = await ws.get_message()
    what = f"the connection from {remote} ({hello.address})"
    try:
        proofs = decode_proof(answer)
    except MalformedMessageError as exc:
        counters.bad_peers += 1
        await refuse(
            ws,
            exc.problems[0],
            code=CloseCode.PROTOCOL_ERROR,
            key=remote_host(remote),
            what=what,
            warnings=warnings,
            close_timeout=close_timeout,
        )
        return False
    if secrets.verify(DIALER, parts, list(proofs)):
        return True
    counters.unauthenticated_peers += 1
    await refuse(
        ws,
        "wrong proof of the cluster secret",
        code=CloseCode.POLICY_VIOLATION,
        key=remote_host(remote),
        what=what,
        warnings=warnings,
        close_timeout=close_timeout,
        sent=FAILED,
    )
    return False


async def authenticate_listener(
    ws: WebSocketConnection,
    hello: Hello,
    *,
    nonce: bytes,
    local: RunnerAddress,
    secrets: ClusterSecrets,
    counters: Counters,
    warnings: LogLimiter,
    close_timeout: float,
) -> bool:
    """The dialer's side, after the listener's ``hello`` (checked by
    `check_server_hello`): check its proofs, send ours, wait for `ACCEPTED`
    (messages 2 to 4). ``nonce`` is the one our hello carried.

    Returns:
        True once accepted; False if the listener closed the connection as
        a duplicate (it keeps its own connection to us).

    Raises:
        ConnectFailedError: the listener's proofs are wrong (counted in
            ``unauthenticated_peers``; the connection is closed with
            `CloseCode.POLICY_VIOLATION`), or it answered something else
            than `ACCEPTED` (`CloseCode.PROTOCOL_ERROR`).
        ConnectionClosed: the listener refused our proofs or went away.
    """
    assert hello.nonce is not None
    assert hello.proofs is not None
    parts = _parts(nonce, hello.nonce, local, hello.address)
    what = f"the connection to {hello.address}"
    if not secrets.verify(LISTENER, parts, list(hello.proofs)):
        counters.unauthenticated_peers += 1
        problem = "the runner there does not prove the cluster secret"
        await refuse(
            ws,
            problem,
            code=CloseCode.POLICY_VIOLATION,
            key=hello.address,
            what=what,
            warnings=warnings,
            close_timeout=close_timeout,
            sent=FAILED,
        )
        raise ConnectFailedError(problem)
    await ws.send_message(encode_proof(secrets.prove(DIALER, parts)))
    answer = await receive_unless_duplicate(ws)
    if answer is None:
        return False
    if answer != ACCEPTED:
        counters.bad_peers += 1
        problem = "the runner there answered our proofs with something else"
        await refuse(
            ws,
            problem,
            code=CloseCode.PROTOCOL_ERROR,
            key=hello.address,
            what=what,
            warnings=warnings,
            close_timeout=close_timeout,
        )
        raise ConnectFailedError(problem)
    return True
