"""The runner: one process's member of a cluster (Trio driver, wiring).

`open_runner` opens a storage session, registers the runner, acquires its
shards and serves their entities until the ``async with`` block ends, then
shuts down gracefully: new calls are refused, running handlers get
``entity_termination_timeout`` to finish, ``on_stop`` hooks run, locks are
released (so successors start at once) and the runner unregisters.
`serve_runner` is the same for ``nursery.start``.

The runner also routes calls: volatile calls to a shard served here run in
the caller's task (see `EntityManager.call`); while the shard is moving the
call waits (within ``send_retry_timeout`` and the caller's own deadline).
"""

from __future__ import annotations

import logging
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any, TypeVar

import trio

from ._client import EntityClient
from ._clock import Clock, TrioWallClock
from ._context import current_runner_var
from ._core._config import ShardingConfig
from ._core._snowflake import SnowflakeGenerator
from ._cron import Cron, CronEntity, cron_singletons
from ._entity import Entity
from ._errors import ClusterError, EntityNotAssignedError, MessageTooLargeError
from ._janitor import janitor
from ._manager import EntityManager, NotDelivered
from ._persisted import PersistedDelivery
from ._registry import EntityType, Handler, Registry
from ._sharding import Sharding
from ._singletons import Singleton, SingletonSupervisor
from ._slots import JobKind, ShardHost
from ._statistics import RunnerStatistics, collect_statistics
from ._streams import StreamReceiver, consume, open_stream_channel
from .serialization._converter import make_converter

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Sequence

    import cattrs

    from ._core._addresses import EntityAddress, RunnerAddress
    from ._storage_abc import Storage

__all__ = ["Runner", "RunnerClosedError", "open_runner", "serve_runner"]

log = logging.getLogger("trio_cluster.runner")

E = TypeVar("E", bound=Entity)


class RunnerClosedError(ClusterError, trio.ClosedResourceError):
    """The runner is shut down (or shutting down): it takes no more calls."""


RunnerClosedError.__module__ = "trio_cluster"


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
        ids: SnowflakeGenerator,
        supervisor: SingletonSupervisor,
        crons: Sequence[Cron] = (),
    ) -> None:
        self.config = config
        self.clock = clock
        self._registry = registry
        self._manager = manager
        self._sharding = sharding
        self._persisted = persisted
        self._ids = ids
        self._supervisor = supervisor
        self._crons = {cron.name: cron for cron in crons}
        self._closed = False
        self._serialize = config.serialize_local_calls
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
                self, self._registry.for_class(cls)
            )
        return existing

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

    # ------------------------------------------------------------------
    # Routing (used by clients)

    def _check_open(self) -> None:
        if self._closed:
            raise RunnerClosedError("the runner is shut down; it takes no more calls")

    def _local_message(self, handler: Handler, message: Any) -> Any:
        if not self.config.serialize_local_calls:
            return message
        codec = handler.message
        payload = codec.encode(message)
        if len(payload) > self.config.max_message_size:
            raise MessageTooLargeError(
                size=len(payload), limit=self.config.max_message_size
            )
        return codec.decode(payload)

    async def _host_for(
        self, address: EntityAddress, deadline: float | None
    ) -> tuple[ShardHost, float | None]:
        """Wait for a local host of ``address``'s shard (remote routing comes
        with a transport)."""
        while True:
            self._check_open()
            host = self._sharding.hosts.get(address.shard)
            if host is not None:
                return host, deadline
            now = trio.current_time()
            if deadline is None:
                deadline = now + self.config.send_retry_timeout
            if now >= deadline or not self._sharding.hosts_group(address.shard.group):
                raise EntityNotAssignedError(address=str(address))
            await self._sharding.wait_changed(
                min(deadline, now + self.config.send_retry_interval)
            )

    async def _call(
        self,
        entity_type: EntityType,
        address: EntityAddress,
        handler: Handler,
        message: Any,
    ) -> Any:
        self._check_open()
        token = (
            None
            if current_runner_var.get(None) is self
            else current_runner_var.set(self)
        )
        try:
            if handler.spec.persisted:
                return await self._persisted.call(
                    address, entity_type, handler, message, discard=False
                )
            if self._serialize:
                message = self._local_message(handler, message)
            deadline: float | None = None
            host = self._sharding.hosts.get(address.shard)
            while True:
                if host is None:
                    host, deadline = await self._host_for(address, deadline)
                try:
                    return await self._manager.call(
                        host, address, entity_type, handler, message
                    )
                except NotDelivered:
                    host = None
                    deadline = (
                        deadline or trio.current_time() + self.config.send_retry_timeout
                    )
        finally:
            if token is not None:
                current_runner_var.reset(token)

    async def _discard(
        self,
        entity_type: EntityType,
        address: EntityAddress,
        handler: Handler,
        message: Any,
    ) -> None:
        self._check_open()
        if handler.spec.persisted:
            await self._persisted.call(
                address, entity_type, handler, message, discard=True
            )
            return
        message = self._local_message(handler, message)
        deadline: float | None = None
        while True:
            host, deadline = await self._host_for(address, deadline)
            try:
                self._manager.submit(host, address, entity_type, handler, message)
            except NotDelivered:
                continue
            await trio.lowlevel.checkpoint()
            return

    async def _route_discard(
        self, address: EntityAddress, spec: Any, message: Any
    ) -> None:
        entity_type = self._registry.get(address.entity_type)
        if entity_type is None:  # pragma: no cover - an entity's own type is registered
            raise EntityNotAssignedError(address=str(address))
        await self._discard(
            entity_type, address, entity_type.handlers[spec.name], message
        )

    @asynccontextmanager
    async def _open_stream(
        self,
        entity_type: EntityType,
        address: EntityAddress,
        handler: Handler,
        message: Any,
    ) -> AsyncIterator[StreamReceiver]:
        self._check_open()
        message = self._local_message(handler, message)
        deadline: float | None = None
        while True:
            host, deadline = await self._host_for(address, deadline)
            send, receive = open_stream_channel()
            try:
                job = self._manager.submit(
                    host,
                    address,
                    entity_type,
                    handler,
                    message,
                    kind=JobKind.STREAM,
                    stream_channel=send,
                )
            except NotDelivered:
                send.close()
                receive.close()
                continue
            async with consume(self._manager, job, receive) as items:
                yield items
            return

    async def _shutdown(self) -> None:
        self._closed = True
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
    singletons: Sequence[Singleton] = (),
    crons: Sequence[Cron] = (),
    converter: cattrs.Converter | None = None,
    clock: Clock | None = None,
) -> AsyncIterator[Runner]:
    """Open a runner that serves ``entities`` until the block ends.

    Args:
        entities: entity classes this runner hosts (validated eagerly).
        config: policies; `ShardingConfig()` by default.
        storage: a storage backend; a private `MemoryStorage` by default
            (persisted messages then live only as long as the process).
        singletons: tasks that run on exactly one runner of the cluster.
        crons: persisted schedules, run once per instant cluster-wide.
        converter: from `trio_cluster.serialization.make_converter`, with your
            own hooks registered; a fresh one by default.
        clock: wall clock for persisted times; `TrioWallClock` by default.

    Raises:
        EntityDefinitionError: an entity class or singleton is invalid (before
            anything starts).
        PersistenceError: storage failed while starting.

    On exit (normal, error or cancellation) the runner shuts down gracefully,
    shielded from cancellation and bounded by ``entity_termination_timeout``
    (plus storage deadlines). A single exception from the block propagates as
    itself, not wrapped in an exception group.
    """
    from .storage._memory import MemoryStorage

    config = config if config is not None else ShardingConfig()
    registry = _build(
        entities=entities, config=config, converter=converter, crons=crons
    )
    _check_singletons(singletons)
    all_singletons = list(singletons) + cron_singletons(crons)
    backend = storage if storage is not None else MemoryStorage()
    async with backend.open_session(
        name=str(config.runner_address), lease_duration=config.lease_duration
    ) as session:
        wall_clock = clock if clock is not None else TrioWallClock()
        all_singletons.append(janitor(session.messages, config, wall_clock))
        manager = EntityManager(config=config, runner_label=str(config.runner_address))
        ids = SnowflakeGenerator(0)
        supervisor = SingletonSupervisor(all_singletons, config=config)
        sharding = Sharding(config=config, runners=session.runners, manager=manager)
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
            ids=ids,
            supervisor=supervisor,
            crons=crons,
        )

        def shard_started(host: ShardHost) -> None:
            persisted.shard_started(host)
            supervisor.shard_started(host)

        sharding._on_shard_started = shard_started
        token = current_runner_var.set(runner)
        try:
            async with _unwrap_single(), trio.open_nursery() as nursery:
                manager.nursery = nursery
                await nursery.start(persisted.run)
                await nursery.start(sharding.run)
                ids.machine_id = sharding.machine_id or 0
                nursery.start_soon(manager.idle.run)
                try:
                    yield runner
                finally:
                    with trio.CancelScope(shield=True):
                        await runner._shutdown()
                    nursery.cancel_scope.cancel()
        finally:
            current_runner_var.reset(token)


async def serve_runner(
    entities: Sequence[type[Entity]] = (),
    config: ShardingConfig | None = None,
    storage: Storage | None = None,
    *,
    singletons: Sequence[Singleton] = (),
    crons: Sequence[Cron] = (),
    converter: cattrs.Converter | None = None,
    clock: Clock | None = None,
    task_status: trio.TaskStatus[Runner] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run a runner until cancelled::

        runner = await nursery.start(serve_runner, [Account], config, storage)

    Takes the same arguments as `open_runner` (the first three may be given
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
        singletons=singletons,
        crons=crons,
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


@asynccontextmanager
async def _unwrap_single() -> AsyncIterator[None]:
    """Re-raise a lone exception out of an exception group as itself."""
    try:
        yield
    except BaseExceptionGroup as group:
        exc: BaseException = group
        while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
            exc = exc.exceptions[0]
        if exc is group:
            raise
        raise exc from exc.__cause__
