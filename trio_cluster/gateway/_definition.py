"""What a gateway exposes and how it protects it: `Gateway`, its
`GatewayConfig`, stateless `Service` classes, and `expose` (definition
layer: no I/O).

Nothing a runner hosts is reachable through a gateway unless its `Gateway`
names it: an entity type through `expose` (all of its handlers, or the ones
named), a service by an instance in ``services``. `resolve_routes` turns a
definition into the table of operations a server dispatches on, by name:
``"<entity type_name>.<handler>"`` (a request names the entity id in
``key``) and ``"<service name>.<handler>"``.
"""

from __future__ import annotations

from collections.abc import (
    AsyncIterator,
    Awaitable,
    Callable,
    Container,
    Iterable,
    Mapping,
    Sequence,
)
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from functools import partial
from typing import TYPE_CHECKING, Any, ClassVar, Final, Literal

import attrs

from .._core._checks import positive_count, positive_number
from .._core._ratelimit import RateLimit, WindowLimit
from .._entity import Entity
from .._errors import ConfigError
from .._handlers import HandlerSpec
from .._registry import resolve_handler
from ..serialization import Codec
from ..serialization._replies import error_tag
from ._client_info import ClientInfo

if TYPE_CHECKING:
    import cattrs

    from .._client import EntityClient
    from .._core._addresses import EntityAddress
    from .._runner import Runner

__all__ = [
    "Exposed",
    "Gateway",
    "GatewayConfig",
    "Handshake",
    "Operation",
    "Route",
    "Service",
    "client_routes",
    "expose",
    "resolve_routes",
]


def _positive(_: object, attribute: attrs.Attribute[Any], value: object) -> None:
    positive_number(attribute.name, value)


def _positive_int(_: object, attribute: attrs.Attribute[Any], value: object) -> None:
    positive_count(attribute.name, value)


@attrs.frozen
class GatewayConfig:
    """A gateway's limits and timings (validated eagerly; durations in
    seconds).

    Raises:
        ConfigError: a value of the wrong type or out of range.
    """

    path: str = "/ws"
    """The URL path of the WebSocket endpoint."""
    open_timeout: float = attrs.field(default=10.0, validator=_positive)
    """Longest time from the TCP accept to the completed upgrade."""
    close_timeout: float = attrs.field(default=2.0, validator=_positive)
    """Longest wait for the client's answer to a close frame."""
    ping_interval: float = attrs.field(default=25.0, validator=_positive)
    """A socket silent for this long is sent a ping frame."""
    ping_timeout: float = attrs.field(default=10.0, validator=_positive)
    """A ping unanswered for this long closes the socket (4000)."""
    max_message_size: int = attrs.field(default=1 << 20, validator=_positive_int)
    """Largest message either way, in bytes (over it: close 1009)."""
    message_queue_size: int = attrs.field(default=16, validator=_positive_int)
    """Messages a socket buffers before its reader takes over (those that
    arrive right after the upgrade); then each is handled as it arrives,
    bounded by ``message_rate`` and ``max_concurrent_requests``."""
    send_queue: int = attrs.field(default=1024, validator=_positive_int)
    """Frames waiting to be written per socket; one more closes it (4001)."""
    send_timeout: float = attrs.field(default=5.0, validator=_positive)
    """A message the client takes longer than this to read closes it (4001)."""
    max_concurrent_requests: int = attrs.field(default=64, validator=_positive_int)
    """Requests (calls and streams) in flight per socket; over it, the
    request is refused with ``too_many_requests``."""
    max_connections: int = attrs.field(default=10_000, validator=_positive_int)
    """Sockets open at once (upgrading or up); over it, the TCP connection
    is closed unread."""
    max_pending_upgrades: int = attrs.field(default=1_000, validator=_positive_int)
    """Of those, the ones still in their HTTP upgrade."""
    connect_rate: WindowLimit | None = attrs.field(
        factory=lambda: WindowLimit(10, per=60.0, block_for=300.0)
    )
    """Upgrades per client IP address (None: unlimited); over it, HTTP 429
    with ``Retry-After``."""
    message_rate: RateLimit | None = attrs.field(
        factory=lambda: RateLimit(100.0, burst=200.0)
    )
    """Frames per socket (None: unlimited); over it, close 4008."""

    def __attrs_post_init__(self) -> None:
        if not self.path.startswith("/"):
            raise ConfigError(f"path must start with '/', got {self.path!r}")
        if self.max_pending_upgrades > self.max_connections:
            raise ConfigError("max_pending_upgrades must be at most max_connections")


@attrs.frozen
class Handshake:
    """What a client sent to open its socket (given to ``authenticate``)."""

    remote: str
    """The client's ``host:port``."""
    path: str
    query: Mapping[str, str]
    """The URL's query parameters (a browser passes a token as ``?token=``)."""
    headers: Mapping[str, str]
    """Request headers, names in lower case."""
    subprotocol: str


@attrs.frozen
class Operation:
    """One request, as the ``authorize`` hook sees it."""

    kind: Literal["call", "stream", "subscribe", "presence"]
    name: str
    """``"Counter.increment"``, ``"clock.now"``; the topic's name for
    ``"subscribe"`` and ``"presence"`` (listing a topic's presence)."""
    key: str | None
    """The entity id (None for a service or a topic)."""
    message: object
    """The decoded message (for ``"subscribe"``: the `Position` to resume
    from, or None)."""


class Service:
    """A stateless group of ``@rpc`` / ``@stream`` methods clients may call.

    Subclass it with a ``name``; the gateway calls the methods of the
    instance given in `Gateway.services` (one for every client: keep
    per-client state out of it; `trio_cluster.gateway.current_client` says who
    calls)::

        class Clock(Service):
            name = "clock"

            @tc.rpc
            async def now(self, msg: Now) -> float: ...
    """

    name: ClassVar[str]

    @property
    def address(self) -> EntityAddress:
        """Services have none: this only lets ``@tc.rpc`` / ``@tc.stream``
        (typed for entities) decorate service methods.

        Raises:
            AttributeError: always.
        """
        raise AttributeError(f"service {self.name!r} has no entity address")


@attrs.frozen
class Exposed:
    """An entity type exposed to clients (see `expose`)."""

    cls: type[Entity]
    handlers: tuple[str, ...] | None
    """Attribute names of the exposed handlers; None: all of them."""


def expose(cls: type[Entity], *handlers: str) -> Exposed:
    """Expose ``cls``'s handlers named here (their Python attribute names),
    or all of them if none is named.

    Raises:
        ConfigError: ``cls`` is no entity class, or a name is no handler.
    """
    given: object = cls
    if not isinstance(given, type) or not issubclass(given, Entity):
        raise ConfigError(f"expose() takes an Entity class, got {cls!r}")
    known = {spec.attribute for spec in cls.__tc_handlers__.values()}
    unknown = sorted(set(handlers) - known)
    if unknown:
        raise ConfigError(
            f"{cls.__qualname__} has no handlers {unknown}; it has {sorted(known)}"
        )
    return Exposed(cls, tuple(handlers) if handlers else None)


Authenticate = Callable[[Handshake], Awaitable[object]]
Authorize = Callable[[object, Operation], Awaitable[bool]]


@attrs.frozen
class Gateway:
    """A gateway definition: what clients may reach and the hooks that
    protect it. Serve it with `trio_cluster.gateway.serve_gateway`.

    Raises:
        ConfigError: an element of ``entities`` or ``services`` of the wrong
            kind (checked again, with names, when served).
    """

    entities: Sequence[Exposed] = ()
    services: Sequence[Service] = ()
    authenticate: Authenticate | None = None
    """Called with the `Handshake` before the upgrade; returns the
    principal (any value, e.g. a user id) or raises `UnauthorizedError`
    (a None return refuses too). None: every client is let in, with the
    principal None."""
    authorize: Authorize | None = None
    """Called with the principal and the `Operation` before each request
    runs; False refuses it (``forbidden``). None: every exposed operation
    is allowed."""
    config: GatewayConfig = GatewayConfig()
    topics: Callable[[str], bool] | None = None
    """Which topic names clients may subscribe to (None: no topics). The
    runners must host `trio_cluster.gateway.Topic`."""
    pages: Mapping[str, str] = attrs.field(factory=dict)
    """Small HTML pages served on GET by path (``{"/": "<html>..."}``),
    besides ``/gateway.js``: a demo page of the same origin as the
    socket. Not a web server: no files, no caching rules."""
    presence: Callable[[ClientInfo, str], object] | None = None
    """Called with a subscribing client and the topic: the data of its
    presence entry in the topic (plain data, e.g. its user name), or None
    to leave it out of the topic's presence. None: no presence."""
    sessions: bool = False
    """Whether sockets attach to their session (the client's ``?session=``
    token) for reliable pushes. The runners must host
    `trio_cluster.gateway.Session`."""
    user: Callable[[object], str | None] | None = None
    """The user a principal is (None: none): a session is bound to the
    user of its first socket; a socket of another user cannot attach to
    it."""

    def __attrs_post_init__(self) -> None:
        for item in self.entities:
            if not isinstance(item, Exposed):
                raise ConfigError(
                    f"Gateway(entities=...) takes expose(EntityClass, ...) values, got {item!r}"
                )
        for service in self.services:
            if not isinstance(service, Service):
                raise ConfigError(
                    f"Gateway(services=...) takes Service instances, got {service!r}"
                )


Invoke = Callable[[str | None, Any], Awaitable[Any]]
InvokeNowait = Callable[[str | None, Any], Any]
OpenItems = Callable[[str | None, Any], AbstractAsyncContextManager[AsyncIterator[Any]]]


@attrs.frozen(eq=False)
class Route:
    """One exposed operation, ready to dispatch."""

    name: str
    kind: Literal["call", "stream"]
    keyed: bool
    """Entity handlers take an entity id in ``key``; services none."""
    message: Codec[Any]
    reply: Codec[Any]
    errors: Mapping[str, tuple[type[Exception], Codec[Any]]]
    """The declared errors by wire tag, passed back typed."""
    invoke: Invoke | None
    """Calls (kind ``"call"``): run it."""
    open_items: OpenItems | None
    """Streams (kind ``"stream"``): open its items."""
    invoke_nowait: InvokeNowait | None = None
    """Calls to volatile entity handlers: run it now, without a task, if
    nothing can make it wait (else it raises `trio.WouldBlock`, and nothing
    happened: `invoke` it). See `Router.call_nowait`."""
    known_keys: Container[str] = frozenset()
    """Entity ids known to be valid (the route's kept handles): not checked
    again (`admit`)."""

    def declared(self, exc: BaseException) -> tuple[str, Codec[Any]] | None:
        """The wire tag and codec of ``exc`` if the handler declares its type."""
        for tag, (cls, codec) in self.errors.items():
            if isinstance(exc, cls):
                return tag, codec
        return None


def _handler_specs(cls: type) -> Iterable[HandlerSpec]:
    seen: set[str] = set()
    for klass in cls.__mro__:
        for value in vars(klass).values():
            spec = getattr(value, "spec", None)
            if isinstance(spec, HandlerSpec) and spec.attribute not in seen:
                seen.add(spec.attribute)
                yield spec


def _route(
    name: str,
    owner: type,
    spec: HandlerSpec,
    converter: cattrs.Converter,
    *,
    keyed: bool,
    invoke: Invoke | None = None,
    open_items: OpenItems | None = None,
    invoke_nowait: InvokeNowait | None = None,
    known_keys: Container[str] = frozenset(),
) -> Route:
    handler = resolve_handler(owner, name.partition(".")[0], spec, converter, None)
    return Route(
        name=name,
        kind="call" if spec.kind == "rpc" else "stream",
        keyed=keyed,
        message=handler.message,
        reply=handler.reply.value,
        errors={
            error_tag(cls): (cls, Codec(converter, cls, f"{name} error"))
            for cls in spec.errors
        },
        invoke=invoke,
        open_items=open_items,
        invoke_nowait=invoke_nowait,
        known_keys=known_keys,
    )


def client_routes(
    classes: Iterable[object], converter: cattrs.Converter
) -> dict[str, Route]:
    """The routes of entity and service classes as a client sees them (to
    encode messages and decode replies and declared errors; nothing to
    invoke).

    Raises:
        ConfigError: a class that is neither, or a service without a name.
        EntityDefinitionError: a handler's types cannot be encoded.
    """
    routes: dict[str, Route] = {}
    for cls in classes:
        if isinstance(cls, type) and issubclass(cls, Entity):
            prefix, keyed, specs = (
                cls.type_name,
                True,
                list(cls.__tc_handlers__.values()),
            )
        elif isinstance(cls, type) and issubclass(cls, Service):
            prefix, keyed, specs = _service_name(cls), False, list(_handler_specs(cls))
        else:
            raise ConfigError(f"expected Entity or Service classes, got {cls!r}")
        for spec in specs:
            route = _route(f"{prefix}.{spec.name}", cls, spec, converter, keyed=keyed)
            routes[route.name] = route
    return routes


def _service_name(cls: type[Service]) -> str:
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name or "." in name:
        raise ConfigError(
            f"{cls.__qualname__}: set a service name without dots, e.g. name = 'clock'"
        )
    return name


_KEPT_HANDLES: Final = 1024
"""Entity handles a route keeps for the next requests (per handler)."""


def _entity_routes(
    runner: Runner, exposed: Exposed, converter: cattrs.Converter
) -> Iterable[Route]:
    cls = exposed.cls
    client: EntityClient[Any] = runner.client(cls)
    type_name: str = cls.type_name
    for spec in cls.__tc_handlers__.values():
        if exposed.handlers is not None and spec.attribute not in exposed.handlers:
            continue
        attribute = spec.attribute
        handles: dict[str, Any] = {}

        def bound_to(
            key: str | None,
            attribute: str = attribute,
            handles: dict[str, Any] = handles,
        ) -> Any:
            assert key is not None
            # A handle bound to the entity's handler, kept for the next
            # requests to it (bounded): no id check, hashing or handle made
            # per request.
            bound = handles.get(key)
            if bound is None:
                if len(handles) >= _KEPT_HANDLES:
                    handles.clear()
                bound = handles[key] = getattr(client(key), attribute)
            return bound

        def invoke(key: str | None, message: Any, bound_to: Any = bound_to) -> Any:
            return bound_to(key)(message)

        def invoke_nowait(
            key: str | None,
            message: Any,
            handles: dict[str, Any] = handles,
            bound_to: Any = bound_to,
        ) -> Any:
            # `bound_to`, inlined for a kept handle (the gateway's fast path).
            bound = handles.get(key)  # type: ignore[arg-type]
            if bound is None:
                bound = bound_to(key)
            return bound.call_nowait(message)

        nowait = spec.kind == "rpc" and not spec.persisted
        if spec.persisted and spec.primary_key is not None:
            invoke = partial(_outliving_the_socket, client, attribute)

        yield _route(
            f"{type_name}.{spec.name}",
            cls,
            spec,
            converter,
            keyed=True,
            invoke=invoke if spec.kind == "rpc" else None,
            open_items=invoke if spec.kind == "stream" else None,
            invoke_nowait=invoke_nowait if nowait else None,
            known_keys=handles,
        )


async def _outliving_the_socket(
    client: EntityClient[Any], attribute: str, key: str | None, message: Any
) -> Any:
    """Call a persisted handler with a primary key so that the socket's
    end does not interrupt it: the request is stored first (``discard``),
    then the call attaches to it by its primary key, and a caller that
    attached does not interrupt the request when cancelled. A client whose
    socket dropped sends the call again and gets the recorded reply; the
    handler runs once either way.
    """
    assert key is not None
    handler = getattr(client(key), attribute)
    await handler.discard(message)
    return await handler(message)


def _service_routes(service: Service, converter: cattrs.Converter) -> Iterable[Route]:
    cls = type(service)
    name = _service_name(cls)
    specs = list(_handler_specs(cls))
    if not specs:
        raise ConfigError(f"{cls.__qualname__}: declare at least one @rpc or @stream")
    for spec in specs:
        fn = spec.fn

        async def invoke(key: str | None, message: Any, fn: Any = fn) -> Any:
            return await fn(service, message)

        @asynccontextmanager
        async def open_items(
            key: str | None, message: Any, fn: Any = fn
        ) -> AsyncIterator[AsyncIterator[Any]]:
            generator = fn(service, message)
            try:
                yield generator
            finally:
                await generator.aclose()

        yield _route(
            f"{name}.{spec.name}",
            cls,
            spec,
            converter,
            keyed=False,
            invoke=invoke if spec.kind == "rpc" else None,
            open_items=open_items if spec.kind == "stream" else None,
        )


def resolve_routes(runner: Runner, gateway: Gateway) -> dict[str, Route]:
    """The operations of ``gateway`` on ``runner``, by name.

    Raises:
        ConfigError: a service without a name or handlers, or two
            operations of the same name.
        EntityDefinitionError: a handler's types cannot be encoded.
    """
    converter = runner.converter
    routes: dict[str, Route] = {}
    found: list[Route] = []
    for exposed in gateway.entities:
        found += _entity_routes(runner, exposed, converter)
    for service in gateway.services:
        found += _service_routes(service, converter)
    for route in found:
        if route.name in routes:
            raise ConfigError(f"two gateway operations are named {route.name!r}")
        routes[route.name] = route
    return routes
