"""The janitor: retention of finished persisted requests (Trio driver).

A singleton (so one runner of the cluster does it) that every
``retention_interval`` deletes requests whose final reply is older than
``retention_age``, in batches of ``retention_batch_size`` so no statement
holds locks for long; it repeats while batches come back full.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import trio

from .._errors import PersistenceError
from .._singletons import Singleton

if TYPE_CHECKING:
    from .._clock import Clock
    from .._core._config import ShardingConfig
    from .._storage_abc import MessageStorage

__all__ = ["JANITOR_NAME", "janitor"]

log = logging.getLogger("trio_cluster.janitor")

JANITOR_NAME = "trio_cluster.janitor"


def janitor(
    messages: MessageStorage, config: ShardingConfig, clock: Clock
) -> Singleton:
    """The janitor singleton for one runner's storage session."""

    async def run() -> None:
        while True:
            await trio.sleep(config.retention_interval)
            try:
                deleted = await sweep(messages, config, clock)
            except PersistenceError as exc:
                log.warning("retention sweep failed (will retry): %r", exc)
                continue
            if deleted:
                log.info("retention: deleted %d finished requests", deleted)

    return Singleton(JANITOR_NAME, run)


async def sweep(messages: MessageStorage, config: ShardingConfig, clock: Clock) -> int:
    """Delete every expired request now, batch by batch; returns how many.

    Raises:
        PersistenceError: a batch failed (the batches before it stay deleted).
    """
    total = 0
    older_than = clock.now() - config.retention_age
    while True:
        with trio.fail_after(max(config.lease_refresh_interval, 5.0)):
            deleted = await messages.delete_processed(
                older_than=older_than, limit=config.retention_batch_size
            )
        total += deleted
        if deleted < config.retention_batch_size:
            return total
