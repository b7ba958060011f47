"""Singletons: tasks that run on exactly one runner of the cluster (Trio driver).

A singleton belongs to the shard its name hashes to (in its shard group). It
runs in that shard's nursery on the runner that serves the shard, so it moves
with the shard, stops when the lease is lost, and never runs twice at once
(the shard's lock guarantees it). If it raises, it is restarted after an
exponential backoff; if it returns, it stays finished until its shard next
starts somewhere.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, TypeVar, cast

import attrs
import trio

from ._context import current_runner_var
from ._core._addresses import ShardId
from ._core._hashing import shard_number
from ._core._retry import Backoff
from ._errors import EntityDefinitionError

if TYPE_CHECKING:
    from ._core._config import ShardingConfig
    from ._engine._slots import ShardHost

T = TypeVar("T")

__all__ = ["Singleton", "SingletonSupervisor"]

log = logging.getLogger("trio_cluster.singleton")


def _check_name(_: object, __: object, value: T) -> None:
    if not isinstance(value, str) or not value or len(value) > 200:
        raise EntityDefinitionError(
            f"a singleton name must be 1-200 characters, got {value!r}"
        )


def _check_run(_: object, __: object, value: Callable[[], Awaitable[None]]) -> None:
    if not callable(cast("object", value)):
        raise EntityDefinitionError(
            f"a singleton's run must be an async function, got {value!r}"
        )


@attrs.frozen
class Singleton:
    """A task that runs on exactly one runner of the cluster at a time.

    Example: ``Singleton("janitor", janitor)`` where ``async def janitor()``
    runs forever. Use ``trio_cluster.current_runner()`` inside it to reach
    entities.
    """

    name: str = attrs.field(validator=_check_name)
    """Stable name; it decides the singleton's shard."""
    run: Callable[[], Awaitable[None]] = attrs.field(validator=_check_run)
    """The task. Cancelled when its shard stops being served here."""
    shard_group: str = "default"

    def shard(self, shards_per_group: int) -> ShardId:
        """The shard this singleton lives in."""
        return ShardId(self.shard_group, shard_number(self.name, shards_per_group))


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
                self._supervise, singleton, current_runner_var.get(None)
            )

    async def _supervise(self, singleton: Singleton, runner: object) -> None:
        if runner is not None:
            current_runner_var.set(runner)  # type: ignore[arg-type]
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
