"""Idle tracking: passivation after ``max_idle`` and the residency cap (Trio driver).

Theory of operation: every idle entity sits in a least-recently-used order
for its entity type (one ``dict`` per type, which keeps insertion order; all
entities of a type share ``max_idle``, so the head of each order is the next
to expire). An entity leaves the order as soon as a message is admitted, and
re-enters at the back when it goes idle. One reaper task sleeps until the
earliest head expires, so idle entities cost no task and no timer each.

The same orders give the residency cap: to make room, the oldest head across
types is passivated. Entities that called ``keep_alive()`` stay in the order
but are skipped (moved to the back) when they reach the head.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import trio

if TYPE_CHECKING:
    from collections.abc import Callable

    from ._slots import Slot

__all__ = ["IdleTracker"]


class IdleTracker:
    """Idle entities by type, in LRU order, and the reaper that passivates them.

    Args:
        passivate: called (synchronously) for each entity to passivate; it must
            take the slot out of the tracker.
    """

    def __init__(self, passivate: Callable[[Slot], None]) -> None:
        self._passivate = passivate
        self._orders: dict[str, dict[Slot, None]] = {}
        self._max_idle: dict[str, float] = {}
        self._wake = trio.Event()

    def __len__(self) -> int:
        return sum(len(order) for order in self._orders.values())

    def add(self, slot: Slot, now: float) -> None:
        """Mark ``slot`` idle since ``now`` (at the back of its type's order)."""
        name = slot.entity_type.name
        order = self._orders.get(name)
        if order is None:
            order = self._orders[name] = {}
            self._max_idle[name] = slot.entity_type.max_idle
        elif slot in order:
            del order[slot]
        if not order:
            self._wake.set()
        slot.idle_since = now
        order[slot] = None

    def remove(self, slot: Slot) -> None:
        """``slot`` is busy (or gone): forget it."""
        order = self._orders.get(slot.entity_type.name)
        if order is not None:
            order.pop(slot, None)

    def evict_one(self, now: float) -> bool:
        """Passivate the least recently used idle entity of any type (not one
        that asked to be kept alive). False if there is none."""
        for _ in range(len(self) + 1):
            oldest: Slot | None = None
            for order in self._orders.values():
                if order:
                    head = next(iter(order))
                    if oldest is None or head.idle_since < oldest.idle_since:
                        oldest = head
            if oldest is None:
                return False
            if oldest.keep_alive:
                self.add(oldest, now)
                continue
            self.remove(oldest)
            self._passivate(oldest)
            return True
        return False

    def expire(self, now: float) -> float:
        """Passivate every entity idle for at least its ``max_idle``; return
        when the next one expires (``inf`` if none)."""
        next_at = math.inf
        for name, order in self._orders.items():
            max_idle = self._max_idle[name]
            while order:
                slot = next(iter(order))
                expiry = slot.idle_since + max_idle
                if expiry > now:
                    next_at = min(next_at, expiry)
                    break
                del order[slot]
                if slot.keep_alive:
                    slot.idle_since = now
                    order[slot] = None
                    continue
                self._passivate(slot)
        return next_at

    async def run(self) -> None:
        """Reaper loop: passivate expired entities, forever.

        Cancellation stops it; entities are left as they are.
        """
        while True:
            self._wake = trio.Event()
            next_at = self.expire(trio.current_time())
            with trio.move_on_at(next_at):
                await self._wake.wait()
