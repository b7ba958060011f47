"""`RunnerStatistics`: a snapshot of a runner's state and counters (Trio driver
data). `RunnerParts.statistics` collects it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import attrs

from .._transport_abc import EndpointStatistics

if TYPE_CHECKING:
    from .._core._histogram import Histogram

__all__ = ["LatencySnapshot", "RunnerStatistics"]


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
    errors_by_type: dict[str, int] = attrs.field(factory=dict)
    """Errors raised to callers on this runner (calls, sends, streams) since
    start, by type: the library's own errors by class name (a subclass under
    its public parent's: `StorageRefusedError` as ``PersistenceError``), the
    handlers' declared errors as ``declared``, anything else as ``other``.
    Types never raised are absent."""
    redeliveries: int = 0
    """Persisted requests delivered again since start after an earlier
    delivery did not finish: claimed again after a failover, a restart or a
    moved shard, or put back in the mailbox after a crash of their entity or
    a failed transaction."""
    persisted_retries: int = 0
    """Persisted requests given back for a later attempt after their handler
    failed (see `RetryPolicy`), since start."""
    dead_letters: dict[str, int] = attrs.field(factory=dict)
    """Persisted requests this runner dead-lettered since start, by kind:
    ``exhausted`` (the last allowed attempt failed), ``non_retryable`` (an
    exception the policy names), ``runner_lost`` (claimed beyond its
    attempts: its runners kept stopping during it)."""
    runners_healthy: int = 0
    """Live runners (as of the last membership poll) this runner can reach
    now: itself, and each peer the transport has not reported lost since it
    was last connected. Without a transport, itself only."""
    ready: bool = False
    """What ``/readyz`` answers: the runner takes calls, its storage session
    is up, its transport listens and it serves every shard assigned to it
    (a client-only runner has none to wait for)."""
    not_ready_reason: str | None = None
    """Why it is not `ready` (None when it is)."""
