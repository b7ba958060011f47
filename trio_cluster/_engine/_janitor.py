"""The janitor: retention of finished persisted requests (Trio driver).

A singleton (so one runner of the cluster does it) that every
``retention_interval`` deletes requests whose final reply is older than
``retention_age``, in batches of ``retention_batch_size`` so no statement
holds locks for long; it repeats while batches come back full.

It also keeps the event bus's log (when the storage session has one):
events older than ``retention_age`` that every cursor of their partition
has passed, and events older than ``EVENT_HARD_RETENTION_FACTOR`` times
``retention_age`` whatever the cursors say (a subscription that stopped
consuming cannot keep the log forever).
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
    from .._storage_events import EventStorage

__all__ = ["JANITOR_NAME", "janitor"]

log = logging.getLogger("trio_cluster.janitor")

JANITOR_NAME = "trio_cluster.janitor"
EVENT_HARD_RETENTION_FACTOR = 7


def janitor(
    messages: MessageStorage,
    config: ShardingConfig,
    clock: Clock,
    events: EventStorage | None = None,
) -> Singleton:
    """The janitor singleton for one runner's storage session."""

    async def run() -> None:
        while True:
            await trio.sleep(config.retention_interval)
            try:
                deleted = await sweep(messages, config, clock)
                if events is not None:
                    gone = await sweep_events(events, config, clock)
                    if gone:
                        log.info("retention: deleted %d events", gone)
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


async def sweep_events(
    events: EventStorage, config: ShardingConfig, clock: Clock
) -> int:
    """Delete every expired event now, batch by batch; returns how many.

    Raises:
        PersistenceError: a batch failed (the batches before it stay deleted).
    """
    total = 0
    now = clock.now()
    while True:
        with trio.fail_after(max(config.lease_refresh_interval, 5.0)):
            deleted = await events.delete_events(
                older_than=now - config.retention_age,
                hard_older_than=now
                - EVENT_HARD_RETENTION_FACTOR * config.retention_age,
                limit=config.retention_batch_size,
            )
        total += deleted
        if deleted < config.retention_batch_size:
            return total
