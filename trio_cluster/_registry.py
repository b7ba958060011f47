"""Registration of entity types with a runner: validation and codecs.

When a runner opens, every entity class is checked eagerly (type name,
policies, handler signatures, message and reply types the converter can
handle), and each handler gets its codecs. Problems raise
`EntityDefinitionError` naming the class and handler, before any message moves.

A class that sets ``__tc_stand_in__ = True`` only sends to a type it does
not define (``trio-cluster workflows`` sends to workflows by name without
their code): it gives way to the type's real class, registered before it
(it then uses that class's type) or after it (which then replaces it).
"""

from __future__ import annotations

import collections.abc
import dis
import inspect
import typing
from collections.abc import Iterable, Mapping
from typing import Any

import attrs

from ._core._checks import positive_count, positive_seconds
from ._core._retry import Backoff, RetryPolicy
from ._durable import Durable, StateCodec
from ._entity import Entity
from ._errors import EntityDefinitionError
from ._handlers import HandlerSpec
from .serialization._converter import Codec
from .serialization._replies import ReplyCodec, cluster_error_codecs

if typing.TYPE_CHECKING:
    import cattrs

    from ._core._config import ShardingConfig

__all__ = ["EntityType", "Handler", "Registry", "resolve_handler"]

_STREAM_ORIGINS = (
    collections.abc.AsyncIterator,
    collections.abc.AsyncIterable,
    collections.abc.AsyncGenerator,
)


_SUSPENDING_OPCODES = frozenset(
    {
        "YIELD_VALUE",
        "SEND",
        "YIELD_FROM",
        "GET_AWAITABLE",
        "GET_AITER",
        "GET_ANEXT",
        "BEFORE_ASYNC_WITH",
        "END_ASYNC_FOR",
        "ASYNC_GEN_WRAP",
    }
)


def may_suspend(fn: object) -> bool:
    """Whether calling the coroutine function ``fn`` can suspend.

    A native coroutine suspends only by yielding from its own frame, which
    every ``await``, ``async for`` and ``async with`` compiles to. A function
    whose bytecode has none of those instructions runs to completion in one
    step: it needs no cancel scope (nothing can happen while it runs).
    Anything but a plain ``async def`` function counts as suspending.
    """
    code = getattr(fn, "__code__", None)
    if code is None or not inspect.iscoroutinefunction(fn):
        return True
    return any(
        instruction.opname in _SUSPENDING_OPCODES
        for instruction in dis.get_instructions(code)
    )


DEFAULT_RETRY_POLICY = RetryPolicy()
"""The retry policy of persisted handlers that name none (nor their type)."""


@attrs.frozen
class Handler:
    """A handler with its codecs, ready for the runtime."""

    spec: HandlerSpec
    entity_type: str
    message: Codec[Any]
    reply: ReplyCodec
    suspends: bool = True
    """False if the handler can never suspend (see `may_suspend`): it then
    runs without a cancel scope of its own."""
    retry: RetryPolicy = DEFAULT_RETRY_POLICY
    """Its retry policy (persisted handlers): its own, else its entity
    type's ``defect_retry``, else the default."""

    @property
    def what(self) -> str:
        return f"{self.entity_type}.{self.spec.name}"


@attrs.frozen(eq=False)
class EntityType:
    """An entity class as registered with one runner."""

    cls: type[Entity]
    name: str
    max_idle: float
    mailbox_capacity: int
    concurrency: int
    shard_group: str
    handlers: Mapping[str, Handler]
    """By wire name."""
    by_attribute: Mapping[str, Handler]
    """By Python attribute name (what clients look up)."""
    has_on_start: bool
    has_on_stop: bool
    start_suspends: bool = True
    """Whether ``on_start`` may suspend (see `may_suspend`)."""
    hosted: bool = True
    """Whether this runner hosts the type (False: known only to call it)."""
    restart_backoff: Backoff | None = None
    """The backoff between restarts of a crashed entity, from the type's
    ``defect_retry`` (None: the runner's)."""
    durable: Durable[Any] | None = None
    """Its durable state declaration (`trio_cluster.durable`), if any."""
    state_codec: StateCodec | None = None
    """The codec of its durable state (with ``durable``)."""


class Registry:
    """The entity types a runner knows, by type name."""

    def __init__(
        self,
        classes: Iterable[type[Entity]],
        *,
        config: ShardingConfig,
        converter: cattrs.Converter,
    ) -> None:
        self.converter = converter
        self.config = config
        self.cluster_codecs = cluster_error_codecs(converter)
        self.generic_reply = ReplyCodec(
            converter, None, (), "reply", self.cluster_codecs
        )
        """Encodes replies that are cluster errors, for requests whose
        handler is unknown."""
        self.types: dict[str, EntityType] = {}
        """The types this runner hosts, by type name."""
        self._by_class: dict[type[Entity], EntityType] = {}
        self._by_name: dict[str, EntityType] = {}
        """Every type known here, hosted or only called."""
        for cls in classes:
            self.add(cls)

    def add(self, cls: type[Entity], *, hosted: bool = True) -> EntityType:
        """Validate and register one class (idempotent for the same class).

        Raises:
            EntityDefinitionError: see the module docstring.
        """
        existing = self._by_class.get(cls)
        if existing is not None:
            return existing
        entity_type = resolve_entity_type(
            cls,
            config=self.config,
            converter=self.converter,
            cluster_codecs=self.cluster_codecs,
        )
        other = self._by_name.get(entity_type.name)
        if other is not None and _stand_in(cls):
            self._by_class[cls] = other
            return other
        if other is not None and _stand_in(other.cls) and not hosted:
            other = None  # the real class replaces the stand-in
        if other is not None:
            raise EntityDefinitionError(
                f"type_name {entity_type.name!r} is used by both {other.cls.__qualname__}"
                f" and {cls.__qualname__}; type names must be unique"
            )
        if not hosted:
            entity_type = attrs.evolve(entity_type, hosted=False)
        else:
            self.types[entity_type.name] = entity_type
        self._by_name[entity_type.name] = entity_type
        self._by_class[cls] = entity_type
        return entity_type

    def for_class(self, cls: type[Entity]) -> EntityType:
        """The registered type of ``cls``; a class this runner does not host
        is registered to be called only (``hosted=False``): requests for it
        are never run here.

        Raises:
            EntityDefinitionError: ``cls`` is not a valid entity class.
        """
        return self._by_class.get(cls) or self.add(cls, hosted=False)

    def get(self, type_name: str) -> EntityType | None:
        """The hosted type of that name, or None."""
        return self.types.get(type_name)


def _stand_in(cls: type[Entity]) -> bool:
    return cls.__dict__.get("__tc_stand_in__", False) is True


def resolve_entity_type(
    cls: object,
    *,
    config: ShardingConfig,
    converter: cattrs.Converter,
    cluster_codecs: Mapping[str, Codec[Any]] | None = None,
) -> EntityType:
    """Check an entity class and build its `EntityType`.

    Raises:
        EntityDefinitionError: anything wrong with the class or its handlers.
    """
    if not isinstance(cls, type) or not issubclass(cls, Entity):
        raise EntityDefinitionError(f"entities must be Entity subclasses, got {cls!r}")
    where = cls.__qualname__
    name = cls.__dict__.get("type_name", getattr(cls, "type_name", None))
    if not isinstance(name, str) or not name or len(name) > 150 or name.strip() != name:
        raise EntityDefinitionError(
            f'{where}: set a stable type_name, e.g. type_name = "{cls.__name__}"'
            " (1-150 characters; it is the wire name, never derived from the class)"
        )
    _check_constructor(cls, where)
    definition = (EntityDefinitionError, EntityDefinitionError)
    max_idle = positive_seconds(
        f"{where}: max_idle",
        cls.max_idle if cls.max_idle is not None else config.entity_max_idle,
        errors=definition,
    )
    capacity = positive_count(
        f"{where}: mailbox_capacity",
        cls.mailbox_capacity
        if cls.mailbox_capacity is not None
        else config.entity_mailbox_capacity,
        errors=definition,
    )
    concurrency = positive_count(
        f"{where}: concurrency", cls.concurrency, errors=definition
    )
    group: object = cls.shard_group
    if not isinstance(group, str) or not group or len(group) > 64:
        raise EntityDefinitionError(f"{where}: shard_group must be a shard group name")
    if not cls.__tc_handlers__:
        raise EntityDefinitionError(
            f"{where}: declare at least one @rpc or @stream handler"
        )
    state = cls.__tc_durable__
    if state is not None and concurrency != 1:
        raise EntityDefinitionError(
            f"{where}: an entity with durable state runs one handler at a time"
            " (concurrency = 1): each transactional handler saves the state it"
            " leaves, and puts it back if it rolls back"
        )
    defect_retry: object = cls.defect_retry
    if defect_retry is not None and not isinstance(defect_retry, RetryPolicy):
        raise EntityDefinitionError(
            f"{where}: defect_retry must be a RetryPolicy or None, got {defect_retry!r}"
        )
    # The state's codec first: a state machine's registers its states' union
    # on the converter, which its handlers' replies use.
    state_codec = None if state is None else state.codec(converter, where)
    handlers: dict[str, Handler] = {}
    by_attribute: dict[str, Handler] = {}
    for spec in cls.__tc_handlers__.values():
        handler = resolve_handler(cls, name, spec, converter, cluster_codecs)
        retry = spec.retry or defect_retry
        if retry is not None:
            handler = attrs.evolve(handler, retry=retry)
        handlers[spec.name] = handler
        by_attribute[spec.attribute] = handler
    return EntityType(
        cls=cls,
        name=name,
        max_idle=float(max_idle),
        mailbox_capacity=capacity,
        concurrency=concurrency,
        shard_group=cls.shard_group,
        handlers=handlers,
        by_attribute=by_attribute,
        has_on_start=cls.on_start is not Entity.on_start,
        has_on_stop=cls.on_stop is not Entity.on_stop,
        # Activating an entity with durable state loads it from storage.
        start_suspends=state is not None
        or (cls.on_start is not Entity.on_start and may_suspend(cls.on_start)),
        restart_backoff=None if defect_retry is None else defect_retry.backoff,
        durable=state,
        state_codec=state_codec,
    )


def _check_constructor(cls: type[Entity], where: str) -> None:
    try:
        signature = inspect.signature(cls)
    except (TypeError, ValueError):  # pragma: no cover - builtins without signatures
        return
    required = [
        p
        for p in signature.parameters.values()
        if p.default is p.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
    ]
    if required:
        raise EntityDefinitionError(
            f"{where}: the constructor must take no arguments (the runner creates"
            " entities); initialise state in __init__(self) or on_start"
        )


def resolve_handler(
    cls: type[Entity],
    type_name: str,
    spec: HandlerSpec,
    converter: cattrs.Converter,
    cluster_codecs: Mapping[str, Codec[Any]] | None,
) -> Handler:
    where = f"{cls.__qualname__}.{spec.attribute}"
    fn = spec.fn
    if spec.kind == "rpc" and not inspect.iscoroutinefunction(fn):
        raise EntityDefinitionError(
            f"{where}: an @rpc handler must be an async def method"
        )
    if spec.kind == "stream" and not inspect.isasyncgenfunction(fn):
        raise EntityDefinitionError(
            f"{where}: a @stream handler must be an async generator (async def with yield)"
        )
    parameters = list(inspect.signature(fn).parameters.values())
    if len(parameters) != 2 or any(
        p.kind not in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) for p in parameters
    ):
        raise EntityDefinitionError(
            f"{where}: a handler takes exactly one message argument: (self, message)"
        )
    try:
        hints = typing.get_type_hints(fn)
    except Exception as exc:
        raise EntityDefinitionError(
            f"{where}: cannot resolve the type annotations ({exc}); message and"
            " reply types must be importable at runtime (not only under TYPE_CHECKING)"
        ) from exc
    message_name = parameters[1].name
    if message_name not in hints or "return" not in hints:
        raise EntityDefinitionError(
            f"{where}: annotate the message parameter and the return type; they"
            " define the wire format"
        )
    message_type = hints[message_name]
    reply_type = hints["return"]
    if spec.kind == "stream":
        origin = typing.get_origin(reply_type)
        arguments = typing.get_args(reply_type)
        if origin not in _STREAM_ORIGINS or not arguments:
            raise EntityDefinitionError(
                f"{where}: annotate a stream's return type as AsyncIterator[T]"
            )
        reply_type = arguments[0]
    what = f"{type_name}.{spec.name}"
    return Handler(
        spec=spec,
        entity_type=type_name,
        message=Codec(converter, message_type, f"{what} message"),
        reply=ReplyCodec(converter, reply_type, spec.errors, what, cluster_codecs),
        suspends=spec.kind == "stream" or may_suspend(fn),
    )
