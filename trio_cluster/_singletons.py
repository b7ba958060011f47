"""Singletons: tasks that run on exactly one runner of the cluster (API).

A singleton belongs to the shard its name hashes to (in its shard group). It
runs in that shard's nursery on the runner that serves the shard, so it moves
with the shard, stops when the lease is lost, and never runs twice at once
(the shard's lock guarantees it). If it raises, it is restarted after an
exponential backoff; if it returns, it stays finished until its shard next
starts somewhere. The engine's `SingletonSupervisor` runs them.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TypeVar, cast

import attrs

from ._core._addresses import ShardId
from ._core._hashing import shard_number
from ._errors import EntityDefinitionError

T = TypeVar("T")

__all__ = ["Singleton"]


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
