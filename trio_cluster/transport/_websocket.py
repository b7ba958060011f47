"""`WebSocketTransport`: runners reaching each other over WebSocket (edge adapter).

Each endpoint listens on its address and keeps at most one connection per
peer runner, opened on the first ``send_nowait`` to it. Frames are binary
WebSocket messages carrying batches of envelopes (see `_framing` for the
format). The parts:

* `_ws_handshake`: connecting, the WebSocket handshake and the hellos;
* `_ws_connection`: an established connection (reader, writer and pinger
  tasks, close codes, translation of trio-websocket's exceptions);
* `_ws_endpoint`: an endpoint (peers, one connection per pair, dialing with
  backoff, accepting);
* `_ws_admission`: how many accepted connections an endpoint holds;
* this module: the transport's options, listening, and the endpoint's
  lifetime.

Listening uses `trio.serve_listeners` with `trio_websocket.wrap_server_stream`,
each connection in its own task whose failures are contained.
trio-websocket's `WebSocketServer` is not used: its per-connection task lets
exceptions of its reader task escape into the listener's nursery, so one
client that sends garbage and resets the TCP connection stops the whole
server (reproduced with trio-websocket 0.12.2; see also
python-trio/trio-websocket#184).
"""

from __future__ import annotations

import ipaddress
import random
import ssl
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import TYPE_CHECKING

import trio

from .._core._addresses import RunnerAddress
from .._core._auth import ClusterSecrets
from .._core._retry import Backoff
from .._errors import ConfigError, RunnerUnavailableError
from .._transport_abc import EndpointHandler, Transport
from ._peers import DEFAULT_MAX_MESSAGE_SIZE, Limits, unwrap_single
from ._ws_admission import ConnectionLimits
from ._ws_connection import Settings, Timing, describe
from ._ws_endpoint import Listener, WebSocketEndpoint

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Sequence

__all__ = ["WebSocketEndpoint", "WebSocketTransport"]


class WebSocketTransport(Transport):
    """The transport for runners in different processes: one WebSocket
    connection per pair of runners.

    Args:
        max_message_size: largest frame (WebSocket message) in bytes, sent or
            accepted; an envelope may use all of it but 5 bytes. Every runner
            of a cluster should use the same value.
        message_queue_size: received messages buffered per connection before
            trio-websocket stops reading the socket, until the connection is
            up (then each message is handled as it is parsed).
        max_queued_envelopes: most envelopes queued for one peer.
        max_queued_bytes: most encoded bytes queued for one peer (at least
            ``max_message_size``).
        ping_interval: seconds between pings on a connection.
        ping_timeout: a connection whose ping is not answered within this
            many seconds is closed and reported lost.
        connect_timeout: longest time to connect and exchange hellos.
        close_timeout: longest wait for a peer to answer a close frame.
        reconnect_backoff: delay before the first retry after a failed
            connection attempt; doubles after each failure ...
        reconnect_backoff_max: ... up to this many seconds.
        reconnect_jitter: fraction of each delay removed at random (0..1).
        rng: the random source of the jitter (seed it for reproducible runs;
            default: a new, unseeded `random.Random`).
        server_ssl_context: TLS for accepted connections (with
            ``client_ssl_context``); None for plain WebSocket.
        client_ssl_context: TLS for dialed connections.
        listen_at: where endpoints listen (e.g. ``0.0.0.0:34431``: every
            interface), if not at the address they advertise (behind NAT,
            or on every interface); None: at the advertised address.
        max_connections: most accepted connections an endpoint holds at
            once (handshaking or up); more are closed at once, unread, and
            counted in ``connections_refused``. Dialed connections are not
            counted.
        max_pending_handshakes: most accepted connections whose hello is
            not done yet (at most ``max_connections``); each is closed if
            its hello is not done within ``connect_timeout``.
        cluster_secrets: the shared secrets of the cluster (``bytes``, or
            ``str`` taken as UTF-8; each at least 16 bytes, at most 8):
            every connection then starts with a challenge-response in which
            both ends prove they hold one of them, and a peer that does not
            is closed before anything it sends is read (counted in
            ``unauthenticated_peers``). Every runner of a cluster needs one
            secret in common; hold two while rotating. Empty: no
            authentication.
        allow_unauthenticated: listen on an address that is not loopback
            without ``cluster_secrets`` and without mutual TLS (a
            ``server_ssl_context`` whose ``verify_mode`` is
            `ssl.CERT_REQUIRED`). Refused by default: anyone who reaches the
            port could call every handler and pose as any runner.

    Raises:
        ConfigError: an invalid option, only one of the TLS contexts,
            ``max_pending_handshakes`` over ``max_connections``, or a
            secret too short (the message never shows a secret).
    """

    def __init__(
        self,
        *,
        max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
        message_queue_size: int = 64,
        max_queued_envelopes: int = 65536,
        max_queued_bytes: int = 4 * DEFAULT_MAX_MESSAGE_SIZE,
        ping_interval: float = 1.0,
        ping_timeout: float = 2.0,
        connect_timeout: float = 5.0,
        close_timeout: float = 1.0,
        reconnect_backoff: float = 0.05,
        reconnect_backoff_max: float = 5.0,
        reconnect_jitter: float = 0.5,
        rng: random.Random | None = None,
        server_ssl_context: ssl.SSLContext | None = None,
        client_ssl_context: ssl.SSLContext | None = None,
        listen_at: RunnerAddress | None = None,
        max_connections: int = 1024,
        max_pending_handshakes: int = 64,
        cluster_secrets: Sequence[bytes | str] = (),
        allow_unauthenticated: bool = False,
    ) -> None:
        self.limits = Limits(
            max_message_size=max_message_size,
            message_queue_size=message_queue_size,
            max_queued_envelopes=max_queued_envelopes,
            max_queued_bytes=max_queued_bytes,
        )
        self.timing = Timing(
            ping_interval=ping_interval,
            ping_timeout=ping_timeout,
            connect_timeout=connect_timeout,
            close_timeout=close_timeout,
        )
        self.connections = ConnectionLimits(
            max_connections=max_connections,
            max_pending_handshakes=max_pending_handshakes,
        )
        self.backoff = Backoff(
            reconnect_backoff, reconnect_backoff_max, 2.0, reconnect_jitter
        )
        self.rng = rng if rng is not None else random.Random()
        if (server_ssl_context is None) != (client_ssl_context is None):
            raise ConfigError(
                "pass both server_ssl_context and client_ssl_context (TLS both"
                " ways), or neither"
            )
        self.server_ssl_context = server_ssl_context
        self.client_ssl_context = client_ssl_context
        self.listen_at = listen_at
        self.secrets = ClusterSecrets.of(cluster_secrets) if cluster_secrets else None
        self.allow_unauthenticated = allow_unauthenticated

    @property
    def authenticates(self) -> bool:
        """Whether peers must prove who they are: a cluster secret, or
        client certificates (mutual TLS)."""
        context = self.server_ssl_context
        return self.secrets is not None or (
            context is not None and context.verify_mode == ssl.CERT_REQUIRED
        )

    def open_endpoint(
        self, address: RunnerAddress, handler: EndpointHandler
    ) -> AbstractAsyncContextManager[WebSocketEndpoint]:
        """Listen at ``address`` (port 0: a free port, in
        ``Endpoint.address``; at ``listen_at`` instead, if given, with
        ``address`` advertised) and serve until the block ends.

        On a normal exit every connection is closed with a close frame (at
        most ``close_timeout`` seconds in all); on cancellation they are
        closed at once, without waiting for the peers. Queued envelopes are
        dropped either way.

        Raises:
            RunnerUnavailableError: cannot listen there (address in use,
                unknown host...); the `OSError` is the ``__cause__``.
            ConfigError: the listening address is not loopback, and the
                transport neither authenticates nor ``allow_unauthenticated``.
        """
        return self._open(address, handler)

    async def _check_exposure(self, listeners: list[trio.SocketListener]) -> None:
        """Refuse to listen beyond loopback without authentication (closing
        ``listeners`` first).

        Raises:
            ConfigError: a listener is bound to an address that is not
                loopback, and peers need not prove who they are.
        """
        if self.authenticates or self.allow_unauthenticated:
            return
        for listener in listeners:
            host = listener.socket.getsockname()[0]
            if not ipaddress.ip_address(host.partition("%")[0]).is_loopback:
                for each in listeners:
                    await each.aclose()
                raise ConfigError(
                    f"listening on {host}, which is not a loopback address, needs"
                    " cluster authentication: give cluster_secrets (trio-cluster"
                    " run: TRIO_CLUSTER_SECRET or --secret-file) or mutual TLS;"
                    " or allow_unauthenticated=True (--allow-unauthenticated)"
                    " if the network is closed to everyone else"
                )

    async def _listen(self, address: RunnerAddress) -> tuple[list[Listener], int]:
        """Open the listeners; return them and the port they listen on."""
        bind = address if self.listen_at is None else self.listen_at
        try:
            listeners = await trio.open_tcp_listeners(bind.port, host=bind.host)
        except OSError as exc:
            raise RunnerUnavailableError(
                runner=str(address),
                detail=f"cannot listen on {bind}: {describe(exc)}",
            ) from exc
        await self._check_exposure(listeners)
        if bind.port == 0 and len(listeners) > 1:
            # Port 0 gives each listener (IPv4, IPv6...) its own port: keep
            # one, so the endpoint has one address.
            for extra in listeners[1:]:
                await extra.aclose()
            listeners = listeners[:1]
        port: int = listeners[0].socket.getsockname()[1]
        if address.port != 0:
            port = address.port  # advertised as given (a NAT's port)
        context = self.server_ssl_context
        if context is None:
            return list(listeners), port
        return [
            trio.SSLListener(listener, context, https_compatible=True)
            for listener in listeners
        ], port

    @asynccontextmanager
    async def _open(
        self, address: RunnerAddress, handler: EndpointHandler
    ) -> AsyncIterator[WebSocketEndpoint]:
        listeners, port = await self._listen(address)
        async with unwrap_single(), trio.open_nursery() as nursery:
            settings = Settings(
                limits=self.limits,
                timing=self.timing,
                backoff=self.backoff,
                rng=self.rng,
                client_ssl_context=self.client_ssl_context,
                connections=self.connections,
                secrets=self.secrets,
            )
            endpoint = WebSocketEndpoint(
                settings, RunnerAddress(address.host, port), handler, nursery
            )
            await nursery.start(endpoint.serve, listeners)
            try:
                yield endpoint
            finally:
                await endpoint.aclose()
