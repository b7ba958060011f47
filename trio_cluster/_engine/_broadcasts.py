"""`Broadcasts`: encoding, sending and running a runner's broadcasts (Trio driver).

See `trio_cluster._broadcast` for what a broadcast is. Each delivery runs in
its own task of `Broadcasts.run`'s nursery, started in the runner's base
context (`_isolation`), never in the sender's; an exception is logged, never
propagated.
"""

from __future__ import annotations

import logging
from contextvars import Context
from typing import TYPE_CHECKING, Any

import attrs
import trio

from .._broadcast import message_type
from .._errors import (
    EntityDefinitionError,
    MalformedMessageError,
    RunnerUnavailableError,
)
from .._log_limit import LogLimiter
from .._transport_abc import Endpoint
from ..serialization._converter import Codec
from ._isolation import spawn
from ._shard_table import ShardTable
from ._wire import Kind

if TYPE_CHECKING:
    from collections.abc import Sequence

    import cattrs

    from .._broadcast import Broadcast
    from .._core._addresses import RunnerAddress

__all__ = ["BroadcastCodecs", "Broadcasts", "broadcast_codecs"]

log = logging.getLogger("trio_cluster.broadcast")


BroadcastCodecs = dict[str, tuple["Broadcast", Codec[Any]]]
"""Each declared broadcast, by name, with the codec of its message."""


def broadcast_codecs(
    broadcasts: Sequence[Broadcast], converter: cattrs.Converter
) -> BroadcastCodecs:
    """Check the declared broadcasts and build their codecs (eagerly, before
    a runner starts).

    Raises:
        EntityDefinitionError: a name is declared twice, or a handler's
            message type cannot be read.
    """
    codecs: BroadcastCodecs = {}
    for broadcast in broadcasts:
        if broadcast.name in codecs:
            raise EntityDefinitionError(
                f"broadcast {broadcast.name!r} is declared twice"
            )
        codecs[broadcast.name] = (
            broadcast,
            Codec(converter, message_type(broadcast), f"broadcast {broadcast.name}"),
        )
    return codecs


@attrs.define(eq=False)
class Broadcasts:
    """The broadcasts of one runner: encoding, sending and dispatching."""

    _codecs: BroadcastCodecs
    _shards: ShardTable = attrs.field(kw_only=True)
    _endpoint: Endpoint | None = attrs.field(kw_only=True)
    _context: Context = attrs.field(kw_only=True)
    """The runner's base context: deliveries start in a copy of it."""
    _nursery: trio.Nursery | None = attrs.field(init=False, default=None)
    received: int = attrs.field(init=False, default=0)
    warnings: LogLimiter = attrs.field(
        init=False, factory=lambda: LogLimiter(logger=log)
    )
    """Bounds what a peer's broadcasts make this log (issue 12, item 8)."""

    async def run(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Run the deliveries' tasks until cancelled."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            await trio.sleep_forever()

    async def send(self, name: str, message: Any) -> int:
        """See `Runner.broadcast`."""
        entry = self._codecs.get(name)
        if entry is None:
            raise EntityDefinitionError(
                f"no broadcast named {name!r} is declared on this runner"
            )
        payload = entry[1].encode(message)
        self._run(self._shards.address, name, payload)
        sent = 1
        if self._endpoint is not None:
            for runner in self._shards.live:
                if runner.address == self._shards.address:
                    continue
                try:
                    self._endpoint.send_nowait(
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
        if name not in self._codecs:
            self.warnings.warning(
                peer,
                "undeclared broadcasts",
                "broadcast %r from %s is not declared here; dropped",
                name,
                peer,
            )
            return
        self._run(peer, name, payload)

    def _run(self, sender: RunnerAddress, name: str, payload: bytes) -> None:
        broadcast, codec = self._codecs[name]
        try:
            message = codec.decode(payload)
        except MalformedMessageError as exc:
            self.warnings.warning(
                sender,
                "malformed broadcasts",
                "dropped a malformed broadcast %s from %s: %s",
                name,
                sender,
                exc,
            )
            return
        assert self._nursery is not None, "Broadcasts.run has started"
        self.received += 1
        spawn(self._context, self._nursery, self._deliver, broadcast, message)

    async def _deliver(self, broadcast: Broadcast, message: Any) -> None:
        try:
            await broadcast.handler(message)
        except Exception as exc:
            log.error("broadcast handler %s failed", broadcast.name, exc_info=exc)
