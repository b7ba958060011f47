"""Clients: typed handles on entities, by id (Trio driver, caller side).

``runner.client(Account)`` gives an `EntityClient`; calling it with an id gives
a handle that is *typed as* ``Account`` (so ``.deposit(msg)`` type-checks with
the handler's own message and reply types) but is really an `EntityRef`,
whose handler attributes send messages through the runner instead of calling
methods. Only handlers (and ``id``/``address``) exist on a handle; reading
entity state through it raises `AttributeError`.
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

    __slots__ = ("_config", "_router", "_shard_ids", "_type", "cls")

    def __init__(
        self, router: Router, entity_type: EntityType, config: ShardingConfig
    ) -> None:
        self._router = router
        self._type = entity_type
        self._config = config
        self.cls = entity_type.cls
        self._shard_ids: dict[int, ShardId] = {}
        """One `ShardId` per shard of the type's group, shared by every
        address made here (so by every entity resident here)."""

    def address_of(self, entity_id: str) -> EntityAddress:
        """The address (and so the shard) of an entity id."""
        checked = EntityId(entity_id)  # raises ValueError for a bad id
        number = shard_number(entity_id, self._config.shards_per_group)
        shard = self._shard_ids.get(number)
        if shard is None:
            shard = self._shard_ids[number] = ShardId(self._type.shard_group, number)
        return EntityAddress(self._type.name, checked, shard)

    def __call__(self, entity_id: str) -> E:
        """A handle on the entity with this id (no message is sent yet).

        Raises:
            ValueError: the id is empty, padded with whitespace, or too long.
        """
        return cast(
            "E", EntityRef(self._router, self._type, self.address_of(entity_id))
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

    async def discard(self, message: Any, /) -> None:
        await self._router.discard(self._type, self._address, self._handler, message)


class _BoundStream(_Bound):
    __slots__ = ()

    def __call__(
        self, message: Any, /
    ) -> AbstractAsyncContextManager[AsyncIterator[Any]]:
        return self._router.stream(self._type, self._address, self._handler, message)
