"""The runner: one process's member of a cluster (Trio driver, wiring).

`open_runner` opens a storage session, registers the runner, acquires its
shards and serves their entities until the ``async with`` block ends, then
shuts down gracefully: new calls are refused, running handlers get
``entity_termination_timeout`` to finish, ``on_stop`` hooks run, locks are
released (so successors start at once) and the runner unregisters.
`serve_runner` is the same for ``nursery.start``.

With a transport (``transport=WebSocketTransport()``), runners reach each
other: calls are routed to whichever runner serves the entity (see
`trio_cluster._engine._routing`), persisted requests notify their owner directly, and
a dropped connection makes the runner re-check membership at once.
"""

from __future__ import annotations

import logging
from contextlib import AbstractAsyncContextManager, AsyncExitStack, asynccontextmanager
from typing import TYPE_CHECKING, Any, TypeVar, cast

import attrs
import trio

from ._client import EntityClient
from ._clock import Clock, TrioWallClock
from ._context import current_runner_var, enter_runner, leave_runner, runner_context
from ._core._addresses import EntityAddress
from ._core._config import ShardingConfig
from ._cron import cron_entity, cron_singletons
from ._engine._assembly import assemble
from ._engine._broadcasts import broadcast_codecs
from ._engine._dispatch import HandlerRelay
from ._engine._janitor import janitor
from ._entity import Entity
from ._errors import ConfigError, EntityDefinitionError, EventsUnsupportedError
from ._gc_freeze import freeze_once
from ._groups import unwrap_single as _unwrap_single
from ._operations._dead_letters import DeadLetterQueue
from ._registry import Registry
from ._storage_state import StateStorage
from .serialization._converter import make_converter

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Mapping, Sequence

    import cattrs

    from ._broadcast import Broadcast
    from ._core._addresses import RunnerAddress, ShardId
    from ._core._snowflake import Snowflake
    from ._cron import Cron
    from ._engine._assembly import RunnerParts
    from ._engine._broadcasts import BroadcastCodecs
    from ._listener import RunnerListener
    from ._operations._statistics import RunnerStatistics
    from ._singletons import Singleton
    from ._storage_abc import RunnerInfo, Storage, StorageSession, StorageTransaction
    from ._storage_events import EventStorage
    from ._tracing import Tracer
    from ._transport_abc import Endpoint, Transport

__all__ = ["Runner", "current_runner", "open_runner", "serve_runner"]

log = logging.getLogger("trio_cluster.runner")

E = TypeVar("E", bound=Entity)


def current_runner() -> Runner:
    """The runner whose task (or handler) is calling.

    Raises:
        NoCurrentRunnerError: called outside a runner's tasks and handlers
            (it is also a `RuntimeError`).
    """
    return cast("Runner", runner_context())


class Runner:
    """A running member of the cluster. Made by `open_runner`/`serve_runner`.

    Its engine is built whole by ``trio_cluster._engine._assembly.assemble``
    when it is constructed; it holds nothing else but its clients.
    """

    def __init__(
        self,
        *,
        config: ShardingConfig,
        registry: Registry,
        clock: Clock,
        session: StorageSession,
        singletons: Sequence[Singleton],
        broadcasts: BroadcastCodecs,
        listeners: Sequence[RunnerListener],
        scope: trio.CancelScope,
        endpoint: Endpoint | None = None,
        relay: HandlerRelay | None = None,
        tracer: Tracer | None = None,
    ) -> None:
        self.config = config
        self.clock = clock
        self._registry = registry
        self._scope = scope
        self._parts: RunnerParts = assemble(
            config=config,
            registry=registry,
            session=session,
            clock=clock,
            singletons=singletons,
            broadcasts=broadcasts,
            listeners=listeners,
            context=self,
            endpoint=endpoint,
            relay=relay,
            tracer=tracer,
        )
        self._clients: dict[type[Entity], EntityClient[Any]] = {}
        self._events = session.events
        messages = session.messages
        self._states = messages if isinstance(messages, StateStorage) else None
        self.dead_letters = DeadLetterQueue(
            session.messages, new_id=lambda: int(self.new_id()), clock=clock
        )
        """The cluster's dead letters: list, replay, purge (see
        `DeadLetterQueue`; ``trio-cluster dlq`` on the command line)."""

    @property
    def address(self) -> RunnerAddress:
        """The address other runners reach this one at."""
        return self.config.runner_address

    @property
    def converter(self) -> cattrs.Converter:
        """The converter messages and replies are encoded with."""
        return self._registry.converter

    @property
    def machine_id(self) -> int | None:
        """This runner's Snowflake machine id (None until it registered, and
        again once it shut down)."""
        return self._parts.sharding.table.machine_id

    def served_shards(self) -> Mapping[ShardId, int]:
        """The shards this runner serves now, with their lease epochs (a
        fresh mapping: shards that are stopping are not in it)."""
        return self._parts.sharding.table.active_epochs()

    def live_runners(self) -> Sequence[RunnerInfo]:
        """The live runners of the cluster, as of the last membership poll."""
        return tuple(self._parts.sharding.table.live)

    def assignment(self) -> Mapping[ShardId, RunnerAddress]:
        """Which runner each shard is assigned to, as of the last poll (a
        shard may still be moving: see `served_shards` for what this runner
        serves)."""
        return dict(self._parts.sharding.table.assignment)

    # ------------------------------------------------------------------
    # Ids and ownership

    def new_id(self) -> Snowflake:
        """A new cluster-wide unique id: 64-bit, time-ordered (see
        `Snowflake`). It comes from the generator the runtime makes
        persisted request ids with, so it never equals one of them, nor an
        id any other live runner makes; ids from one runner only grow.

        Raises:
            RunnerClosedError: the runner shut down (its machine id may be
                another runner's by now).
        """
        return self._parts.views.new_id()

    def owner_of(self, target: EntityAddress | Entity) -> RunnerAddress | None:
        """The runner the entity's shard is assigned to, as of the last
        membership poll: where calls to it go. None if no live runner hosts
        the shard's group. The shard may still be moving (the new owner
        waiting for the old one to let go): `is_local` tells whether this
        runner serves it now.

        Args:
            target: an `EntityAddress`, or anything with an ``address``: a
                client handle (``runner.client(Account)("alice")``) or an
                entity (``self`` in a handler).
        """
        return self._parts.views.owner_of(_address_of(target))

    def is_local(self, target: EntityAddress | Entity) -> bool:
        """Whether this runner serves the entity's shard now (calls to it
        run here). ``target`` as for `owner_of`."""
        return self._parts.views.is_local(_address_of(target))

    def client(self, cls: type[E]) -> EntityClient[E]:
        """A client for entities of ``cls``: ``runner.client(Account)("alice")``.

        The class need not be hosted by this runner (only its ``type_name``,
        ``shard_group`` and handlers are used to send).

        Raises:
            EntityDefinitionError: ``cls`` is not a valid entity class.
        """
        existing = self._clients.get(cls)
        if existing is None:
            existing = self._clients[cls] = EntityClient(
                self._parts.router, self._registry.for_class(cls), self.config
            )
        return existing

    async def broadcast(self, name: str, message: Any) -> int:
        """Run the broadcast handler ``name`` with ``message`` on every live
        runner, this one included, at most once each.

        Returns:
            How many runners it was handed to (a runner that is unreachable,
            or dies before it runs the handler, misses it).

        Raises:
            EntityDefinitionError: no broadcast of that name is declared here.
            MalformedMessageError: the message cannot be encoded.
            RunnerClosedError: the runner is shut down.
        """
        self._parts.router.check_open()
        # For this task's log records (the local handler's task starts in the
        # runner's base context, whoever broadcasts).
        token = enter_runner(self)
        try:
            return await self._parts.broadcasts.send(name, message)
        finally:
            leave_runner(token)

    @property
    def event_storage(self) -> EventStorage:
        """The storage session's durable event log, which
        ``trio_cluster.events`` publishes to and consumes from.

        Raises:
            EventsUnsupportedError: the storage backend has none.
        """
        if self._events is None:
            raise EventsUnsupportedError(
                "this runner's storage has no durable event log"
                " (StorageSession.events is None)"
            )
        return self._events

    @property
    def state_storage(self) -> StateStorage:
        """The storage session's durable entity state (`StateStorage`): the
        snapshots of ``durable`` state, workflows' journals among them, to
        list and count by label (``trio-cluster workflows`` reads it).

        Raises:
            ConfigError: the storage backend keeps no durable state.
        """
        if self._states is None:
            raise ConfigError(
                "this runner's storage keeps no durable entity state"
                " (its session's messages are no StateStorage)"
            )
        return self._states

    def transaction(self) -> AbstractAsyncContextManager[StorageTransaction]:
        """Open a storage transaction for application code: the outbox.

        Inside the block, ``trio_cluster.current_transaction()`` is this
        transaction (run your SQL through its ``execute``), and persisted
        messages sent with ``.discard(...)`` are saved in it: they exist, and
        are delivered, once it commits, and never if it rolls back. It
        commits when the block exits normally and rolls back on an
        exception or cancellation, which propagates. A persisted call that
        waits for its reply raises `CallInTransactionError` inside it;
        volatile messages are sent at once, not in the transaction.

        Raises:
            PersistenceError: the transaction could not be opened, or its
                commit failed (nothing of it took effect); or this storage
                has no transactions of SQL (`MemoryStorage`: ``execute``
                raises, the outbox works).
        """
        return self._parts.persisted.transaction()

    def statistics(self) -> RunnerStatistics:
        """A snapshot of this runner's state and counters."""
        return self._parts.statistics()

    async def wait_shards_acquired(self) -> None:
        """Wait until this runner serves every shard assigned to it."""
        sharding = self._parts.sharding
        while not sharding.serves_all_assigned():
            await sharding.table.wait_changed(trio.current_time() + 1.0)
        await trio.lowlevel.checkpoint()

    def abort(self) -> None:
        """Stop at once, as if the process were killed: every handler is
        cancelled now, with no termination timeout, no ``on_stop`` hook and
        no lock released (the cluster takes the shards over when the leases
        lapse), and the runner takes no more calls (`RunnerClosedError`).
        For tests of what a crash does; the ``async with`` block of
        `open_runner` goes on until it ends.
        """
        self._parts.abort()
        self._scope.shield = False
        self._scope.cancel()

    async def _shutdown(self) -> None:
        await self._parts.shutdown()


def _address_of(target: EntityAddress | Entity) -> EntityAddress:
    return target if isinstance(target, EntityAddress) else target.address


def _registry(
    *,
    entities: Sequence[type[Entity]],
    config: ShardingConfig,
    converter: cattrs.Converter | None,
    cron_class: type[Entity] | None,
) -> Registry:
    """The entity types a runner hosts: ``entities``, and its crons' entity."""
    classes = list(entities)
    if cron_class is not None:
        classes.append(cron_class)
    return Registry(classes, config=config, converter=converter or make_converter())


@asynccontextmanager
async def open_runner(
    *,
    entities: Sequence[type[Entity]] = (),
    config: ShardingConfig | None = None,
    storage: Storage | None = None,
    transport: Transport | None = None,
    singletons: Sequence[Singleton] = (),
    crons: Sequence[Cron] = (),
    broadcasts: Sequence[Broadcast] = (),
    converter: cattrs.Converter | None = None,
    clock: Clock | None = None,
    listeners: Sequence[RunnerListener] = (),
    tracer: Tracer | None = None,
) -> AsyncIterator[Runner]:
    """Open a runner that serves ``entities`` until the block ends.

    Args:
        entities: entity classes this runner hosts (validated eagerly).
        config: policies; `ShardingConfig()` by default.
        storage: a storage backend; a private `MemoryStorage` by default
            (persisted messages then live only as long as the process).
        transport: how runners reach each other (e.g. ``WebSocketTransport()``
            from `trio_cluster.transport`); without one, this runner only calls
            entities it serves itself. It listens at ``config.runner_address``
            (port 0: a free port; ``runner.address`` tells which).
        singletons: tasks that run on exactly one runner of the cluster.
        crons: persisted schedules, run once per instant cluster-wide.
        broadcasts: broadcasts this runner handles (see `Runner.broadcast`).
        converter: from `trio_cluster.serialization.make_converter`, with your
            own hooks registered; a fresh one by default.
        clock: wall clock for persisted times; `TrioWallClock` by default.
        listeners: `RunnerListener` objects told of the runner's lifecycle
            events (shards acquired and stopped, handlers started and
            finished; see `trio_cluster.abc.RunnerListener`).
        tracer: makes a span per call on the caller's side and on the
            owner's, and carries the trace context in the call metadata
            (see `trio_cluster.abc.Tracer`;
            `trio_cluster.contrib.opentelemetry.OpenTelemetryTracer` is
            ready-made). None: no tracing, at no cost.

    Raises:
        EntityDefinitionError: an entity class or singleton is invalid (before
            anything starts).
        PersistenceError: storage failed while starting.
        RunnerUnavailableError: the transport cannot listen.

    On exit (normal, error or cancellation) the runner shuts down gracefully,
    shielded from cancellation and bounded by ``entity_termination_timeout``
    (plus storage deadlines). A single exception from the block propagates as
    itself, not wrapped in an exception group.
    """
    from .storage._memory._storage import MemoryStorage

    config = config if config is not None else ShardingConfig()
    wall_clock = clock if clock is not None else TrioWallClock()
    cron_class = cron_entity(crons) if crons else None
    registry = _registry(
        entities=entities, config=config, converter=converter, cron_class=cron_class
    )
    _check_singletons(singletons)
    codecs = broadcast_codecs(broadcasts, registry.converter)
    stop = trio.Event()
    if config.freeze_gc_at_start:
        freeze_once()

    async def serve_system(*, task_status: trio.TaskStatus[Runner]) -> None:
        # The runner's own tasks (transport, storage session, shards,
        # entities) run here, shielded once started: cancelling the caller's
        # scope must not cut the transport or storage while the runner
        # drains. `stop` starts the (bounded) graceful shutdown instead.
        nonlocal config
        assert config is not None
        with trio.CancelScope() as system_scope:
            async with AsyncExitStack() as stack:
                endpoint: Endpoint | None = None
                relay = None
                if transport is not None:
                    relay = HandlerRelay()
                    endpoint = await stack.enter_async_context(
                        transport.open_endpoint(config.runner_address, relay)
                    )
                    config = attrs.evolve(config, runner_address=endpoint.address)
                backend = storage if storage is not None else MemoryStorage()
                session = await stack.enter_async_context(
                    backend.open_session(
                        name=str(config.runner_address),
                        lease_duration=config.lease_duration,
                    )
                )
                runner = Runner(
                    config=config,
                    registry=registry,
                    clock=wall_clock,
                    session=session,
                    singletons=[
                        *singletons,
                        *(
                            cron_singletons(crons, cron_class)
                            if cron_class is not None
                            else ()
                        ),
                        janitor(session.messages, config, wall_clock, session.events),
                    ],
                    broadcasts=codecs,
                    listeners=listeners,
                    scope=system_scope,
                    endpoint=endpoint,
                    relay=relay,
                    tracer=tracer,
                )
                current_runner_var.set(runner)  # this task's own context
                async with trio.open_nursery() as nursery:
                    await nursery.start(runner._parts.serve)
                    system_scope.shield = True
                    runner._parts.listeners.runner_started()
                    task_status.started(runner)
                    await stop.wait()
                    await runner._shutdown()
                    nursery.cancel_scope.cancel()

    async with _unwrap_single(), trio.open_nursery() as outer:
        runner: Runner = await outer.start(serve_system)
        token = current_runner_var.set(runner)
        try:
            yield runner
        finally:
            current_runner_var.reset(token)
            stop.set()


async def serve_runner(
    entities: Sequence[type[Entity]] = (),
    config: ShardingConfig | None = None,
    storage: Storage | None = None,
    transport: Transport | None = None,
    *,
    singletons: Sequence[Singleton] = (),
    crons: Sequence[Cron] = (),
    broadcasts: Sequence[Broadcast] = (),
    converter: cattrs.Converter | None = None,
    clock: Clock | None = None,
    listeners: Sequence[RunnerListener] = (),
    tracer: Tracer | None = None,
    task_status: trio.TaskStatus[Runner] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run a runner until cancelled::

        runner = await nursery.start(serve_runner, [Account], config, storage, transport)

    Takes the same arguments as `open_runner` (the first four may be given
    positionally, as ``nursery.start`` passes no keywords; use
    ``functools.partial`` for the others). ``started`` is called with the
    `Runner` once it is registered and serving. An error before that is
    raised from ``nursery.start``. Cancelling the enclosing scope shuts the
    runner down gracefully (bounded, as for `open_runner`).
    """
    async with open_runner(
        entities=entities,
        config=config,
        storage=storage,
        transport=transport,
        singletons=singletons,
        crons=crons,
        broadcasts=broadcasts,
        converter=converter,
        clock=clock,
        listeners=listeners,
        tracer=tracer,
    ) as runner:
        task_status.started(runner)
        await trio.sleep_forever()


def _check_singletons(singletons: Sequence[Singleton]) -> None:
    # The event bus's consumers (`trio_cluster.events.Subscription.consumers`)
    # are the one kind of reserved name users pass in themselves.
    reserved = [
        s.name
        for s in singletons
        if s.name.startswith("trio_cluster.")
        and not s.name.startswith("trio_cluster.events.")
    ]
    if reserved:
        raise EntityDefinitionError(
            f"singleton names starting with 'trio_cluster.' are reserved: {reserved}"
        )
    names = [singleton.name for singleton in singletons]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise EntityDefinitionError(
            f"singleton names must be unique; repeated: {duplicates}"
        )
