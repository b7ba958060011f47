"""The fault-injecting edges of simulated runners (test support, Trio).

A simulated runner talks to the world only through its storage session and
its transport endpoint, so that is where faults are injected:

* `StorageFaults` is the `MemoryStorage.fault_hook` of a simulated cluster.
  For a *frozen* runner it holds every storage call until the runner thaws
  (the call then goes through, late: that is how a frozen runner's stale
  writes reach storage and get fenced); for a runner cut off from storage it
  fails every call at once, or makes it hang until the outage ends and then
  go through (late, like packets of a partition that heals), unless its
  caller gave up first.
* `HoldingTransport` wraps a `MemoryTransport`: while its runner is frozen,
  envelopes it sends and envelopes it receives are held, in order, and let
  through when it thaws (partitions, drops, delays and duplicates are the
  `MemoryNetwork`'s own business).

`RunnerFaults` is the fault state of one runner, shared by both.
"""

from __future__ import annotations

from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import TYPE_CHECKING, Any

import attrs
import trio

from trio_cluster import RunnerUnavailableError

# NOTE: the simulator's only engine import: envelopes are named in the trace
# by their wire kind, which has no public home yet.
from trio_cluster._engine._wire import Kind
from trio_cluster.abc import Endpoint, EndpointHandler, Transport

from ._trace import SimulationTrace

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from trio_cluster import RunnerAddress
    from trio_cluster.abc import Envelope
    from trio_cluster.storage import MemoryStorage


__all__ = ["HoldingTransport", "RunnerFaults", "StorageFaults"]


class SimulatedOutageError(OSError):
    """What a storage call fails with during a simulated outage."""


class RunnerFaults:
    """The storage and transport faults currently affecting one runner (or,
    for `StorageFaults.everyone`, every runner)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.frozen = 0
        """Freezes in force (nested freezes thaw with the last one)."""
        self.thawed = trio.Event()
        self.thawed.set()
        self.outages = 0
        """Storage outages in force."""
        self.hanging = 0
        """Of those, outages that hang calls rather than fail them."""
        self.restored = trio.Event()
        self.restored.set()
        self.held_out: list[tuple[RunnerAddress, Envelope]] = []
        self.held_in: list[tuple[RunnerAddress, Envelope | None, str]] = []
        self.endpoint: HoldingEndpoint | None = None

    @property
    def active(self) -> bool:
        return bool(self.frozen or self.outages)

    def freeze(self) -> None:
        if not self.frozen:
            self.thawed = trio.Event()
        self.frozen += 1

    def thaw(self, *, drop: bool = False) -> int:
        """Undo one freeze; on the last, let held I/O through (or drop it).
        Returns how many held envelopes were let through or dropped."""
        if not self.frozen:
            return 0
        self.frozen -= 1
        if self.frozen:
            return 0
        self.thawed.set()
        held_out, self.held_out = self.held_out, []
        held_in, self.held_in = self.held_in, []
        endpoint = self.endpoint
        if drop or endpoint is None:
            return len(held_out) + len(held_in)
        for peer, envelope in held_out:
            endpoint.send_late(peer, envelope)
        for peer, received, reason in held_in:
            if received is None:
                endpoint.handler.inner.peer_lost(peer, reason)
            else:
                endpoint.handler.inner.envelope_received(peer, received)
        return len(held_out) + len(held_in)

    def start_outage(self, *, hang: bool) -> None:
        if not self.outages:
            self.restored = trio.Event()
        self.outages += 1
        self.hanging += hang

    def end_outage(self, *, hang: bool) -> None:
        if not self.outages:
            return
        self.outages -= 1
        self.hanging -= hang
        if not self.outages:
            self.restored.set()

    def clear(self) -> None:
        """End every fault (thaw for good, end every outage)."""
        while self.frozen:
            self.thaw()
        while self.outages:
            self.end_outage(hang=self.hanging > 0)


class StorageFaults:
    """The fault hook of a simulated cluster's `MemoryStorage`.

    Args:
        storage: the storage; its ``fault_hook`` is set while any fault is
            in force (and left None otherwise, which costs nothing).
    """

    def __init__(self, storage: MemoryStorage) -> None:
        self._storage = storage
        self.sessions: dict[str, RunnerFaults] = {}
        """Fault state by storage session name (the runner's address)."""
        self.everyone = RunnerFaults("every runner")

    def update(self) -> None:
        """Install or remove the hook, after a fault started or ended."""
        active = self.everyone.active or any(
            faults.active for faults in self.sessions.values()
        )
        self._storage.fault_hook = self.hook if active else None

    async def hook(self, session: str, operation: str) -> None:
        faults = self.sessions.get(session)
        if faults is not None and faults.frozen:
            await faults.thawed.wait()
        for scope in (faults, self.everyone):
            if scope is not None and scope.outages:
                if not scope.hanging:
                    raise SimulatedOutageError(
                        f"simulated storage outage ({operation} by {session})"
                    )
                # Like a partition that heals: the call arrives late.
                await scope.restored.wait()


@attrs.define(eq=False)
class HoldingTransport(Transport):
    """A `Transport` that holds its runner's envelopes while it is frozen.

    Args:
        inner: the transport that really carries envelopes.
        faults: the runner's fault state.
        trace: if given, every envelope sent and held is recorded in it.
    """

    _inner: Transport
    _faults: RunnerFaults
    _trace: SimulationTrace | None

    def open_endpoint(
        self, address: RunnerAddress, handler: EndpointHandler
    ) -> AbstractAsyncContextManager[Endpoint]:
        return self._open(address, handler)

    @asynccontextmanager
    async def _open(
        self, address: RunnerAddress, handler: EndpointHandler
    ) -> AsyncIterator[Endpoint]:
        holding = _HoldingHandler(handler, self._faults)
        async with self._inner.open_endpoint(address, holding) as endpoint:
            wrapped = HoldingEndpoint(endpoint, holding, self._faults, self._trace)
            self._faults.endpoint = wrapped
            try:
                yield wrapped
            finally:
                if self._faults.endpoint is wrapped:
                    self._faults.endpoint = None


@attrs.define(eq=False)
class _HoldingHandler(EndpointHandler):
    inner: EndpointHandler
    _faults: RunnerFaults

    def envelope_received(self, peer: RunnerAddress, envelope: Envelope) -> None:
        if self._faults.frozen:
            self._faults.held_in.append((peer, envelope, ""))
        else:
            self.inner.envelope_received(peer, envelope)

    def peer_lost(self, peer: RunnerAddress, reason: str) -> None:
        if self._faults.frozen:
            self._faults.held_in.append((peer, None, reason))
        else:
            self.inner.peer_lost(peer, reason)


@attrs.define(eq=False)
class HoldingEndpoint(Endpoint):
    """The endpoint a simulated runner sees (see `HoldingTransport`)."""

    inner: Endpoint
    handler: _HoldingHandler
    _faults: RunnerFaults
    _trace: SimulationTrace | None

    @property
    def address(self) -> RunnerAddress:
        return self.inner.address

    def is_connected(self, peer: RunnerAddress) -> bool:
        return self.inner.is_connected(peer)

    def send_nowait(self, peer: RunnerAddress, envelope: Envelope) -> None:
        if self._faults.frozen:
            # A frozen process's writes sit in its socket buffer: nothing
            # fails now, they leave when it thaws.
            self._faults.held_out.append((peer, envelope))
            if self._trace is not None:
                self._trace.record(
                    "frame", "%s held %s for %s", self.address, _kind(envelope), peer
                )
            return
        if self._trace is not None:
            self._trace.record(
                "frame", "%s -> %s %s", self.address, peer, _kind(envelope)
            )
        self.inner.send_nowait(peer, envelope)

    def send_late(self, peer: RunnerAddress, envelope: Envelope) -> None:
        """Send an envelope held during a freeze. If the peer cannot be
        reached now, the runner hears ``peer_lost``, as from a real
        transport whose connection (or dial) fails after the fact: the
        sender learned nothing when it queued the envelope, so a call or
        stream waiting for an answer would otherwise wait forever (found
        by the gateway's topic property: a stream opened towards a
        partitioned peer while its runner was frozen)."""
        try:
            self.send_nowait(peer, envelope)
        except (RunnerUnavailableError, trio.ClosedResourceError) as exc:
            if self._trace is not None:
                self._trace.record(
                    "frame",
                    "%s dropped held %s for %s: %s",
                    self.address,
                    _kind(envelope),
                    peer,
                    type(exc).__name__,
                )
            if isinstance(exc, RunnerUnavailableError):
                self.handler.inner.peer_lost(peer, "unreachable after a freeze")


def _kind(envelope: list[Any]) -> str:
    head = envelope[0] if envelope else None
    if not isinstance(head, int) or head not in Kind._value2member_map_:
        return f"kind {head!r}"
    name = Kind(head).name
    if name in ("REQUEST", "REPLY", "NOT_DELIVERED", "INTERRUPT") and len(envelope) > 1:
        return f"{name} #{envelope[1]}"
    return name
