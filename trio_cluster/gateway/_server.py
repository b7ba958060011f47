"""`serve_gateway`: the gateway's accept loop, refusals, and heartbeats
(Trio driver).

Theory of operation. Each accepted TCP connection is one task
(`GatewayServer._accept`), in this order, each step able to refuse it with
nothing the client sent processed further:

1. a slot (`Admission`: ``max_connections`` sockets, ``max_pending_upgrades``
   of them before their upgrade), else the stream is closed unread;
2. the request head (`read_head`), within ``open_timeout`` of the accept;
   ``GET /gateway.js`` is answered with the JavaScript client here;
3. the connect rate of the client's IP address (`KeyedWindows`): HTTP 429
   with ``Retry-After``. While an address is blocked, its connections are
   answered so before step 1, unread, by their accepting task
   (`_refused_blocked`);
4. the path, the upgrade, a subprotocol both sides speak, the WebSocket
   headers (`upgrade_refusal`): else 404, 426 or 400;
5. the authentication hook with the `Handshake`: `UnauthorizedError` (or a
   None principal) is HTTP 401/403, any other exception 500 (logged);
6. the ``101`` answer, written by the gateway (`accept_response`), a
   `ServerSocket` over the stream (the WebSocket's data phase, read in this
   task), the welcome frame, then `ClientConnection.run` until the socket
   ends.

That task is the socket's only one while it idles: it reads the socket
itself (`ClientConnection.run`), and over TCP its writes go into an `Outbox`
that needs a task only while the client is behind.

Heartbeats: one task per gateway drives one `Heartbeats` structure for all
sockets; it sleeps in a cancel scope whose deadline is the next due time
(moved earlier when a socket is added), so an idle gateway with ten
thousand sockets has one timer, and each wake-up also sends the pings due
within 2 % of ``ping_interval`` after it.
"""

from __future__ import annotations

import logging
import math
import os
from contextlib import suppress
from typing import TYPE_CHECKING, Final

import attrs
import trio

from .._core._heartbeat import Disconnect, Heartbeats, SendPing
from .._core._ratelimit import KeyedWindows
from .._log_limit import LogLimiter
from ..transport._ws_admission import Admission, ConnectionLimits
from ..transport._ws_connection import CONNECTION_ERRORS, describe
from ..transport._ws_handshake import remote_host, remote_name
from ..transport._ws_outbox import Outbox
from ._client_info import ClientInfo
from ._connection import ClientConnection
from ._definition import Gateway, Handshake, resolve_routes
from ._errors import UnauthorizedError
from ._http import HeadError, client_script, http_response, read_head
from ._hub import TopicAccess, TopicHub
from ._protocol import SUBPROTOCOLS, CloseCode
from ._sessions import Session, SessionLink, valid_session
from ._socket import ServerSocket
from ._statistics import GatewayCounters, GatewayStatistics, render_gateway_metrics
from ._topics import Topic
from ._upgrade import accept_response, head_rest, upgrade_refusal
from ._users import DirectoryJoin, client_topics

if TYPE_CHECKING:
    from .._runner import Runner
    from ._connection import MessageSocket
    from ._definition import Route
    from ._http import Head

__all__ = ["GatewayServer", "serve_gateway"]

log = logging.getLogger("trio_cluster.gateway")


class GatewayServer:
    """A running gateway (what ``nursery.start(serve_gateway, ...)`` returns)."""

    def __init__(
        self,
        runner: Runner,
        gateway: Gateway,
        routes: dict[str, Route],
        host: str,
        port: int,
    ) -> None:
        config = gateway.config
        self.host = host
        self.port = port
        """The port listened on (the real one when 0 was asked)."""
        self._runner = runner
        self._gateway = gateway
        self._config = config
        self._routes = routes
        self._counters = GatewayCounters()
        self._warnings = LogLimiter(logger=log)
        self._admission = Admission(
            ConnectionLimits(config.max_connections, config.max_pending_upgrades)
        )
        self._connect_rate = (
            None if config.connect_rate is None else KeyedWindows(config.connect_rate)
        )
        self._heartbeats = Heartbeats(
            interval=config.ping_interval, timeout=config.ping_timeout
        )
        self._seen = self._heartbeats.seen
        """What a connection calls for each message (one bound method for
        all sockets: a gateway holds tens of thousands)."""
        self._connections: dict[int, ClientConnection] = {}
        self._numbers = 0
        self._sleep: trio.CancelScope | None = None
        self._closing = False
        self._topics: TopicAccess | None = None
        self._emptied = trio.Event()
        """Set when the last socket is forgotten."""
        self._blocked_answer: tuple[int, bytes] | None = None
        """The last 429 written to a blocked address, by its ``Retry-After``."""

    @property
    def runner(self) -> Runner:
        """The runner the gateway serves."""
        return self._runner

    @property
    def url(self) -> str:
        """``ws://host:port/path`` of the gateway."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"ws://{host}:{self.port}{self._config.path}"

    def statistics(self) -> GatewayStatistics:
        """A snapshot of the gateway's counters."""
        self._counters.connections = len(self._connections)
        return self._counters.snapshot(
            connection.link.quality for connection in self._connections.values()
        )

    def connections(self) -> list[ClientConnection]:
        """The sockets up now."""
        return list(self._connections.values())

    def render_metrics(self) -> str:
        """Prometheus lines of the gateway (give it to `serve_metrics`'
        ``extra``)."""
        return render_gateway_metrics(
            self.statistics(), {"runner": str(self._runner.address)}
        )

    # ------------------------------------------------------------------
    # Heartbeats

    async def _beat(self) -> None:
        heartbeats = self._heartbeats
        # Pings due within this of the first are sent with it: one wake-up
        # serves the sockets that connected about together.
        early = _EARLY_PINGS * heartbeats.interval
        while True:
            with trio.CancelScope(deadline=heartbeats.next_deadline()) as self._sleep:
                await trio.sleep_forever()
            for command in heartbeats.due(trio.current_time(), early):
                connection = self._connections.get(command.key)
                if connection is None:
                    continue
                if isinstance(command, SendPing):
                    connection.ping()
                elif isinstance(command, Disconnect):
                    connection.end(CloseCode.HEARTBEAT_TIMEOUT, "heartbeat timeout")

    def _watch(self, connection: ClientConnection) -> None:
        if self._closing:
            connection.end(CloseCode.GOING_AWAY, "gateway shutting down")
        self._connections[connection.number] = connection
        due = self._heartbeats.add(connection.number, trio.current_time())
        sleep = self._sleep
        if sleep is not None and due < sleep.deadline:
            sleep.deadline = due

    def _forget(self, connection: ClientConnection) -> None:
        self._connections.pop(connection.number, None)
        self._heartbeats.remove(connection.number)
        if not self._connections:
            self._emptied.set()

    # ------------------------------------------------------------------
    # Accepting

    async def handle_stream(self, stream: trio.abc.Stream) -> None:
        """Serve one accepted stream as the accept loop does (steps 1-6 of
        the module docstring), until its socket ends; the stream is closed
        then. For a listener of your own, or a test over memory streams.

        Nothing the client does raises here (failures are logged, bounded).
        Cancellation: the socket's work is cancelled, the stream closed.
        """
        await self._accept(stream)

    async def _accept(self, stream: trio.abc.Stream) -> None:
        remote = remote_name(stream)
        if self._refused_blocked(stream, remote):
            await trio.lowlevel.checkpoint()
            return
        slot = self._admission.admit()
        if slot is None:
            self._counters.refused_other += 1
            await trio.aclose_forcefully(stream)
            return
        try:
            connection = await self._open(stream, remote)
            slot.hello_done()
            if connection is not None:
                # `serve_connection`, inline: an idle socket's task waits
                # with one frame fewer.
                self._watch(connection)
                try:
                    connection.send_welcome()
                    await connection.run()
                finally:
                    self._forget(connection)
        except* CONNECTION_ERRORS as group:
            log.debug("gateway connection from %s: %s", remote, describe(group))
        except* Exception as group:
            self._warnings.log(
                logging.WARNING,
                remote_host(remote),
                "failed connections",
                "gateway connection from %s failed: %r",
                remote,
                group.exceptions[0],
            )
        finally:
            slot.release()
            await trio.aclose_forcefully(stream)

    def _refused_blocked(self, stream: trio.abc.Stream, remote: str) -> bool:
        """Answer a TCP connection from an address the connect rate blocks
        at once: HTTP 429 with ``Retry-After``, written before anything is
        read (what the client sent is dropped unread, so that the close is
        not a reset), then the socket closed. A client that keeps connecting
        while blocked costs an accept, a write and a close each, not a task
        reading its request. Whether it was refused (and closed)."""
        limit = self._connect_rate
        if limit is None or not isinstance(stream, trio.SocketStream):
            return False
        wait = limit.blocked_for(remote_host(remote), trio.current_time())
        if wait <= 0:
            return False
        self._counters.refused_rate_limited += 1
        retry = math.ceil(wait)
        cached = self._blocked_answer
        if cached is None or cached[0] != retry:
            # Made again each second at most (`Retry-After` and `Date`).
            cached = self._blocked_answer = (retry, _Answer.too_many(wait).response())
        sock = stream.socket
        with suppress(OSError):  # the client is gone already: nothing to say
            os.write(sock.fileno(), cached[1])  # a new connection takes it at once
            os.read(sock.fileno(), _DROPPED)  # BlockingIOError if nothing came yet
        sock.close()
        return True

    async def _open(
        self, stream: trio.abc.Stream, remote: str
    ) -> ClientConnection | None:
        """Steps 2-6 of the module docstring: the upgraded connection, or
        None once the client has been answered (or gave up)."""
        config = self._config
        with trio.move_on_after(config.open_timeout):
            try:
                head = await read_head(stream)
            except HeadError as exc:
                self._counters.refused_other += 1
                await _Answer.text(exc.status, str(exc)).send(stream)
                return None
            if head is None:
                return None
            answer = self._answer_for(head, remote)
            if answer is None and (refusal := upgrade_refusal(head)) is not None:
                self._counters.refused_other += 1
                answer = _Answer.text(*refusal)
            if answer is not None:
                await answer.send(stream)
                return None
            handshake = handshake_of(head, remote)
            principal, denial = await self._authenticate(handshake)
            if denial is not None:
                await denial.send(stream)
                return None
            outbox: Outbox | None = None
            if isinstance(stream, trio.SocketStream):
                stream = outbox = Outbox(stream)
            response = accept_response(head, handshake.subprotocol)
            if outbox is not None:
                # Written with the welcome frame, which follows at once.
                outbox.hold_nowait(response)
            else:
                await stream.send_all(response)
            ws = ServerSocket(
                stream,
                trailing_data=head_rest(head),
                max_message_size=config.max_message_size,
            )
            return self.connection_for(
                ws, handshake, principal, head.query.get("session"), outbox
            )
        self._counters.refused_other += 1
        log.debug("no upgrade from %s within %s s", remote, config.open_timeout)
        return None

    def connection_for(
        self,
        ws: ServerSocket | MessageSocket,
        handshake: Handshake,
        principal: object,
        session_token: str | None,
        outbox: Outbox | None = None,
    ) -> ClientConnection:
        """The `ClientConnection` of a socket just upgraded (counted as
        accepted), attached to its session if the gateway has sessions and
        ``session_token`` is a valid one."""
        self._numbers += 1
        self._counters.connections_accepted += 1
        gateway = self._gateway
        session = (
            SessionLink(self._runner.client(Session), session_token)
            if gateway.sessions and valid_session(session_token)
            else None
        )
        info = ClientInfo(
            id=str(self._runner.new_id()),
            principal=principal,
            remote=handshake.remote,
            subprotocol=handshake.subprotocol,
        )
        user = None if gateway.user is None else gateway.user(principal)
        connection = ClientConnection(
            ws,
            info,
            number=self._numbers,
            routes=self._routes,
            config=self._config,
            authorize=gateway.authorize,
            counters=self._counters,
            warnings=self._warnings,
            seen=self._seen,
            outbox=outbox,
            topics=self._topics,
            session=session,
            user=user,
        )
        if session is not None and user is not None and self._topics is not None:
            join = DirectoryJoin(self._topics.hub, connection, user, session.name)
            session.alongside = join.run
        return connection

    async def serve_connection(self, connection: ClientConnection) -> None:
        """Serve an upgraded socket until it ends (step 6 of the module
        docstring): its welcome frame, then `ClientConnection.run`, watched
        by the heartbeats meanwhile."""
        self._watch(connection)
        try:
            connection.send_welcome()
            await connection.run()
        finally:
            self._forget(connection)

    def start_background(self, nursery: trio.Nursery) -> None:
        """Start the gateway's own tasks in ``nursery``: the heartbeats and
        the topics' fan-out."""
        gateway = self._gateway
        if gateway.topics is not None or (
            gateway.sessions and gateway.user is not None
        ):
            hub = TopicHub(
                self._runner.client(Topic),
                nursery,
                str(self._runner.address),
                clock=self._runner.clock,
                counters=self._counters,
            )
            self._topics = TopicAccess(
                hub, client_topics(gateway.topics), gateway.presence
            )
        nursery.start_soon(self._beat)

    def _answer_for(self, head: Head, remote: str) -> _Answer | None:
        """The HTTP answer to ``head`` instead of an upgrade (a file, or a
        refusal), or None to go on."""
        config = self._config
        static = self._static(head.path)
        if static is not None and head.method == "GET" and not head.upgrade:
            body, content_type = static
            return _Answer(200, body, content_type, _STATIC_HEADERS)
        if self._connect_rate is not None:
            wait = self._connect_rate.check(remote_host(remote), trio.current_time())
            if wait > 0:
                self._counters.refused_rate_limited += 1
                return _Answer.too_many(wait)
        answer: _Answer | None = None
        if head.path != config.path:
            answer = _Answer.text(404, f"the gateway is at {config.path}")
        elif head.method != "GET" or not head.upgrade:
            answer = _Answer.text(426, "a WebSocket upgrade is required")
        elif not any(item in SUBPROTOCOLS for item in head.subprotocols):
            offer = ", ".join(SUBPROTOCOLS)
            answer = _Answer.text(400, f"offer one of the subprotocols {offer}")
        if answer is not None:
            self._counters.refused_other += 1
        return answer

    @property
    def admission(self) -> Admission:
        """The connection slots (``max_connections``, ``max_pending_upgrades``)."""
        return self._admission

    def static(
        self, path: str
    ) -> tuple[bytes, str, tuple[tuple[str, str], ...]] | None:
        """The body, content type and headers of a file served at ``path``
        (the JavaScript client, a page), or None."""
        static = self._static(path)
        return None if static is None else (*static, _STATIC_HEADERS)

    def refusal(
        self, head: Head, remote: str
    ) -> tuple[int, str, tuple[tuple[str, str], ...]] | None:
        """Steps 3-4 of the module docstring for an upgrade request: the
        HTTP status, reason and headers to refuse it with (counted), or
        None to go on."""
        answer = self._answer_for(head, remote)
        if answer is None:
            return None
        return answer.status, answer.body.decode().strip(), answer.headers

    async def authenticate(
        self, handshake: Handshake
    ) -> tuple[object, tuple[int, str] | None]:
        """Step 5: the principal, or the HTTP status and reason to refuse
        with (counted; a failing hook is logged)."""
        principal, answer = await self._authenticate(handshake)
        if answer is None:
            return principal, None
        return None, (answer.status, answer.body.decode().strip())

    def _static(self, path: str) -> tuple[bytes, str] | None:
        """The body and content type of a file served at ``path``: the
        JavaScript client, or one of the definition's ``pages``."""
        if path == "/gateway.js":
            return client_script(), "text/javascript; charset=utf-8"
        page = self._gateway.pages.get(path)
        if page is None:
            return None
        return page.encode(), "text/html; charset=utf-8"

    async def _authenticate(
        self, handshake: Handshake
    ) -> tuple[object, _Answer | None]:
        """The principal, or the refusal to answer (None for the principal
        then). A hook that raises anything but `UnauthorizedError` is a bug
        of the application: 500, logged (bounded)."""
        hook = self._gateway.authenticate
        if hook is None:
            await trio.lowlevel.checkpoint()
            return None, None
        try:
            principal = await hook(handshake)
        except UnauthorizedError as exc:
            self._counters.refused_unauthorized += 1
            return None, _Answer.text(exc.status, exc.reason)
        except Exception as exc:
            self._warnings.log(
                logging.ERROR,
                "authenticate",
                "failed authentications",
                "the gateway's authenticate hook raised %r",
                exc,
            )
            self._counters.refused_other += 1
            return None, _Answer.text(500, "authentication failed")
        if principal is None:
            self._counters.refused_unauthorized += 1
            return None, _Answer.text(401, "unauthorized")
        return principal, None

    async def aclose(self) -> None:
        """Close every socket with 1001 (going away) and wait, at most
        ``close_timeout``, for the clients to answer. Sockets that open
        meanwhile are closed too. Cancellation: stops waiting."""
        self._closing = True
        for connection in list(self._connections.values()):
            connection.end(CloseCode.GOING_AWAY, "gateway shutting down")
        with trio.move_on_after(self._config.close_timeout):
            while self._connections:
                self._emptied = trio.Event()
                await self._emptied.wait()
        await trio.lowlevel.checkpoint()


_DROPPED: Final = 65536
"""Bytes of a blocked client's request read and dropped before the close."""
_EARLY_PINGS: Final = 0.02
"""Pings are sent up to this fraction of ``ping_interval`` early."""

_STATIC_HEADERS: Final = (
    ("Access-Control-Allow-Origin", "*"),
    ("Cache-Control", "max-age=300"),
)


@attrs.frozen
class _Answer:
    """An HTTP response given instead of an upgrade."""

    status: int
    body: bytes
    content_type: str = "text/plain; charset=utf-8"
    headers: tuple[tuple[str, str], ...] = ()

    @classmethod
    def text(
        cls, status: int, reason: str, headers: tuple[tuple[str, str], ...] = ()
    ) -> _Answer:
        return cls(status, f"{reason}\n".encode(), headers=headers)

    @classmethod
    def too_many(cls, wait: float) -> _Answer:
        """The connect rate's refusal: 429, retry after ``wait`` seconds."""
        retry = (("Retry-After", str(math.ceil(wait))),)
        return cls.text(429, "too many connections", retry)

    def response(self) -> bytes:
        """The whole HTTP response (it closes the connection)."""
        return http_response(
            self.status, self.body, content_type=self.content_type, headers=self.headers
        )

    async def send(self, stream: trio.abc.Stream) -> None:
        await stream.send_all(self.response())


async def serve_gateway(
    runner: Runner,
    gateway: Gateway,
    host: str,
    port: int,
    *,
    task_status: trio.TaskStatus[GatewayServer] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``gateway`` for ``runner`` on ``host:port`` until cancelled;
    ``started`` gets the `GatewayServer` (its ``port`` is the real one).

    Each socket is a task of its own; whatever one client does (bad frames,
    floods, stalls, a reset) ends that socket only, never the server.

    Raises:
        ConfigError, EntityDefinitionError: the definition cannot be served
            (before ``started``).
        OSError: the port cannot be bound (before ``started``).

    Cancellation: stops listening and cancels every socket's work (no close
    frames are sent: call `GatewayServer.aclose` first for a graceful end).
    """
    routes = resolve_routes(runner, gateway)
    listeners = await trio.open_tcp_listeners(port, host=host)
    bound = listeners[0].socket.getsockname()
    server = GatewayServer(runner, gateway, routes, host, bound[1])
    async with trio.open_nursery() as nursery:
        server.start_background(nursery)
        await nursery.start(trio.serve_listeners, server._accept, listeners)
        task_status.started(server)


def handshake_of(head: Head, remote: str) -> Handshake:
    """The `Handshake` of an upgrade request that passed `refusal` (so it
    offers one of our subprotocols: the first one it offers is chosen)."""
    subprotocol = next(item for item in head.subprotocols if item in SUBPROTOCOLS)
    return Handshake(
        remote=remote,
        path=head.path,
        query=head.query,
        headers=head.headers,
        subprotocol=subprotocol,
    )
