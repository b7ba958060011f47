"""News about persisted requests between runners (Trio driver).

A request stored unclaimed is announced to its shard's owner directly over
the transport when that is another runner, so it claims at once (else the
local read loop is woken). Storage notifications are the fallback, and carry
what no direct notice can: requests available on a shard (`MessagesAvailable`),
final replies recorded by another runner (`RepliesAvailable`), and
interruptions (`RequestsInterrupted`), and changes of the registered runners
(`RunnersChanged`, handed to sharding through the `ShardTable`). When
notifications may have been
lost (`NotificationsMissed`: the backend's connection for them was down),
every served shard is claimed and every reply awaited from elsewhere fetched.
Replies awaited from elsewhere are also fetched every
``storage_poll_interval`` while there are any.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import attrs
import trio

from .._errors import PersistenceError
from .._storage_abc import (
    MessagesAvailable,
    NotificationsMissed,
    RepliesAvailable,
    RequestsInterrupted,
    RunnersChanged,
)
from ._claims import Claims
from ._delivery import DeliveryParts
from ._replies import ReplyRecorder
from ._waiters import send_directly
from ._wire import Kind, address_fields

if TYPE_CHECKING:
    from .._core._addresses import EntityAddress, RunnerAddress

__all__ = ["Notices"]

log = logging.getLogger("trio_cluster.persisted")


@attrs.define(eq=False)
class Notices:
    """Direct notices to other runners, and the loops that read storage's
    notifications and poll for replies."""

    _parts: DeliveryParts
    _recorder: ReplyRecorder
    _claims: Claims

    def notice_owner(
        self,
        address: EntityAddress,
        request_id: int,
        wants_reply: bool,
        deliver_at: float | None,
    ) -> None:
        """A request was stored unclaimed: tell its owner (directly if it is
        another runner, so it claims now), else wake the local read loop."""
        owner = self._parts.shards.assignment.get(address.shard)
        if (
            owner is None
            or owner == self._parts.shards.address
            or deliver_at is not None
        ):
            self._parts.signal.nudge(deliver_at)
            return
        sent = send_directly(
            self._parts.endpoint,
            owner,
            [Kind.PERSISTED, request_id, *address_fields(address), wants_reply],
        )
        if sent and wants_reply:
            self._parts.waiters.expect_from(request_id, owner)

    def remote_notice(
        self, request_id: int, address: EntityAddress, reply_to: RunnerAddress | None
    ) -> None:
        """Another runner stored ``request_id`` for a shard served here."""
        if reply_to is not None:
            self._parts.waiters.reply_to(request_id, reply_to)
        if address.shard in self._parts.shards.hosts:
            self._parts.signal.nudge()

    async def notification_loop(self) -> None:
        """Act on storage notifications, until cancelled."""
        served = self._parts.shards.hosts
        recording = self._recorder.recording
        while True:
            try:
                notifications = await self._parts.storage.wait_notifications()
            except PersistenceError as exc:
                log.warning("storage notifications failed: %r", exc)
                await trio.sleep(min(1.0, self._parts.config.storage_poll_interval))
                continue
            replies: set[int] = set()
            for note in notifications:
                if isinstance(note, MessagesAvailable):
                    if any(shard in served for shard in note.shards):
                        self._parts.signal.nudge(note.deliver_at)
                elif isinstance(note, RepliesAvailable):
                    for rid in note.request_ids:
                        if rid in recording:
                            recording[rid] = True
                        elif rid in self._parts.waiters:
                            replies.add(rid)
                elif isinstance(note, RequestsInterrupted):
                    for request_id in note.request_ids:
                        self._parts.manager.interrupt(request_id)
                        self._claims.interrupt(request_id)
                elif isinstance(note, RunnersChanged):
                    self._parts.shards.runners_changed()
                elif isinstance(note, NotificationsMissed):
                    self._parts.signal.nudge()
                    replies.update(self._awaited_elsewhere())
                    self._parts.shards.runners_changed()
            if replies:
                await self._recorder.fetch_final(sorted(replies))

    def _awaited_elsewhere(self) -> list[int]:
        """Requests callers here wait for that are handled elsewhere."""
        return [
            rid
            for rid in self._parts.waiters
            if rid not in self._parts.manager.persisted_jobs
        ]

    async def reply_poll_loop(self) -> None:
        """Fetch the replies callers here wait for that are handled
        elsewhere, every ``storage_poll_interval``, until cancelled."""
        while True:
            await trio.sleep(self._parts.config.storage_poll_interval)
            remote = self._awaited_elsewhere()
            if remote:
                await self._recorder.fetch_final(remote)
