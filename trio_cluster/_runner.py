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
from contextlib import AsyncExitStack, asynccontextmanager
from typing import TYPE_CHECKING, Any, TypeVar

import attrs
import trio

from ._broadcast import Broadcast, Broadcasts
from ._client import EntityClient
from ._clock import Clock, TrioWallClock
from ._context import current_runner_var
from ._core._config import ShardingConfig
from ._core._snowflake import SnowflakeGenerator
from ._cron import Cron, CronEntity, cron_singletons
from ._engine._inbound import ClusterHandler, InboundCalls
from ._engine._janitor import janitor
from ._engine._manager import EntityManager
from ._engine._persisted import PersistedDelivery
from ._engine._remote import OutboundCalls
from ._engine._routing import Router, RunnerClosedError
from ._engine._sharding import Sharding
from ._entity import Entity
from ._errors import EntityNotAssignedError
from ._groups import unwrap_single as _unwrap_single
from ._operations._statistics import RunnerStatistics, collect_statistics
from ._registry import Registry
from ._singletons import Singleton, SingletonSupervisor
from .serialization._converter import make_converter

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Sequence

    import cattrs

    from ._core._addresses import EntityAddress, RunnerAddress
    from ._engine._slots import ShardHost
    from ._storage_abc import Storage
    from ._transport_abc import Endpoint, Transport

__all__ = ["Runner", "RunnerClosedError", "open_runner", "serve_runner"]

log = logging.getLogger("trio_cluster.runner")

E = TypeVar("E", bound=Entity)


class Runner:
    """A running member of the cluster. Made by `open_runner`/`serve_runner`."""

    def __init__(
        self,
        *,
        config: ShardingConfig,
        registry: Registry,
        clock: Clock,
        manager: EntityManager,
        sharding: Sharding,
        persisted: PersistedDelivery,
        supervisor: SingletonSupervisor,
        broadcasts: Broadcasts,
        crons: Sequence[Cron] = (),
    ) -> None:
        self.config = config
        self.clock = clock
        self._registry = registry
        self._manager = manager
        self._sharding = sharding
        self._persisted = persisted
        self._supervisor = supervisor
        self._broadcasts = broadcasts
        self._crons = {cron.name: cron for cron in crons}
        self._router = Router(
            runner=self,
            config=config,
            sharding=sharding,
            manager=manager,
            persisted=persisted,
        )
        self._clients: dict[type[Entity], EntityClient[Any]] = {}

    @property
    def address(self) -> RunnerAddress:
        """The address other runners reach this one at."""
        return self.config.runner_address

    @property
    def converter(self) -> cattrs.Converter:
        """The converter messages and replies are encoded with."""
        return self._registry.converter

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
                self._router, self._registry.for_class(cls), self.config
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
        """
        self._router.check_open()
        # The local handler task inherits this context: make it the runner's.
        token = current_runner_var.set(self)
        try:
            return await self._broadcasts.send(self._sharding, name, message)
        finally:
            current_runner_var.reset(token)

    def statistics(self) -> RunnerStatistics:
        """A snapshot of this runner's state and counters."""
        return collect_statistics(self, self._manager, self._sharding, self._persisted)

    async def wait_shards_acquired(self) -> None:
        """Wait until this runner serves every shard assigned to it."""
        while self._sharding.ownership.wanted() or len(self._sharding.hosts) < len(
            self._sharding.ownership.assigned
        ):
            await self._sharding.wait_changed(trio.current_time() + 1.0)
        await trio.lowlevel.checkpoint()

    async def _route_discard(
        self, address: EntityAddress, spec: Any, message: Any
    ) -> None:
        """``self.handler.discard(msg)`` inside an entity."""
        entity_type = self._registry.get(address.entity_type)
        if entity_type is None:  # pragma: no cover - an entity's own type is registered
            raise EntityNotAssignedError(address=str(address))
        await self._router.discard(
            entity_type, address, entity_type.handlers[spec.name], message
        )

    async def _shutdown(self) -> None:
        self._router.closed = True
        self._persisted.closing = True
        await self._sharding.shutdown()


def _build(
    *,
    entities: Sequence[type[Entity]],
    config: ShardingConfig,
    converter: cattrs.Converter | None,
    crons: Sequence[Cron],
) -> Registry:
    classes = list(entities)
    if crons:
        classes.append(CronEntity)
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
    registry = _build(
        entities=entities, config=config, converter=converter, crons=crons
    )
    _check_singletons(singletons)
    broadcast_set = Broadcasts(broadcasts, registry.converter)
    handler = ClusterHandler()
    stop = trio.Event()

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
                if transport is not None:
                    endpoint = await stack.enter_async_context(
                        transport.open_endpoint(config.runner_address, handler)
                    )
                    config = attrs.evolve(config, runner_address=endpoint.address)
                backend = storage if storage is not None else MemoryStorage()
                session = await stack.enter_async_context(
                    backend.open_session(
                        name=str(config.runner_address),
                        lease_duration=config.lease_duration,
                    )
                )
                wall_clock = clock if clock is not None else TrioWallClock()
                all_singletons = [
                    *singletons,
                    *cron_singletons(crons),
                    janitor(session.messages, config, wall_clock),
                ]
                manager = EntityManager(
                    config=config, runner_label=str(config.runner_address)
                )
                ids = SnowflakeGenerator(0)
                supervisor = SingletonSupervisor(all_singletons, config=config)
                sharding = Sharding(
                    config=config, runners=session.runners, manager=manager
                )
                persisted = PersistedDelivery(
                    storage=session.messages,
                    sharding=sharding,
                    manager=manager,
                    registry=registry,
                    config=config,
                    clock=wall_clock,
                    ids=ids,
                )
                runner = Runner(
                    config=config,
                    registry=registry,
                    clock=wall_clock,
                    manager=manager,
                    sharding=sharding,
                    persisted=persisted,
                    supervisor=supervisor,
                    broadcasts=broadcast_set,
                    crons=crons,
                )

                def shard_started(host: ShardHost) -> None:
                    persisted.shard_started(host)
                    supervisor.shard_started(host)

                sharding._on_shard_started = shard_started
                current_runner_var.set(runner)  # this task's own context
                async with trio.open_nursery() as nursery:
                    manager.nursery = nursery
                    broadcast_set.nursery = nursery
                    if endpoint is not None:
                        runner._router.outbound = outbound = OutboundCalls(endpoint)
                        inbound = InboundCalls(
                            endpoint=endpoint,
                            sharding=sharding,
                            manager=manager,
                            registry=registry,
                        )
                        persisted.endpoint = broadcast_set.endpoint = endpoint
                        handler.attach(
                            runner=runner,
                            outbound=outbound,
                            inbound=inbound,
                            sharding=sharding,
                            persisted=persisted,
                            broadcasts=broadcast_set,
                        )
                    await nursery.start(persisted.run)
                    await nursery.start(sharding.run)
                    ids.machine_id = sharding.machine_id or 0
                    nursery.start_soon(manager.idle.run)
                    system_scope.shield = True
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
    ) as runner:
        task_status.started(runner)
        await trio.sleep_forever()


def _check_singletons(singletons: Sequence[Singleton]) -> None:
    from ._errors import EntityDefinitionError

    reserved = [s.name for s in singletons if s.name.startswith("trio_cluster.")]
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
