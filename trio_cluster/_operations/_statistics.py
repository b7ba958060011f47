"""`RunnerStatistics`: a snapshot of a runner's state and counters (Trio driver).

Collecting walks the served shards and their entities (linear in resident
entities), so call it for monitoring, not per message.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import attrs

from .._transport_abc import EndpointStatistics

if TYPE_CHECKING:
    from .._core._addresses import RunnerAddress
    from .._core._histogram import Histogram
    from .._engine._manager import EntityManager
    from .._engine._persisted import PersistedDelivery
    from .._engine._routing import Router
    from .._engine._sharding import Sharding
    from .._engine._singletons import SingletonSupervisor
    from .._transport_abc import Endpoint

__all__ = ["LatencySnapshot", "RunnerStatistics", "collect_statistics"]


@attrs.frozen
class LatencySnapshot:
    """A latency histogram at one instant (seconds)."""

    buckets: tuple[tuple[float, int], ...]
    """``(upper bound, calls at or under it)``, cumulative, ending at ``inf``."""
    total: float
    """Sum of all observed latencies."""
    count: int
    """Number of observed calls."""

    @classmethod
    def of(cls, histogram: Histogram) -> LatencySnapshot:
        return cls(tuple(histogram.cumulative()), histogram.total, histogram.count)


@attrs.frozen
class RunnerStatistics:
    """State and counters of one runner at one instant."""

    address: str
    """The runner's address."""
    shards: int
    """Shards served now."""
    shards_assigned: int
    """Shards the assignment gives this runner (served or being acquired)."""
    runners: int
    """Live runners in the cluster, as of the last membership poll."""
    entities: int
    """Entities in memory (active, idle, or waiting to restart)."""
    entities_by_type: dict[str, int]
    """Entities in memory, per entity type."""
    idle_entities: int
    """Entities in memory with nothing to do (candidates for passivation)."""
    running_handlers: int
    """Handlers running now (inline, detached and streams)."""
    queued_messages: int
    """Messages waiting in mailboxes."""
    max_mailbox_depth: int
    """Deepest mailbox (running + queued) of any entity."""
    messages_handled: int
    """Handlers completed since start (with a value or an error)."""
    entity_crashes: int
    """Undeclared exceptions that restarted an entity, since start."""
    persisted_in_flight: int
    """Persisted requests claimed and held in memory now."""
    persisted_delivered: int
    """Persisted requests handed to entities since start."""
    storage_claims: int
    """Claim statements issued by the storage read loop since start."""
    save_batches: int
    """Group-commit batches of saved requests since start."""
    reply_batches: int
    """Group-commit batches of recorded replies since start."""
    waiting_callers: int
    """Callers in this process waiting for a persisted reply."""
    singletons_running: int
    """Singletons running on this runner now."""
    failovers: int
    """Shards stopped because their lock or lease was lost, since start."""
    remote_calls: int
    """Volatile calls this runner sent to another runner, since start."""
    call_latency: dict[str, LatencySnapshot]
    """Caller-observed rpc latency made here, keyed ``volatile``/``persisted``."""
    transport: EndpointStatistics | None = None
    """The transport endpoint's traffic (frames, envelopes, bytes, connects),
    if the runner has a transport that keeps counters."""


def collect_statistics(
    *,
    address: RunnerAddress,
    manager: EntityManager,
    sharding: Sharding,
    persisted: PersistedDelivery,
    router: Router,
    supervisor: SingletonSupervisor,
    endpoint: Endpoint | None,
) -> RunnerStatistics:
    """A snapshot of the runner made of these parts."""
    by_type: dict[str, int] = {}
    queued = 0
    deepest = 0
    running = 0
    entities = 0
    for host in sharding.table.hosts.values():
        running += host.running
        for slot in host.slots.values():
            entities += 1
            name = slot.entity_type.name
            by_type[name] = by_type.get(name, 0) + 1
            queued += slot.queued
            deepest = max(deepest, slot.depth)
    stats = persisted.statistics
    return RunnerStatistics(
        address=str(address),
        shards=len(sharding.table.hosts),
        shards_assigned=len(sharding.ownership.assigned),
        runners=len(sharding.table.live),
        entities=entities,
        entities_by_type=by_type,
        idle_entities=len(manager.idle),
        running_handlers=running,
        queued_messages=queued,
        max_mailbox_depth=deepest,
        messages_handled=manager.messages_handled,
        entity_crashes=manager.crashes,
        persisted_in_flight=len(manager.persisted_jobs),
        persisted_delivered=persisted.delivered,
        storage_claims=stats["claims"],
        save_batches=stats["save_batches"],
        reply_batches=stats["reply_batches"],
        waiting_callers=stats["waiting_callers"],
        singletons_running=len(supervisor.running),
        failovers=sharding.failovers,
        remote_calls=router.remote_calls,
        call_latency={
            kind: LatencySnapshot.of(histogram)
            for kind, histogram in router.latency.items()
        },
        transport=None if endpoint is None else endpoint.statistics(),
    )
