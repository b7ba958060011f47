"""`ClusterViews`: what a runner tells its users about the cluster (Trio driver).

The runner's public queries that are more than a field read: fresh Snowflake
ids, who owns an entity's shard, whether it is served here, how many runners
are reachable, and whether the runner is ready. Each reads the state the
other parts keep (the `ShardTable`, `Sharding`, the router); none of them
adds any cost to calls.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .._core._snowflake import Snowflake
from .._errors._closed import RunnerClosedError

if TYPE_CHECKING:
    from .._clock import Clock
    from .._core._addresses import EntityAddress, RunnerAddress
    from .._core._snowflake import SnowflakeGenerator
    from .._transport_abc import Endpoint
    from ._routing import Router
    from ._shard_table import ShardTable
    from ._sharding import Sharding

__all__ = ["ClusterViews"]


class ClusterViews:
    """Queries about the cluster, as one runner sees it."""

    def __init__(
        self,
        *,
        table: ShardTable,
        sharding: Sharding,
        router: Router,
        ids: SnowflakeGenerator,
        clock: Clock,
        endpoint: Endpoint | None,
    ) -> None:
        self._table = table
        self._sharding = sharding
        self._router = router
        self._ids = ids
        self._clock = clock
        self._endpoint = endpoint

    def new_id(self) -> Snowflake:
        """A fresh id from the runner's own generator (the one persisted
        request ids come from).

        Raises:
            RunnerClosedError: the runner has no machine id: it shut down (its
                machine id may be another runner's now).
        """
        if self._table.machine_id is None:
            raise RunnerClosedError(
                "the runner is not registered (it shut down): it has no machine"
                " id to make unique ids with"
            )
        return Snowflake(self._ids.next_id(int(self._clock.now() * 1000)))

    def owner_of(self, address: EntityAddress) -> RunnerAddress | None:
        """The runner the assignment gives ``address``'s shard to."""
        return self._table.assignment.get(address.shard)

    def is_local(self, address: EntityAddress) -> bool:
        """Whether this runner serves ``address``'s shard and takes work for
        it now."""
        host = self._table.hosts.get(address.shard)
        return host is not None and host.active

    def runners_healthy(self) -> int:
        """Live runners (as of the last membership poll) this runner can
        reach: itself, and each peer the transport has not reported lost, or
        has connected to again since. Without a transport, itself only."""
        table = self._table
        live = {runner.address for runner in table.live}
        endpoint = self._endpoint
        if endpoint is None:
            return int(table.address in live)
        lost = table.lost_peers
        if lost:
            # Forget the peers that left, or that are connected again.
            lost.difference_update(
                [
                    peer
                    for peer in lost
                    if peer not in live or endpoint.is_connected(peer)
                ]
            )
        return len(live - lost)

    def not_ready(self) -> str | None:
        """Why the runner is not ready, or None if it is: it takes calls, its
        storage session is up, its transport listens (it is open for as long
        as the runner runs) and it serves every shard assigned to it. A
        client-only runner has no shards to wait for."""
        if self._router.closed:
            return "the runner is shutting down"
        if not self._sharding.session_up():
            return "the storage session is down"
        if not self._sharding.serves_all_assigned():
            served = len(self._table.hosts)
            assigned = len(self._sharding.ownership.assigned)
            return f"serving {served} of {assigned} shards"
        return None
