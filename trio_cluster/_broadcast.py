"""Broadcasts: a message to every live runner, at most once each (API).

A runner declares the broadcasts it handles with `Broadcast` (a name and an
async function of one typed message). ``await runner.broadcast(name, message)``
runs the handler on this runner and sends the message to every other live
runner (with a transport), at most once each: a runner that is unreachable or
dies meanwhile misses it. Each delivery runs in its own task; an exception is
logged, never propagated. The engine's `Broadcasts` sends and runs them.
"""

from __future__ import annotations

import typing
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import attrs

from ._errors import EntityDefinitionError

T = TypeVar("T")

__all__ = ["Broadcast", "message_type"]


def _check_name(_: object, __: object, value: T) -> None:
    if not isinstance(value, str) or not value or len(value) > 200:
        raise EntityDefinitionError(
            f"a broadcast name must be 1-200 characters, got {value!r}"
        )


@attrs.frozen
class Broadcast:
    """A broadcast this runner handles: ``Broadcast("reload-config", reload)``
    with ``async def reload(msg: ReloadConfig) -> None``."""

    name: str = attrs.field(validator=_check_name)
    handler: Callable[[Any], Awaitable[None]]


def message_type(broadcast: Broadcast) -> Any:
    where = f"broadcast {broadcast.name!r}"
    try:
        hints = typing.get_type_hints(broadcast.handler)
    except Exception as exc:
        raise EntityDefinitionError(
            f"{where}: cannot resolve the handler's annotations ({exc})"
        ) from exc
    hints.pop("return", None)
    if len(hints) != 1:
        raise EntityDefinitionError(
            f"{where}: the handler takes one annotated message argument"
        )
    return next(iter(hints.values()))
