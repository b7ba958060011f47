"""`ShardTable`: what this runner serves and what it knows of the cluster
(Trio driver state).

Sharding writes it; routing, persisted delivery, inbound requests, broadcasts
and the runner's read-only views read it. It holds the served hosts (ACTIVE
only: a host leaves the table the moment it starts stopping), the shard
assignment and the live runners as of the last read of them, an event that
fires when either changes, and the hint that storage announced a change of
the registered runners (`runners_changed`: persisted delivery hears it,
sharding reads them again).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import trio

from ._wire import shard_id

if TYPE_CHECKING:
    from collections.abc import Mapping

    from .._core._addresses import RunnerAddress, ShardId
    from .._storage_abc import RunnerInfo
    from ._slots import ShardHost

__all__ = ["ShardTable"]


class ShardTable:
    """The shards one runner serves, and its view of the assignment."""

    def __init__(self, address: RunnerAddress) -> None:
        self.address = address
        """The address peers reach this runner at."""
        self.hosts: dict[ShardId, ShardHost] = {}
        """Shards served now (ACTIVE hosts only)."""
        self.assignment: Mapping[ShardId, RunnerAddress] = {}
        """Which runner each shard is assigned to, as of the last poll (set
        by `assign`)."""
        self.remote_owners: Mapping[ShardId, RunnerAddress] = {}
        """`assignment` without this runner's shards, keyed by the objects
        of `shard_id` (set by `assign`): a remote call finds its owner with
        one lookup that compares no shard ids and no addresses."""
        self.live: list[RunnerInfo] = []
        """The live runners, as of the last poll."""
        self.machine_id: int | None = None
        """This runner's Snowflake machine id, once registered (None again
        once it shut down)."""
        self.lost_peers: set[RunnerAddress] = set()
        """Peers the transport reported lost (`EndpointHandler.peer_lost`);
        forgotten once a connection to them is up again or they leave the
        live runners (see `ClusterViews.runners_healthy`)."""
        self._changed = trio.Event()
        self._runners_changed = trio.Event()

    def shard_id(self, shard: ShardId) -> ShardId:
        """The one object equal to ``shard`` that the keys of `hosts` and the
        addresses clients make and envelopes name share (`_wire.shard_id`,
        one per process): a dict lookup with the very key object skips
        ``ShardId.__eq__``, a Python call (every call looks its shard
        up)."""
        return shard_id(shard)

    def assign(self, assignment: dict[ShardId, RunnerAddress]) -> None:
        """Take ``assignment`` (a membership poll's) as `assignment`, and
        its shards assigned elsewhere as `remote_owners`."""
        self.assignment = assignment
        self.remote_owners = {
            self.shard_id(shard): owner
            for shard, owner in assignment.items()
            if owner != self.address
        }

    def serve(self, shard: ShardId, host: ShardHost) -> None:
        """Serve ``shard`` with ``host`` from now on (an ACTIVE host)."""
        self.hosts[self.shard_id(shard)] = host

    def host(self, shard: ShardId) -> ShardHost | None:
        """The host serving ``shard`` here, if it is active."""
        return self.hosts.get(shard)

    def serving_epochs(self) -> dict[ShardId, int]:
        """The shards served now, with their epochs."""
        return {shard: host.epoch for shard, host in self.hosts.items()}

    def active_epochs(self) -> dict[ShardId, int]:
        """The shards served now that still take work, with their epochs (a
        host whose lease just lapsed stays in `hosts` until its tasks end)."""
        return {shard: host.epoch for shard, host in self.hosts.items() if host.active}

    def hosts_group(self, group: str) -> bool:
        """Whether any live runner hosts ``group`` (as of the last poll)."""
        return any(group in runner.groups for runner in self.live)

    async def wait_changed(self, deadline: float) -> None:
        """Wait until the served shards or the assignment change, or ``deadline``."""
        with trio.move_on_at(deadline):
            await self._changed.wait()

    def runners_changed(self) -> None:
        """Storage announced that a runner registered or unregistered."""
        self._runners_changed.set()

    async def wait_runners_changed(self) -> None:
        """Wait for the next `runners_changed` (one announced since the last
        return counts). Cancellation-safe."""
        await self._runners_changed.wait()
        self._runners_changed = trio.Event()

    def signal_changed(self) -> None:
        """Wake everyone in `wait_changed`."""
        self._changed.set()
        self._changed = trio.Event()
