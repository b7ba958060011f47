"""The assembly: builds a runner's engine whole, and runs it (Trio driver).

`assemble` is the one place that knows how the parts fit. Each part gets its
collaborators in its constructor, in dependency order:

    listeners, ids, table         (the served shards and the assignment)
    manager                       (runs entities)
    supervisor                    (singletons)
    persisted  <- table, manager, registry, endpoint
    sharding   <- table, manager, listeners, ids, hooks of persisted and
                  supervisor (it writes the table)
    outbound   <- endpoint
    router     <- table, manager, persisted, outbound
    broadcasts <- table, endpoint
    inbound, handler <- all of the above, bound to the endpoint's relay

The parts read the served shards through the `ShardTable`, which sharding
alone writes; the two that react to a shard starting (persisted delivery
claims its backlog, the supervisor starts its singletons) are built first and
handed to sharding as hooks. The only late binding is the transport's: an endpoint
needs its handler before the parts that answer it exist, so it is opened with
a `HandlerRelay` that `assemble` binds once.

`RunnerParts.serve` starts the parts' tasks in the order they need: the
manager's and broadcasts' nurseries, then persisted delivery (listening for
notifications before anyone can send), then sharding (registers the runner
and acquires its first shards).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import attrs
import trio

from .._core._config import ShardingConfig
from .._core._snowflake import SnowflakeGenerator
from .._operations._statistics import LatencySnapshot, RunnerStatistics
from .._transport_abc import Endpoint
from ._broadcasts import Broadcasts
from ._dispatch import ClusterHandler
from ._durable_state import StateKeeper
from ._inbound import InboundCalls
from ._isolation import base_context
from ._listeners import Listeners
from ._manager import EntityManager
from ._persisted import PersistedDelivery
from ._remote import OutboundCalls
from ._routing import Router
from ._shard_table import ShardTable
from ._sharding import Sharding
from ._singletons import SingletonSupervisor
from ._views import ClusterViews

if TYPE_CHECKING:
    from collections.abc import Sequence

    from .._clock import Clock
    from .._context import RunnerContext
    from .._listener import RunnerListener
    from .._registry import Registry
    from .._singletons import Singleton
    from .._storage_abc import StorageSession
    from .._tracing import Tracer
    from ._broadcasts import BroadcastCodecs
    from ._dispatch import HandlerRelay

__all__ = ["RunnerParts", "assemble"]


@attrs.frozen(eq=False)
class RunnerParts:
    """The engine of one runner, built by `assemble`."""

    config: ShardingConfig
    listeners: Listeners
    manager: EntityManager
    supervisor: SingletonSupervisor
    sharding: Sharding
    persisted: PersistedDelivery
    states: StateKeeper
    router: Router
    broadcasts: Broadcasts
    endpoint: Endpoint | None
    views: ClusterViews

    async def serve(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Run every part until cancelled; ``started`` once the runner is
        registered and acted on its first assignment.

        Raises:
            PersistenceError: storage failed before ``started`` (registering,
                or the first assignment).
        """
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(self.manager.run)
                nursery.start_soon(self.states.run)
                await nursery.start(self.broadcasts.run)
                await nursery.start(self.persisted.run)
                await nursery.start(self.sharding.run)
                task_status.started()
        finally:
            # Callers still waiting on other runners get RunnerClosedError
            # (persisted callers get theirs from `PersistedDelivery.run`).
            if self.router.outbound is not None:
                self.router.outbound.close()

    async def shutdown(self) -> None:
        """Refuse new calls, then stop every shard gracefully (bounded by the
        termination timeout), release the locks and unregister. Call it
        shielded."""
        self.router.close()
        self.persisted.begin_shutdown()
        self.listeners.runner_stopping()
        await self.sharding.shutdown()

    def abort(self) -> None:
        """Refuse new calls and cut every handler now (see `Runner.abort`)."""
        self.router.close()
        self.persisted.begin_shutdown()
        self.sharding.abort()

    def statistics(self) -> RunnerStatistics:
        """A snapshot of the runner's state and counters. It walks the served
        shards and their entities (linear in resident entities): call it for
        monitoring, not per message."""
        by_type: dict[str, int] = {}
        queued = 0
        deepest = 0
        running = 0
        entities = 0
        table = self.sharding.table
        for host in table.hosts.values():
            running += host.running
            for slot in host.slots.values():
                entities += 1
                name = slot.entity_type.name
                by_type[name] = by_type.get(name, 0) + 1
                queued += slot.queued
                deepest = max(deepest, slot.depth)
        stats = self.persisted.statistics
        return RunnerStatistics(
            address=str(self.config.runner_address),
            shards=len(table.hosts),
            shards_assigned=len(self.sharding.ownership.assigned),
            runners=len(table.live),
            entities=entities,
            entities_by_type=by_type,
            idle_entities=len(self.manager.idle),
            running_handlers=running,
            queued_messages=queued,
            max_mailbox_depth=deepest,
            messages_handled=self.manager.messages_handled,
            entity_crashes=self.manager.crashes,
            persisted_in_flight=len(self.manager.persisted_jobs),
            persisted_delivered=self.persisted.delivered,
            storage_claims=stats["claims"],
            save_batches=stats["save_batches"],
            reply_batches=stats["reply_batches"],
            waiting_callers=stats["waiting_callers"],
            singletons_running=len(self.supervisor.running),
            failovers=self.sharding.failovers,
            remote_calls=self.router.remote_calls,
            call_latency={
                kind: LatencySnapshot.of(histogram)
                for kind, histogram in self.router.latency.items()
            },
            transport=None if self.endpoint is None else self.endpoint.statistics(),
            **self._cluster_view_statistics(),
        )

    def _cluster_view_statistics(self) -> dict[str, Any]:
        """Errors by type, redeliveries, healthy runners and readiness."""
        not_ready = self.views.not_ready()
        return {
            "errors_by_type": dict(self.router.errors.by_label),
            "redeliveries": self.persisted.redelivered + self.manager.requeued,
            "persisted_retries": self.persisted.statistics["retries"],
            "dead_letters": self.persisted.dead_lettered,
            "runners_healthy": self.views.runners_healthy(),
            "ready": not_ready is None,
            "not_ready_reason": not_ready,
        }


def assemble(
    *,
    config: ShardingConfig,
    registry: Registry,
    session: StorageSession,
    clock: Clock,
    singletons: Sequence[Singleton],
    broadcasts: BroadcastCodecs,
    listeners: Sequence[RunnerListener],
    context: RunnerContext,
    endpoint: Endpoint | None = None,
    relay: HandlerRelay | None = None,
    tracer: Tracer | None = None,
) -> RunnerParts:
    """Build a runner's parts, each whole (see the module docstring).

    Args:
        config: the runner's policies; ``runner_address`` is the address
            peers reach it at (the endpoint's, if it has one).
        registry: the entity types it hosts (and those it calls).
        session: its storage session.
        clock: wall clock for persisted times.
        singletons: every singleton, the runtime's own included.
        broadcasts: the broadcasts it handles (from `broadcast_codecs`).
        listeners: told of its lifecycle events.
        context: what its handlers and tasks see as the current runner.
            Call `assemble` where ``open_runner`` was entered: entity code
            runs in copies of the current context (`_isolation`).
        endpoint: its transport endpoint, if it has one; then ``relay`` is
            the handler the endpoint was opened with.
        tracer: makes a span per call on each side (the router's for the
            caller, the manager's for the owner), if given.

    """
    hub = Listeners(listeners, address=config.runner_address)
    ids = SnowflakeGenerator(0)
    base = base_context(context)
    manager = EntityManager(
        config=config,
        runner_label=str(config.runner_address),
        context=base,
        tracer=tracer,
    )
    supervisor = SingletonSupervisor(singletons, config=config)
    table = ShardTable(config.runner_address)
    persisted = PersistedDelivery(
        storage=session.messages,
        shards=table,
        manager=manager,
        registry=registry,
        config=config,
        clock=clock,
        ids=ids,
        endpoint=endpoint,
    )
    states = StateKeeper(session.messages, clock, registry.types.values())
    sharding = Sharding(
        config=config,
        table=table,
        runners=session.runners,
        manager=manager,
        listeners=hub,
        ids=ids,
        on_shard_started=(
            states.shard_started,
            persisted.shard_started,
            supervisor.shard_started,
        ),
        on_shard_stopped=(persisted.shard_stopped,),
    )
    outbound = None if endpoint is None else OutboundCalls(endpoint)
    router = Router(
        config=config,
        shards=table,
        manager=manager,
        persisted=persisted,
        outbound=outbound,
        context=context,
        tracer=tracer,
    )
    broadcast_set = Broadcasts(
        broadcasts, shards=table, endpoint=endpoint, context=base
    )
    if endpoint is not None:
        assert relay is not None
        assert outbound is not None
        relay.bind(
            ClusterHandler(
                outbound=outbound,
                inbound=InboundCalls(
                    endpoint=endpoint,
                    shards=table,
                    manager=manager,
                    registry=registry,
                    shards_per_group=config.shards_per_group,
                ),
                sharding=sharding,
                persisted=persisted,
                broadcasts=broadcast_set,
                context=context,
            )
        )
    return RunnerParts(
        config=config,
        listeners=hub,
        manager=manager,
        supervisor=supervisor,
        sharding=sharding,
        persisted=persisted,
        states=states,
        router=router,
        broadcasts=broadcast_set,
        endpoint=endpoint,
        views=ClusterViews(
            table=table,
            sharding=sharding,
            router=router,
            ids=ids,
            clock=clock,
            endpoint=endpoint,
        ),
    )
