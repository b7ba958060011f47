"""`MemoryNetwork`: where memory endpoints find each other, and where faults
are injected (edge adapter, test support).

The network knows which `MemoryEndpoint` listens at which address, which
pairs of addresses are cut off from each other, and the fault hook that
decides the fate of each frame. It never runs a task and never reads the
clock or a random source of its own: everything it does happens
synchronously, inside the call that asks for it, so a simulation that seeds
its randomness (`RandomFaults`) and runs on a ``MockClock`` replays exactly.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .._core._addresses import RunnerAddress
from .._errors import RunnerUnavailableError
from ._faults import FrameFault

if TYPE_CHECKING:
    from ._faults import FaultHook
    from ._memory import MemoryEndpoint

__all__ = ["MemoryNetwork"]

_DELIVER = FrameFault()


class MemoryNetwork:
    """A network of memory endpoints, with fault injection.

    Share one between the `MemoryTransport` of every runner that should see
    the others. Fault injection, for tests and the simulator (each takes
    effect before it returns):

    * `partition` / `heal`: cut and restore the link between two addresses;
    * `kill`: an endpoint disappears at once, as if its process died;
    * `fault`: a fault hook deciding the fate of every frame: dropped,
      duplicated and/or delayed (see `RandomFaults`, seeded, and
      `FrameFault`).

    Deterministic: given the same sequence of calls (and a seeded fault
    hook), the same envelopes arrive at the same (virtual) times, whatever
    else runs in the process.

    Args:
        first_port: where port assignment starts for endpoints opened with
            port 0 (each gets the lowest free port from there, per host).
    """

    def __init__(self, *, first_port: int = 20000) -> None:
        self.fault: FaultHook | None = None
        """Called for every frame as ``fault(sender, receiver)``; returns a
        `FrameFault` (or None to deliver normally). None: no faults. May be
        replaced at any time; it applies to the frames written after."""
        self._endpoints: dict[RunnerAddress, MemoryEndpoint] = {}
        self._partitions: set[frozenset[RunnerAddress]] = set()
        self._first_port = first_port

    def partition(self, a: RunnerAddress, b: RunnerAddress) -> None:
        """Cut the link between ``a`` and ``b`` until `heal`.

        A connection between them drops now, and both sides report
        ``peer_lost`` (reason ``"network partition"``) before this returns;
        until healed, ``send_nowait`` between them raises
        `RunnerUnavailableError`. Idempotent; either address may be one where
        no endpoint is open (yet).
        """
        self._partitions.add(frozenset((a, b)))
        endpoint = self._endpoints.get(a)
        if endpoint is not None:
            endpoint.drop_link(b, "network partition")

    def heal(self, a: RunnerAddress, b: RunnerAddress) -> None:
        """Restore the link between ``a`` and ``b`` (no-op if not cut). The
        next ``send_nowait`` between them connects again."""
        self._partitions.discard(frozenset((a, b)))

    def is_partitioned(self, a: RunnerAddress, b: RunnerAddress) -> bool:
        """Whether the link between ``a`` and ``b`` is cut."""
        return frozenset((a, b)) in self._partitions

    def kill(self, address: RunnerAddress) -> None:
        """Make the endpoint at ``address`` vanish as if its process died.

        Its connections drop now; each peer reports ``peer_lost`` (reason
        ``"peer killed"``) before this returns, and frames still in flight
        from it are lost. The killed endpoint's handler is not called any
        more, and its ``send_nowait`` raises `RunnerUnavailableError`. The
        address is free again at once (a restarted runner may open an
        endpoint there while the killed one's block is still open).

        Raises:
            ValueError: no endpoint is open at ``address``.
        """
        endpoint = self._endpoints.pop(address, None)
        if endpoint is None:
            raise ValueError(f"no memory endpoint is open at {address}")
        endpoint.die("peer killed")

    def addresses(self) -> frozenset[RunnerAddress]:
        """The addresses of every open endpoint."""
        return frozenset(self._endpoints)

    # ------------------------------------------------------------------
    # For MemoryEndpoint

    def register(
        self, address: RunnerAddress, endpoint: MemoryEndpoint
    ) -> RunnerAddress:
        """Listen at ``address`` (port 0: the lowest free port from
        ``first_port``); return the address.

        Raises:
            RunnerUnavailableError: another endpoint is open there.
        """
        if address.port == 0:
            port = self._first_port
            while RunnerAddress(address.host, port) in self._endpoints:
                port += 1
            address = RunnerAddress(address.host, port)
        if address in self._endpoints:
            raise RunnerUnavailableError(
                runner=str(address), detail="cannot listen: address already in use"
            )
        self._endpoints[address] = endpoint
        return address

    def unregister(self, endpoint: MemoryEndpoint) -> None:
        """Stop listening (if ``endpoint`` still holds its address)."""
        if self._endpoints.get(endpoint.address) is endpoint:
            del self._endpoints[endpoint.address]

    def reach(self, local: RunnerAddress, peer: RunnerAddress) -> MemoryEndpoint:
        """The endpoint a connection from ``local`` to ``peer`` would reach.

        Raises:
            RunnerUnavailableError: nothing listens there, or the link is cut.
        """
        remote = self._endpoints.get(peer)
        if remote is None:
            raise RunnerUnavailableError(
                runner=str(peer), detail="connection refused: no endpoint there"
            )
        if self.is_partitioned(local, peer):
            raise RunnerUnavailableError(runner=str(peer), detail="network partition")
        return remote

    def frame_fault(self, sender: RunnerAddress, receiver: RunnerAddress) -> FrameFault:
        """What happens to the next frame from ``sender`` to ``receiver``."""
        hook = self.fault
        fault = None if hook is None else hook(sender, receiver)
        return _DELIVER if fault is None else fault
