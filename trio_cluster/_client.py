"""Clients: typed handles on entities, by id (Trio driver, caller side).

``runner.client(Account)`` gives an `EntityClient`; calling it with an id gives
a handle that is *typed as* ``Account`` (so ``.deposit(msg)`` type-checks with
the handler's own message and reply types) but is really an `EntityRef`,
whose handler attributes send messages through the runner instead of calling
methods. Only handlers (and ``id``/``address``) exist on a handle; reading
entity state through it raises `AttributeError`.

Each client makes its handles of a subclass of `EntityRef` with one class
attribute (a descriptor) per handler, so that ``ref.deposit`` is found by
the ordinary attribute lookup: on Python 3.11 a lookup that falls through to
``__getattr__`` first builds the `AttributeError` it then discards, which
cost more than the rest of a local call's client side. The bound handler is
kept in the handle (`_HandlerAttribute`). ``__getattr__`` still answers
names that are not handlers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Generic, TypeVar, cast

import attrs

from ._core._addresses import EntityAddress, EntityId, ShardId
from ._core._hashing import shard_number
from ._engine._routing import Router
from ._entity import Entity
from ._registry import EntityType, Handler

if TYPE_CHECKING:
    from collections.abc import AsyncIterator
    from contextlib import AbstractAsyncContextManager

    from ._core._config import ShardingConfig

__all__ = ["EntityClient", "EntityRef"]

E = TypeVar("E", bound=Entity)


class EntityClient(Generic[E]):
    """Makes handles on entities of one type: ``accounts("alice")``."""

    __slots__ = ("_config", "_ref_class", "_router", "_shard_ids", "_type", "cls")

    def __init__(
        self, router: Router, entity_type: EntityType, config: ShardingConfig
    ) -> None:
        self._router = router
        self._type = entity_type
        self._config = config
        self.cls = entity_type.cls
        self._ref_class = _ref_class(entity_type)
        self._shard_ids: dict[int, ShardId] = {}
        """One `ShardId` per shard of the type's group, shared by every
        address made here (so by every entity resident here) and by the
        runner's table of served shards (`Router.shard_id`)."""

    def address_of(self, entity_id: str) -> EntityAddress:
        """The address (and so the shard) of an entity id."""
        checked = EntityId(entity_id)  # raises ValueError for a bad id
        number = shard_number(entity_id, self._config.shards_per_group)
        shard = self._shard_ids.get(number)
        if shard is None:
            shard = self._shard_ids[number] = self._router.shard_id(
                ShardId(self._type.shard_group, number)
            )
        return EntityAddress(self._type.name, checked, shard)

    def __call__(self, entity_id: str) -> E:
        """A handle on the entity with this id (no message is sent yet).

        Raises:
            ValueError: the id is empty, padded with whitespace, or too long.
        """
        return cast(
            "E", self._ref_class(self._router, self._type, self.address_of(entity_id))
        )


@attrs.define(eq=False)
class EntityRef:
    """Runtime type of entity handles; see the module docstring."""

    _router: Router
    _type: EntityType = attrs.field(alias="entity_type")
    _address: EntityAddress

    @property
    def id(self) -> str:
        return self._address.entity_id.value

    @property
    def address(self) -> EntityAddress:
        return self._address

    def __getattr__(self, name: str) -> Any:
        handler = self._type.by_attribute.get(name)
        if handler is None:
            raise AttributeError(
                f"{self._type.name} has no handler {name!r}; a client handle only"
                " offers the entity's @rpc and @stream methods"
            )
        if handler.spec.kind == "stream":
            return _BoundStream(self._router, self._type, self._address, handler)
        return _BoundRpc(self._router, self._type, self._address, handler)

    def __repr__(self) -> str:
        return f"<handle on {self._address}>"


class _HandlerAttribute:
    """A handler of a handle's class: ``ref.deposit`` is a `_BoundRpc` (or
    `_BoundStream`) of that handle, made on first use and then kept in the
    handle's ``__dict__``, where the next lookups find it (this descriptor
    has no ``__set__``): a handle kept and called again pays one lookup."""

    __slots__ = ("_bound", "_handler", "_name")

    def __init__(self, handler: Handler, name: str) -> None:
        self._handler = handler
        self._name = name
        self._bound = _BoundStream if handler.spec.kind == "stream" else _BoundRpc

    def __get__(self, ref: EntityRef | None, owner: type[Any] | None = None) -> Any:
        if ref is None:
            return self
        bound = self._bound(ref._router, ref._type, ref._address, self._handler)
        ref.__dict__[self._name] = bound
        return bound


def _ref_class(entity_type: EntityType) -> type[EntityRef]:
    """The class of handles on entities of ``entity_type``: `EntityRef` with
    one `_HandlerAttribute` per handler, but for names `EntityRef` has
    already (``id``, ``address``: those keep their meaning, as before), and
    a ``__dict__`` for the bound handlers."""
    handlers = {
        name: _HandlerAttribute(handler, name)
        for name, handler in entity_type.by_attribute.items()
        if not hasattr(EntityRef, name)
    }
    return type(EntityRef.__name__, (EntityRef,), handlers)


@attrs.define(eq=False)
class _Bound:
    """A handler bound to one entity, sending through a runner."""

    _router: Router
    _type: EntityType = attrs.field(alias="entity_type")
    _address: EntityAddress
    _handler: Handler


class _BoundRpc(_Bound):
    __slots__ = ()

    def __call__(self, message: Any, /) -> Any:
        return self._router.call(self._type, self._address, self._handler, message)

    def call_nowait(self, message: Any, /) -> Any:
        """The call, run to completion now when nothing can make it wait
        (see `Router.call_nowait`; internal: the gateway's fast path).

        Raises:
            trio.WouldBlock: it cannot run at once (nothing happened).
        """
        return self._router.call_nowait(
            self._type, self._address, self._handler, message
        )

    async def discard(self, message: Any, /) -> None:
        await self._router.discard(self._type, self._address, self._handler, message)


class _BoundStream(_Bound):
    __slots__ = ()

    def __call__(
        self, message: Any, /
    ) -> AbstractAsyncContextManager[AsyncIterator[Any]]:
        return self._router.stream(self._type, self._address, self._handler, message)
