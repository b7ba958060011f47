"""`Listeners`: fan a runner's lifecycle events out to its `RunnerListener`s
(Trio driver helper).

One object per runner, built by the assembly and handed to the parts that see
the events happen (sharding for shards, the shard hosts and the manager for
handlers). Handler events are on the hot path: callers test `Listeners.any`
first, so a runner without listeners pays one attribute read per handler.

A listener that raises is logged and removed, as Trio does with a failing
instrument: observing the runner must never break it.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

    from .._core._addresses import EntityAddress, RunnerAddress, ShardId
    from .._listener import RunnerListener

__all__ = ["Listeners"]

log = logging.getLogger("trio_cluster.runner")


class Listeners:
    """The listeners of one runner, and the runner's address they are told."""

    __slots__ = ("_listeners", "address", "any")

    def __init__(
        self, listeners: Sequence[RunnerListener], *, address: RunnerAddress
    ) -> None:
        self._listeners = list(listeners)
        self.address = address
        self.any = bool(self._listeners)
        """Whether there is anyone to tell (test it before building an event)."""

    def _emit(self, call: Callable[[RunnerListener], None]) -> None:
        for listener in list(self._listeners):
            try:
                call(listener)
            except Exception as exc:
                log.error(
                    "runner listener %r raised; it is removed", listener, exc_info=exc
                )
                self._listeners.remove(listener)
                self.any = bool(self._listeners)

    def runner_started(self) -> None:
        if self.any:
            self._emit(lambda listener: listener.runner_started(self.address))

    def runner_stopping(self) -> None:
        if self.any:
            self._emit(lambda listener: listener.runner_stopping(self.address))

    def shard_acquired(self, shard: ShardId, epoch: int) -> None:
        if self.any:
            self._emit(
                lambda listener: listener.shard_acquired(self.address, shard, epoch)
            )

    def shard_stopping(self, shard: ShardId, epoch: int, *, graceful: bool) -> None:
        if self.any:
            self._emit(
                lambda listener: listener.shard_stopping(
                    self.address, shard, epoch, graceful=graceful
                )
            )

    def shard_stopped(self, shard: ShardId, epoch: int) -> None:
        if self.any:
            self._emit(
                lambda listener: listener.shard_stopped(self.address, shard, epoch)
            )

    def handler_started(self, address: EntityAddress, handler: str, epoch: int) -> None:
        self._emit(
            lambda listener: listener.handler_started(
                self.address, address, handler, epoch
            )
        )

    def handler_finished(
        self, address: EntityAddress, handler: str, epoch: int
    ) -> None:
        self._emit(
            lambda listener: listener.handler_finished(
                self.address, address, handler, epoch
            )
        )
