"""Notifications coalesced by kind (shared by the storage backends)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from trio_cluster._storage_abc import (
    MessagesAvailable,
    Notification,
    RepliesAvailable,
    RequestsInterrupted,
    RunnersChanged,
)

if TYPE_CHECKING:
    from collections.abc import Iterable

    from trio_cluster._core._addresses import ShardId

__all__ = ["Coalescer"]


class Coalescer:
    """Pending notifications, one per kind, in order of first arrival: shards
    and ids accumulate, ``deliver_at`` keeps the earliest."""

    def __init__(self) -> None:
        self.kinds: dict[type, None] = {}
        self.shards: set[ShardId] = set()
        self.deliver_at: float | None = None
        self.reply_ids: set[int] = set()
        self.interrupt_ids: set[int] = set()
        self.interrupt_shards: set[ShardId] = set()

    def add_messages(
        self, shards: Iterable[ShardId], deliver_at: float | None = None
    ) -> None:
        self.kinds[MessagesAvailable] = None
        self.shards.update(shards)
        if deliver_at is not None and (
            self.deliver_at is None or deliver_at < self.deliver_at
        ):
            self.deliver_at = deliver_at

    def add_replies(self, reply_ids: Iterable[int]) -> None:
        self.kinds[RepliesAvailable] = None
        self.reply_ids.update(reply_ids)

    def add_interrupts(self, ids: Iterable[int], shards: Iterable[ShardId]) -> None:
        """Interrupted requests (callers also `add_messages` their shards: an
        interrupted request becomes claimable, as interrupted)."""
        self.kinds[RequestsInterrupted] = None
        self.interrupt_ids.update(ids)
        self.interrupt_shards.update(shards)

    def add_runners_changed(self) -> None:
        self.kinds[RunnersChanged] = None

    def take(self) -> list[Notification]:
        """The pending notifications; nothing is pending afterwards."""
        taken: list[Notification] = []
        for kind in self.kinds:
            if kind is MessagesAvailable:
                taken.append(MessagesAvailable(frozenset(self.shards), self.deliver_at))
            elif kind is RepliesAvailable:
                taken.append(RepliesAvailable(frozenset(self.reply_ids)))
            elif kind is RunnersChanged:
                taken.append(RunnersChanged())
            else:
                taken.append(
                    RequestsInterrupted(
                        frozenset(self.interrupt_ids), frozenset(self.interrupt_shards)
                    )
                )
        self.kinds.clear()
        self.shards.clear()
        self.deliver_at = None
        self.reply_ids.clear()
        self.interrupt_ids.clear()
        self.interrupt_shards.clear()
        return taken
