"""`current_cluster_state`: where the calling code runs in the cluster (API).

One lookup answers the questions a handler (or a singleton, or any task of a
runner) asks about its place in the cluster: which runner, which entity, the
epoch of the lease it runs under, which singleton. Nothing is set per call
for it: the runner and the entity are the context variables the runtime sets
anyway (`trio_cluster._context`), the shard epoch is read from the entity's
own slot (each incarnation knows the shard host it lives in), and a singleton
sets its name and epoch once, when its task starts.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import attrs

from ._call_metadata import EMPTY_METADATA, current_metadata
from ._context import current_entity_var, current_singleton_var, runner_context
from ._core._addresses import EntityAddress, RunnerAddress

__all__ = ["ClusterState", "current_cluster_state"]


@attrs.frozen
class ClusterState:
    """Where the calling code runs, as `current_cluster_state` sees it."""

    runner: RunnerAddress
    """The runner the code runs on."""
    address: EntityAddress | None
    """The entity whose handler (or ``on_start``/``on_stop``) is running;
    None outside entity code (a singleton, a task of the runner)."""
    shard_epoch: int | None
    """The lease epoch under which this runner serves the shard the code
    runs in: the entity's shard, or the singleton's; None elsewhere. It grows
    each time the shard is acquired, so it fences work (e.g. writes to an
    external system) against a later owner of the shard."""
    singleton: str | None
    """The name of the singleton whose task (or a task it started) is
    running; None elsewhere, entity handlers it calls included."""
    metadata: Mapping[str, str] = attrs.field(
        factory=lambda: EMPTY_METADATA, kw_only=True
    )
    """The call metadata in effect (`trio_cluster.current_metadata`)."""


def current_cluster_state() -> ClusterState:
    """Where the calling code runs: its runner, entity, shard epoch and
    singleton, and the call metadata in effect.

    Works in entity handlers on every path (in the caller's task or a task
    of the runner, streams, persisted and transactional handlers,
    ``on_start`` and ``on_stop``), in singletons and in any task started
    inside ``open_runner``. Cheap (a few context lookups), but not free: read
    it when needed rather than on every message.

    Raises:
        NoCurrentRunnerError: called outside a runner's tasks and handlers.
    """
    runner = runner_context().address
    address: EntityAddress | None = None
    epoch: int | None = None
    name: str | None = None
    entity = current_entity_var.get()
    if entity is not None:
        address, epoch = entity.address, _epoch_of(entity)
    else:
        singleton = current_singleton_var.get()
        if singleton is not None:
            name, epoch = singleton
    return ClusterState(
        runner=runner,
        address=address,
        shard_epoch=epoch,
        singleton=name,
        metadata=current_metadata(),
    )


def _epoch_of(entity: Any) -> int | None:
    """The epoch of the shard host of an entity incarnation (its slot knows
    it; an instance made outside the runtime has none)."""
    slot = getattr(entity, "_tc_slot", None)
    if slot is None:
        return None
    epoch: int = slot.shard.epoch
    return epoch
