"""The singleton supervisor: runs each `Singleton` in its shard (Trio driver).

A singleton starts in its shard's nursery when the shard starts serving here,
so it moves with the shard and stops when the lease is lost. If it raises, it
is restarted after an exponential backoff; if it returns, it stays finished
until its shard next starts somewhere.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import trio

from .._context import current_runner_var, current_singleton_var
from .._core._retry import Backoff

if TYPE_CHECKING:
    from collections.abc import Sequence

    from .._context import RunnerContext
    from .._core._addresses import ShardId
    from .._core._config import ShardingConfig
    from .._singletons import Singleton
    from ._slots import ShardHost

__all__ = ["SingletonSupervisor"]

log = logging.getLogger("trio_cluster.singleton")


class SingletonSupervisor:
    """Starts singletons in their shards' nurseries and restarts them."""

    def __init__(
        self, singletons: Sequence[Singleton], *, config: ShardingConfig
    ) -> None:
        self._by_shard: dict[ShardId, list[Singleton]] = {}
        for singleton in singletons:
            self._by_shard.setdefault(
                singleton.shard(config.shards_per_group), []
            ).append(singleton)
        self._backoff = Backoff(
            config.entity_restart_backoff, config.entity_restart_backoff_max
        )
        self.running: set[str] = set()
        self.restarts = 0

    def shard_started(self, host: ShardHost) -> None:
        for singleton in self._by_shard.get(host.shard_id, ()):
            assert host.nursery is not None
            host.nursery.start_soon(
                self._supervise, singleton, current_runner_var.get(None), host.epoch
            )

    async def _supervise(
        self, singleton: Singleton, runner: RunnerContext | None, epoch: int
    ) -> None:
        if runner is not None:
            current_runner_var.set(runner)
        # In this task's own context: `current_cluster_state` names the
        # singleton (and its shard's epoch) here and in tasks it starts.
        current_singleton_var.set((singleton.name, epoch))
        attempt = 0
        self.running.add(singleton.name)
        try:
            while True:
                try:
                    await singleton.run()
                except Exception as exc:
                    delay = self._backoff.delay(attempt)
                    attempt += 1
                    self.restarts += 1
                    log.error(
                        "singleton %s crashed; restarting in %.2f s",
                        singleton.name,
                        delay,
                        exc_info=exc,
                    )
                    await trio.sleep(delay)
                    continue
                log.info("singleton %s finished", singleton.name)
                return
        finally:
            self.running.discard(singleton.name)
