"""Running a locally sent persisted request in its caller's task (Trio driver).

When the sender serves the entity's shard, its request is saved already
claimed (see `_persisted`). If the entity is idle, the sender's task then
runs the handler itself, as it would a volatile call (`EntityManager.call`),
and records the reply itself (`ReplyRecorder.record_here`): no task is
spawned for the job nor for its reply, and the caller wakes once per write
(the request's, then the reply's), not once more per task in between.

Nothing else changes:

* the request was stored before the handler runs; the reply is recorded
  fenced by the shard's epoch, once, and wakes every waiter as usual;
* the job is a persisted job like the others (`EntityManager.persisted_jobs`):
  an `interrupt` cancels it, a crash of its entity or a failed transaction
  puts it back in the mailbox, where it runs again in a task of its own with
  the recorder as its sink; a shard that stops, or a lease that runs out,
  cancels it and nothing is recorded (the next owner delivers it again);
* a transactional handler runs in its transaction (``around``), its reply
  written in it;
* an entity that is busy (running, or with messages queued), paused or
  waiting for room under ``max_resident_entities`` gets the request queued,
  as a delivery in a task of its own does.

Cancellation: the caller's cancellation is the handler's, as for a volatile
call. The handler is interrupted; the interrupted reply is recorded in a
task of its own, and the cancellation propagates (the caller then stores the
interruption, as it does for a request run elsewhere). A caller cancelled
while its reply is being written leaves that write to a task of its own
(`ReplyRecorder.record_here`).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import attrs

from .._core._job import JobState
from ._claims import Claims
from ._manager import EntityManager
from ._outcomes import interrupted
from ._replies import ReplyRecorder

if TYPE_CHECKING:
    from collections.abc import Mapping

    from .._core._addresses import EntityAddress
    from .._registry import EntityType, Handler
    from ._slots import ShardHost

__all__ = ["InlinePersisted"]

log = logging.getLogger("trio_cluster.persisted")


@attrs.define(eq=False)
class InlinePersisted:
    """Runs claimed requests of local callers in the callers' tasks.

    Args:
        manager: runs the jobs.
        recorder: records their replies.
        claims: submits the requests (`Claims.deliver`).
    """

    _manager: EntityManager
    _recorder: ReplyRecorder
    _claims: Claims
    ran: int = attrs.field(init=False, default=0)
    """Requests run in their callers' tasks so far."""

    async def run(
        self,
        host: ShardHost,
        address: EntityAddress,
        entity_type: EntityType,
        handler: Handler,
        message: Any,
        request_id: int,
        metadata: Mapping[str, str] | None,
    ) -> None:
        """Run a request saved claimed under ``host``'s epoch in the current
        task if its entity is idle, and record its reply; otherwise it is
        queued, as `Claims.deliver` queues it. Either way the caller then waits for the final
        reply as usual (it is there already when it was recorded here).

        Raises:
            trio.Cancelled: the caller was cancelled; the handler, if it ran,
                was interrupted, and its interrupted reply is being recorded
                (see the module docstring).
        """
        job = self._claims.deliver(
            host,
            address,
            entity_type,
            handler,
            message,
            request_id,
            metadata,
            here=True,
        )
        if job is None or job.state is not JobState.GRANTED:
            return  # queued (it runs in a task of its own), or not ours
        self.ran += 1
        try:
            exit_ = await self._manager.run_here(job)
        except BaseException:
            # The handler was interrupted by its caller (or never started):
            # its interrupted reply, as `EntityManager.interrupt` would have
            # it recorded for a job running in a task of its own. Not past
            # the lease: the next owner answers the stored interruption.
            if host.leased():
                try:
                    self._recorder.record_soon(
                        host,
                        request_id,
                        handler.reply.encode_exit(interrupted(request_id)),
                    )
                except RuntimeError:  # shutting down: the next owner redelivers
                    log.debug("interrupted reply to %d not recorded", request_id)
            raise
        if exit_ is not None:
            await self._recorder.record_here(job, exit_)
