"""Broadcasts: a message to every live runner, at most once each (Trio driver).

A runner declares the broadcasts it handles with `Broadcast` (a name and an
async function of one typed message). ``await runner.broadcast(name, message)``
runs the handler on this runner and sends the message to every other live
runner (with a transport), at most once each: a runner that is unreachable or
dies meanwhile misses it. Each delivery runs in its own task; an exception is
logged, never propagated.
"""

from __future__ import annotations

import logging
import typing
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

import attrs
import trio

from ._engine._wire import Kind
from ._errors import (
    EntityDefinitionError,
    MalformedMessageError,
    RunnerUnavailableError,
)
from .serialization._converter import Codec

if TYPE_CHECKING:
    import cattrs

    from ._core._addresses import RunnerAddress
    from ._engine._sharding import Sharding
    from ._transport_abc import Endpoint

T = TypeVar("T")

__all__ = ["Broadcast", "Broadcasts"]

log = logging.getLogger("trio_cluster.broadcast")


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


class Broadcasts:
    """The broadcasts of one runner: encoding, sending and dispatching."""

    def __init__(
        self, broadcasts: Sequence[Broadcast], converter: cattrs.Converter
    ) -> None:
        self._handlers: dict[str, tuple[Broadcast, Codec[Any]]] = {}
        for broadcast in broadcasts:
            if broadcast.name in self._handlers:
                raise EntityDefinitionError(
                    f"broadcast {broadcast.name!r} is declared twice"
                )
            self._handlers[broadcast.name] = (
                broadcast,
                Codec(
                    converter, _message_type(broadcast), f"broadcast {broadcast.name}"
                ),
            )
        self.nursery: trio.Nursery | None = None
        self.endpoint: Endpoint | None = None
        self.received = 0

    async def send(self, sharding: Sharding, name: str, message: Any) -> int:
        """See `Runner.broadcast`."""
        entry = self._handlers.get(name)
        if entry is None:
            raise EntityDefinitionError(
                f"no broadcast named {name!r} is declared on this runner"
            )
        payload = entry[1].encode(message)
        self._run(name, payload)
        sent = 1
        if self.endpoint is not None:
            for runner in sharding.live:
                if runner.address == sharding.address:
                    continue
                try:
                    self.endpoint.send_nowait(
                        runner.address, [Kind.BROADCAST, name, payload]
                    )
                except RunnerUnavailableError as exc:
                    log.info(
                        "broadcast %s not sent to %s: %s", name, runner.address, exc
                    )
                else:
                    sent += 1
        await trio.lowlevel.checkpoint()
        return sent

    def received_from(self, peer: RunnerAddress, name: str, payload: bytes) -> None:
        """A peer broadcast ``name`` (called by the endpoint handler)."""
        if name not in self._handlers:
            log.warning(
                "broadcast %r from %s is not declared here; dropped", name, peer
            )
            return
        self._run(name, payload)

    def _run(self, name: str, payload: bytes) -> None:
        broadcast, codec = self._handlers[name]
        try:
            message = codec.decode(payload)
        except MalformedMessageError as exc:
            log.warning("dropped a malformed broadcast %s: %s", name, exc)
            return
        assert self.nursery is not None
        self.received += 1
        self.nursery.start_soon(self._deliver, broadcast, message)

    async def _deliver(self, broadcast: Broadcast, message: Any) -> None:
        try:
            await broadcast.handler(message)
        except Exception as exc:
            log.error("broadcast handler %s failed", broadcast.name, exc_info=exc)


def _message_type(broadcast: Broadcast) -> Any:
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
