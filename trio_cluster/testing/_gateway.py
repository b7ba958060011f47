"""`MemoryGateways`: gateways that clients reach over memory streams, with
faults on the client links (test support, Trio).

A test (or the simulator) serves a runner's gateway by name with
`MemoryGateways.serve`, without a TCP listener, and gives its clients a
`connect` hook from `MemoryGateways.connector`
(``open_gateway_client("ws://r0/ws", connect=gateways.connector("c1"))``).
Each connect opens a `MemoryLink`: its client end goes to the client, its
server end is served by the gateway exactly as an accepted TCP connection
(`GatewayServer.handle_stream`: the upgrade, the limits, the heartbeats).

Faults act on links, the way a network fails:

* `MemoryLink.drop` resets a link: both ends fail at once, as after a TCP
  reset;
* `MemoryLink.stall` holds every byte both ways until `MemoryLink.resume`
  (a cut cable, a half-open connection: only heartbeats notice);
* a gateway that stops (cancelled: its runner was killed, say) drops its
  links, as a dead process's sockets are reset.

Everything runs on Trio's clock, so it works on a ``MockClock`` (the
simulator's virtual time).
"""

from __future__ import annotations

import errno
from typing import TYPE_CHECKING

import attrs
import trio

from trio_cluster.gateway import GatewayServer
from trio_cluster.gateway._definition import resolve_routes

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Sequence

    from trio_cluster import Runner
    from trio_cluster.gateway import Gateway

__all__ = ["MemoryGateways", "MemoryLink"]


class _Direction:
    """The bytes travelling one way on a link."""

    def __init__(self) -> None:
        self.data = bytearray()
        """Bytes the receiving end can read."""
        self.held = bytearray()
        """Bytes sent while the link is stalled."""
        self.eof = False
        """The sending end closed (after ``data``)."""
        self.eof_held = False
        self.lot = trio.lowlevel.ParkingLot()
        """Readers waiting for bytes."""
        self.space = trio.lowlevel.ParkingLot()
        """Writers waiting for room."""

    @property
    def queued(self) -> int:
        return len(self.data) + len(self.held)

    def release(self) -> None:
        self.data += self.held
        self.held.clear()
        self.eof = self.eof or self.eof_held
        self.lot.unpark_all()


class MemoryLinkEnd(trio.abc.Stream):
    """One end of a `MemoryLink` (a `trio.abc.Stream`)."""

    def __init__(
        self, link: MemoryLink, inbound: _Direction, outbound: _Direction, name: str
    ) -> None:
        self._link = link
        self._inbound = inbound
        self._outbound = outbound
        self._name = name
        self.closed = False

    def __repr__(self) -> str:
        # The gateway names its clients by their stream (`remote_name`):
        # ``client:number``, grouped by ``client`` like an IP address.
        return self._name

    def _check(self) -> None:
        if self.closed:
            raise trio.ClosedResourceError("this end of the link is closed")
        if self._link.dropped:
            raise trio.BrokenResourceError("the link was reset")

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        """Send ``data`` to the other end (held while the link is stalled);
        wait first while ``buffer`` bytes or more are on their way (the
        other end does not read, or the link is stalled).

        Raises:
            trio.ClosedResourceError: this end is closed.
            trio.BrokenResourceError: the link was reset, or the other end
                is closed (as TCP answers a write to a closed socket).
        """
        await trio.lowlevel.checkpoint()
        outbound = self._outbound
        while True:
            self._check()
            if self._link.peer_of(self).closed:
                raise trio.BrokenResourceError("the other end closed the link")
            if outbound.queued < self._link.buffer:
                break
            await outbound.space.park()  # the reader is slow, or the link stalled
        if self._link.stalled:
            outbound.held += data
        else:
            outbound.data += data
            outbound.lot.unpark_all()

    async def wait_send_all_might_not_block(self) -> None:
        await trio.lowlevel.checkpoint()
        self._check()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        """The next bytes from the other end; ``b""`` once it closed.

        Raises:
            trio.ClosedResourceError: this end is closed.
            trio.BrokenResourceError: the link was reset.
        """
        await trio.lowlevel.checkpoint()
        inbound = self._inbound
        while True:
            self._check()
            if inbound.data:
                size = len(inbound.data) if max_bytes is None else max_bytes
                chunk = bytes(inbound.data[:size])
                del inbound.data[:size]
                inbound.space.unpark_all()
                return chunk
            if inbound.eof:
                return b""
            await inbound.lot.park()

    async def aclose(self) -> None:
        """Close this end: the other end reads what was sent, then ``b""``."""
        if not self.closed:
            self.closed = True
            if self._link.stalled:
                self._outbound.eof_held = True
            else:
                self._outbound.eof = True
            for direction in (self._outbound, self._inbound):
                direction.lot.unpark_all()
                direction.space.unpark_all()
        await trio.lowlevel.checkpoint()


class MemoryLink:
    """A client's connection to a gateway of `MemoryGateways`."""

    def __init__(
        self, client: str, number: int, gateway: str, *, buffer: int = 65536
    ) -> None:
        self.client = client
        """The client's name (its "address")."""
        self.gateway = gateway
        """The name of the gateway it reached."""
        self.buffer = buffer
        """Bytes on their way in each direction before writes wait (a TCP
        connection's buffers)."""
        self.dropped = False
        self.stalled = False
        up, down = _Direction(), _Direction()
        name = f"{client}:{number}"
        self.client_end = MemoryLinkEnd(self, down, up, name)
        """The end the client reads and writes."""
        self.server_end = MemoryLinkEnd(self, up, down, name)
        """The end the gateway serves."""
        self._directions = (up, down)

    def __repr__(self) -> str:
        state = "dropped" if self.dropped else "stalled" if self.stalled else "up"
        return f"<MemoryLink {self.client_end!r} -> {self.gateway} {state}>"

    @property
    def open(self) -> bool:
        """Neither reset nor closed at both ends."""
        return not self.dropped and not (
            self.client_end.closed and self.server_end.closed
        )

    def peer_of(self, end: MemoryLinkEnd) -> MemoryLinkEnd:
        return self.server_end if end is self.client_end else self.client_end

    def drop(self) -> None:
        """Reset the link: every read and write at both ends fails now."""
        self.dropped = True
        for direction in self._directions:
            direction.lot.unpark_all()
            direction.space.unpark_all()

    def stall(self) -> None:
        """Hold every byte both ways (until `resume`): neither end notices."""
        self.stalled = True

    def resume(self) -> None:
        """Deliver what was held, and carry bytes again."""
        self.stalled = False
        for direction in self._directions:
            direction.release()
            direction.space.unpark_all()


@attrs.define
class _Served:
    server: GatewayServer
    nursery: trio.Nursery


class MemoryGateways:
    """Gateways by name, reached over `MemoryLink` streams (see the module
    docstring)."""

    def __init__(self, *, buffer: int = 65536) -> None:
        self.buffer = buffer
        """Bytes on their way each way on a link before writes wait."""
        self._served: dict[str, _Served] = {}
        self._links: list[MemoryLink] = []
        self._numbers = 0
        self._turn = 0

    def served(self) -> list[str]:
        """The names of the gateways served now, sorted."""
        return sorted(self._served)

    def server(self, name: str) -> GatewayServer:
        """The `GatewayServer` served as ``name``.

        Raises:
            KeyError: no gateway of that name is served now.
        """
        return self._served[name].server

    def links(self, gateway: str | None = None) -> list[MemoryLink]:
        """The open links (to ``gateway``, or to any)."""
        self._links = [link for link in self._links if link.open]
        return [
            link for link in self._links if gateway is None or link.gateway == gateway
        ]

    async def serve(
        self,
        name: str,
        runner: Runner,
        gateway: Gateway,
        *,
        task_status: trio.TaskStatus[GatewayServer] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Serve ``gateway`` for ``runner`` as ``name`` until cancelled;
        ``started`` gets its `GatewayServer`.

        Raises:
            ValueError: a gateway of that name is served already (before
                ``started``).
            ConfigError, EntityDefinitionError: as `serve_gateway`.

        Cancellation: every link to it is reset and its work cancelled (no
        close frames: `GatewayServer.aclose` first for a graceful end).
        """
        if name in self._served:
            raise ValueError(f"a gateway named {name!r} is served already")
        server = GatewayServer(
            runner, gateway, resolve_routes(runner, gateway), name, 80
        )
        try:
            async with trio.open_nursery() as nursery:
                server.start_background(nursery)
                self._served[name] = _Served(server, nursery)
                task_status.started(server)
                try:
                    await trio.sleep_forever()
                finally:
                    del self._served[name]
                    for link in self.links(name):
                        link.drop()
        finally:
            self._served.pop(name, None)

    async def connect(self, client: str, gateway: str) -> MemoryLinkEnd:
        """Open a link from ``client`` to the gateway named ``gateway``; its
        client end.

        Raises:
            OSError: no gateway of that name is served (connection refused).
        """
        await trio.lowlevel.checkpoint()
        served = self._served.get(gateway)
        if served is None:
            raise OSError(errno.ECONNREFUSED, f"no gateway at {gateway}")
        self._numbers += 1
        link = MemoryLink(client, self._numbers, gateway, buffer=self.buffer)
        try:
            served.nursery.start_soon(served.server.handle_stream, link.server_end)
        except RuntimeError:  # it is stopping
            raise OSError(errno.ECONNREFUSED, f"{gateway} is stopping") from None
        self._links.append(link)
        return link.client_end

    def connector(
        self,
        client: str = "client",
        *,
        balance: bool = False,
        order: Sequence[str] = (),
    ) -> Callable[[str, int], Awaitable[trio.abc.Stream]]:
        """A ``connect`` hook for `open_gateway_client`: links from
        ``client`` (its address for the gateway: connect rates are counted
        per client) to the gateway the URL's host names; with ``balance``,
        to the gateways served, each in turn whatever the host (a load
        balancer in front of them); with ``order``, to the first of those
        gateways served (a client that knows several)."""

        async def connect(host: str, port: int) -> trio.abc.Stream:
            name = host
            if order:
                name = next((n for n in order if n in self._served), order[0])
            elif balance and self._served:
                names = self.served()
                self._turn += 1
                name = names[self._turn % len(names)]
            return await self.connect(client, name)

        return connect
