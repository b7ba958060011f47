"""Typed handles of a gateway client: ``client.entities(Counter)("a")`` is
typed as ``Counter``, its handler attributes call through the client (Trio
driver, client side)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Generic, TypeVar, cast

from .._entity import Entity

if TYPE_CHECKING:
    from ._client import GatewayClient

__all__ = ["EntityHandles", "Handle"]

E = TypeVar("E", bound=Entity)


class EntityHandles(Generic[E]):
    def __init__(self, client: GatewayClient, cls: type[E]) -> None:
        self._client = client
        self._cls = cls

    def __call__(self, entity_id: str) -> E:
        return cast("E", Handle(self._client, self._cls, entity_id))


class Handle:
    """A typed handle: its handler attributes call through the client."""

    def __init__(self, client: GatewayClient, cls: type, key: str | None) -> None:
        self._client = client
        self._cls = cls
        self._key = key
        self._prefix = cls.type_name if key is not None else cls.name  # type: ignore[attr-defined]

    def __getattr__(self, name: str) -> Any:
        spec = getattr(getattr(self._cls, name, None), "spec", None)
        if spec is None:
            raise AttributeError(f"{self._cls.__qualname__} has no handler {name!r}")
        op = f"{self._prefix}.{spec.name}"
        client, key = self._client, self._key
        route = client._routes[op]
        if spec.kind == "stream":
            return lambda message, credit=16: client._stream(
                route, op, key, message, credit
            )

        async def call(message: Any) -> Any:
            return await client._call(route, op, key, message)

        return call
