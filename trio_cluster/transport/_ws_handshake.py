"""Opening a WebSocket connection between two runners: TCP (or TLS), the
WebSocket handshake, and the hellos (Trio driver of the transport edge).

Theory of operation. The *dialer* connects, completes the WebSocket
handshake on `RESOURCE` and sends its hello first; the *listener* checks it
(magic, protocol version, a valid address that is not its own) and answers
with its own hello, or closes with `CloseCode.PROTOCOL_ERROR` and the
problem as the close reason. The dialer then checks the listener's hello the
same way, and also that the listener announces the address it dialed.

When the endpoint holds cluster secrets, the dialer's hello carries a nonce
and the listener must prove the secret before the dialer does (see
`_ws_auth`); a listener with secrets refuses a hello without a nonce, and one
without secrets refuses a hello with one: both ends must agree on whether the
cluster authenticates, and a mismatch is named in the close reason.

Whether a connection is kept once the hellos are fine is the endpoint's
decision (`keep_inbound`, one connection per pair of runners); this module
only moves bytes and checks hellos, and logs and counts every bad hello.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final

import attrs
import trio
from trio_websocket import (
    ConnectionClosed,
    WebSocketConnection,
    wrap_client_stream,
    wrap_server_stream,
)

from .._errors import MalformedMessageError
from .._log_limit import LogLimiter
from ._framing import MAX_HELLO_SIZE, Hello, decode_hello
from ._peers import Counters
from ._ws_connection import CloseCode, ConnectFailedError, close_websocket
from ._ws_outbox import open_outbox

if TYPE_CHECKING:
    import ssl

    from .._core._addresses import RunnerAddress
    from .._core._auth import ClusterSecrets
    from ._peers import Limits

__all__ = [
    "RECEIVE_BUFFER_SIZE",
    "RESOURCE",
    "Refusals",
    "allow_messages",
    "check_client_hello",
    "check_server_hello",
    "is_duplicate",
    "keep_inbound",
    "open_client",
    "open_server",
    "receive_unless_duplicate",
    "remote_name",
]

RESOURCE: Final = "/trio_cluster"
"""The WebSocket resource (URL path) runners connect to."""

RECEIVE_BUFFER_SIZE: Final = 64 * 1024
"""Bytes read from the socket at once (trio-websocket's default is 4 KiB,
which splits a batch of a hundred envelopes over two reads)."""


def allow_messages(ws: WebSocketConnection, limits: Limits) -> None:
    """Lift ``ws``'s message size limit from `MAX_HELLO_SIZE` to
    ``limits.max_message_size``, once the peer's hello is checked.

    Until then (`open_server`) a larger message closes the connection
    (1009), so what an accepted connection holds before its hello is at most
    ``message_queue_size`` messages of `MAX_HELLO_SIZE` bytes plus a read
    buffer, not ``message_queue_size`` times ``max_message_size`` (a client
    that connects and streams bytes). A client sends nothing more before our
    hello, so no real message can meet the lower limit. Dialed connections
    keep ``max_message_size`` from the start: the listener may send frames
    right behind its hello, before the dialer's task has seen it.

    trio-websocket fixes the size at the handshake and has no public way to
    change it later: this sets the attribute its reader checks.
    """
    ws._max_message_size = limits.max_message_size


def keep_inbound(
    local: RunnerAddress, peer: RunnerAddress, *, dialing: bool, dialed_up: bool
) -> bool:
    """Whether to keep an inbound connection from ``peer``.

    ======================  ==================  ==========================
    inbound from            this endpoint       verdict
    ======================  ==================  ==========================
    a lower address         anything            keep (it is the preferred one)
    a higher address        is dialing it       refuse: our dial wins
    a higher address        is up on its dial   refuse: ours is preferred
    a higher address        otherwise           keep
    ======================  ==================  ==========================
    """
    return peer < local or not (dialing or dialed_up)


def remote_name(stream: trio.abc.Stream) -> str:
    """``host:port`` of the other end of an accepted stream, for logs."""
    if isinstance(stream, trio.SSLStream):
        stream = stream.transport_stream
    if isinstance(stream, trio.SocketStream):
        try:
            host, port, *_ = stream.socket.getpeername()
        except OSError:
            return "an unknown client"
        return f"{host}:{port}"
    return repr(stream)  # pragma: no cover - only TCP (or TLS) listeners


def remote_host(remote: str) -> str:
    """The host of a `remote_name` (its port changes with each connection):
    what warnings about a client are grouped by."""
    host, colon, _ = remote.rpartition(":")
    return host if colon else remote


def is_duplicate(exc: ConnectionClosed) -> bool:
    """Whether the peer closed a connection because it keeps another one."""
    return exc.reason is not None and exc.reason.code == CloseCode.DUPLICATE


async def open_client(
    nursery: trio.Nursery,
    peer: RunnerAddress,
    limits: Limits,
    ssl_context: ssl.SSLContext | None,
    streams: list[trio.abc.Stream],
) -> WebSocketConnection:
    """Connect to ``peer`` and complete the WebSocket handshake.

    trio-websocket's reader task runs in ``nursery``, and over plain TCP the
    `Outbox`'s flusher. The TCP (or TLS)
    stream is appended to ``streams`` as soon as it exists: trio-websocket
    leaves a client's stream open once the peer has closed the WebSocket, so
    closing it is the caller's job.

    Raises:
        OSError, HandshakeError, trio.BrokenResourceError: could not connect.
        ConnectFailedError: ``peer.host`` is no host name (IDNA refuses it).

    Cancellation: propagates; the stream (if any) is in ``streams``.
    """
    stream: trio.SocketStream | trio.SSLStream[trio.SocketStream]
    try:
        if ssl_context is None:
            stream = await trio.open_tcp_stream(peer.host, peer.port)
        else:
            stream = await trio.open_ssl_over_tcp_stream(
                peer.host, peer.port, ssl_context=ssl_context, https_compatible=True
            )
    except UnicodeError as exc:
        # A host name the IDNA codec refuses (a label over 63 characters,
        # an empty one): as unreachable as one that does not resolve.
        raise ConnectFailedError(f"cannot resolve {peer.host!r:.80}: {exc}") from exc
    streams.append(stream)
    if isinstance(stream, trio.SSLStream):
        # The TLS handshake now, so that a certificate refused (by either
        # side) is the reason given for the failure, not a timeout.
        await stream.do_handshake()
    return await wrap_client_stream(
        nursery,
        # Typed as a TCP or TLS stream; any trio Stream works.
        open_outbox(nursery, stream),  # type: ignore[arg-type]
        str(peer),
        RESOURCE,
        message_queue_size=limits.message_queue_size,
        max_message_size=limits.max_message_size,
        receive_buffer_size=RECEIVE_BUFFER_SIZE,
    )


async def open_server(
    nursery: trio.Nursery, stream: trio.abc.Stream, limits: Limits
) -> tuple[WebSocketConnection, bytes | str]:
    """Complete the WebSocket handshake of an accepted stream and read the
    client's first message (its hello, unchecked).

    Raises:
        ConnectionClosed, HandshakeError, OSError...: the client went away.

    Cancellation: propagates (the caller closes the stream).
    """
    request = await wrap_server_stream(
        nursery,
        open_outbox(nursery, stream),
        message_queue_size=limits.message_queue_size,
        max_message_size=MAX_HELLO_SIZE,  # until allow_messages
        receive_buffer_size=RECEIVE_BUFFER_SIZE,
    )
    ws = await request.accept()
    return ws, await ws.get_message()


async def receive_unless_duplicate(ws: WebSocketConnection) -> bytes | str | None:
    """The next message of a dialed connection; None if the listener closed it
    as a duplicate (it keeps the connection it is dialing to us).

    Raises:
        ConnectionClosed: the listener closed it for another reason.
    """
    try:
        return await ws.get_message()
    except ConnectionClosed as exc:
        if not is_duplicate(exc):
            raise
        return None


@attrs.frozen
class Refusals:
    """How an endpoint turns a connection away during the handshake: a
    warning (rate-limited per ``key``), a counter, a close frame."""

    counters: Counters
    warnings: LogLimiter
    close_timeout: float

    async def refuse(
        self,
        ws: WebSocketConnection,
        problem: str,
        *,
        key: object,
        what: str,
        code: CloseCode = CloseCode.PROTOCOL_ERROR,
        sent: str | None = None,
    ) -> None:
        """Log ``problem`` about ``what`` and close ``ws`` with ``code`` and
        ``sent`` (default: ``problem``) as the reason; counts nothing."""
        self.warnings.warning(
            key, "refused connections", "refusing %s: %s", what, problem
        )
        reason = problem if sent is None else sent
        await close_websocket(ws, code, reason, self.close_timeout)

    async def bad(
        self, ws: WebSocketConnection, problem: str, *, key: object, what: str
    ) -> None:
        """Refuse a peer for a message it should not have sent (1002,
        counted in ``bad_peers``)."""
        self.counters.bad_peers += 1
        await self.refuse(ws, problem, key=key, what=what)

    async def unauthenticated(
        self,
        ws: WebSocketConnection,
        problem: str,
        *,
        key: object,
        what: str,
        sent: str | None = None,
    ) -> None:
        """Refuse a peer that did not prove the cluster secret (1008, counted
        in ``unauthenticated_peers``)."""
        self.counters.unauthenticated_peers += 1
        await self.refuse(
            ws, problem, key=key, what=what, code=CloseCode.POLICY_VIOLATION, sent=sent
        )


async def check_client_hello(
    ws: WebSocketConnection,
    first: bytes | str,
    *,
    local: RunnerAddress,
    remote: str,
    secrets: ClusterSecrets | None,
    refusals: Refusals,
) -> Hello | None:
    """Check the hello an accepting endpoint at ``local`` got from ``remote``.

    Returns:
        The hello; or None, once the connection is refused (see
        `Refusals`): a bad hello, the client announcing ``local`` itself,
        or a hello with a nonce while this endpoint holds no secrets (bad
        input); a hello without a nonce while it holds ``secrets``
        (unauthenticated).
    """
    what = f"the connection from {remote}"
    key = remote_host(remote)
    try:
        hello = decode_hello(first)
        if hello.address == local:
            raise MalformedMessageError(
                what="hello",
                problems=[f"the peer announced our address {hello.address}"],
            )
        if hello.proofs is not None:
            raise MalformedMessageError(
                what="hello", problems=["a dialer's hello carries no proofs"]
            )
        if secrets is None and hello.nonce is not None:
            raise MalformedMessageError(
                what="hello",
                problems=[
                    "the peer authenticates with a cluster secret; this runner has none"
                ],
            )
    except MalformedMessageError as exc:
        await refusals.bad(ws, exc.problems[0], key=key, what=what)
        return None
    if secrets is not None and hello.nonce is None:
        await refusals.unauthenticated(
            ws,
            "authentication required: this runner needs the cluster secret",
            key=key,
            what=what,
        )
        return None
    return hello


async def check_server_hello(
    ws: WebSocketConnection,
    reply: bytes | str,
    *,
    dialed: RunnerAddress,
    authenticating: bool,
    refusals: Refusals,
) -> Hello:
    """Check the hello the endpoint that was dialed at ``dialed`` answered
    (``authenticating``: whether this endpoint sent a nonce).

    Raises:
        ConnectFailedError: the connection was refused (see `Refusals`): a
            bad hello, another address than ``dialed``, a nonce while we
            sent none (bad input), or no proofs while we sent a nonce
            (unauthenticated).
    """
    what = f"the connection to {dialed}"
    try:
        hello = decode_hello(reply)
    except MalformedMessageError as exc:
        await refusals.bad(ws, exc.problems[0], key=dialed, what=what)
        raise ConnectFailedError(str(exc)) from exc
    if hello.address != dialed:
        problem = f"the runner there announced itself as {hello.address}"
        await refusals.refuse(ws, problem, key=dialed, what=what)
    elif authenticating and (hello.nonce is None or hello.proofs is None):
        problem = "the runner there does not prove the cluster secret"
        await refusals.unauthenticated(ws, problem, key=dialed, what=what)
    elif not authenticating and hello.nonce is not None:
        problem = "the runner there authenticates; this one has no cluster secret"
        await refusals.bad(ws, problem, key=dialed, what=what)
    else:
        return hello
    raise ConnectFailedError(problem)
