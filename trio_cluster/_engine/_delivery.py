"""`DeliveryParts`: what the parts of persisted delivery share, and
`ClaimSignal`, how they wake the read loop (Trio driver).

`PersistedDelivery` builds one `DeliveryParts` and hands it to its parts (the
read loop in `_claims`, the notices in `_notices`, the reply recorder in
`_replies`), instead of passing each the same six collaborators.
"""

from __future__ import annotations

import math

import attrs
import trio

from .._clock import Clock
from .._core._config import ShardingConfig
from .._registry import Registry
from .._storage_abc import MessageStorage
from .._transport_abc import Endpoint
from ._manager import EntityManager
from ._shard_table import ShardTable
from ._waiters import ReplyWaiters

__all__ = ["ClaimSignal", "DeliveryParts"]


class ClaimSignal:
    """When the read loop claims next: now (`nudge`), at the earliest known
    ``deliver_at``, or after the poll interval."""

    def __init__(self) -> None:
        self._wake = trio.Event()
        self.starved = False
        """The read loop waits for in-flight persisted jobs to finish
        (``max_persisted_in_flight``): wake it when a reply is recorded."""
        self.next_deliver_at = math.inf
        """Wall time of the earliest request known to become deliverable."""

    def nudge(self, deliver_at: float | None = None) -> None:
        """Wake the read loop (now, or at ``deliver_at`` wall time)."""
        if deliver_at is not None:
            self.next_deliver_at = min(self.next_deliver_at, deliver_at)
        self._wake.set()

    def wake_if_starved(self) -> None:
        """A reply was recorded: budget may be free again."""
        if self.starved:
            self._wake.set()

    def rearm(self) -> None:
        """Forget earlier nudges: the loop is about to claim."""
        self._wake = trio.Event()

    async def wait(self) -> None:
        """Wait for a nudge (since the last `rearm`)."""
        await self._wake.wait()


@attrs.frozen(eq=False)
class DeliveryParts:
    """The collaborators every part of one runner's persisted delivery uses."""

    storage: MessageStorage
    """The storage session's messages."""
    shards: ShardTable
    """The shards served here, and the assignment."""
    manager: EntityManager
    """Runs the delivered requests."""
    registry: Registry
    """Decodes the stored messages."""
    config: ShardingConfig
    clock: Clock
    """Wall clock of persisted times."""
    endpoint: Endpoint | None
    """This runner's transport endpoint, if it has one."""
    signal: ClaimSignal
    """Wakes the read loop."""
    waiters: ReplyWaiters
    """Callers (here and on other runners) waiting for replies."""
