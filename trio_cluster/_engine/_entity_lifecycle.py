"""Entity lifecycle: incarnations, crashes, passivation and shard stop (Trio driver).

Theory of operation:

* A slot (an entity on this runner) is created by its first message, within
  ``max_resident_entities``: at the cap, the least recently used idle entity
  is passivated to make room (`EntityLifecycle.add_slot`).
* Its incarnation (the user's object) is created, and ``on_start`` runs, when
  the first handler is about to run (`activate`, or the manager's one-step
  fast path with `new_instance`).
* ``on_start``, ``on_stop`` and the tasks started here run in the runner's
  base context (`_isolation`), never in that of the task that happened to
  crash, passivate or stop the entity.
* An undeclared exception crashes the incarnation (`EntityLifecycle.crash`):
  the mailbox pauses, sibling handlers are cancelled, ``on_stop`` runs, and
  the mailbox resumes after an exponential backoff with a fresh incarnation
  to come. A job whose work could not be kept (`RetryLater`, e.g. a failed
  commit) backs off the same way (`EntityLifecycle.retry_later`).
* An entity idle for its ``max_idle`` is passivated (``on_stop``, then
  forgotten); `IdleTracker` keeps the order and the timer.
* Stopping a shard bounces its queued jobs, lets running handlers finish
  (graceful) within the termination timeout, runs ``on_stop`` hooks and
  forgets the shard's entities.

Jobs themselves (starting them, bouncing them) belong to the entity manager;
this module reaches them through the small `JobStarter` protocol, so it does
not import the manager.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Protocol

import trio

from .._context import current_entity_var
from .._core._job import StopReason
from .._core._retry import Backoff
from .._errors import MailboxFullError
from ._isolation import run_in, spawn
from ._passivation import IdleTracker
from ._slots import ShardState, Slot

if TYPE_CHECKING:
    from contextvars import Context

    from .._core._config import ShardingConfig
    from .._entity import Entity
    from ._outcomes import RetryLater
    from ._slots import Job, ShardHost

__all__ = ["EntityLifecycle", "JobStarter", "activate", "new_instance"]

log = logging.getLogger("trio_cluster.entity")


class JobStarter(Protocol):
    """What the lifecycle needs from the owner of the jobs (the manager)."""

    def start(self, slot: Slot, job: Job) -> None:
        """Start a job the slot's mailbox just granted a permit."""

    def bounce(self, job: Job) -> None:
        """A queued job will not run here: its shard stops."""


class EntityLifecycle:
    """The lives of the entities of the shards this runner serves.

    Args:
        config: ``max_resident_entities``, the restart backoff and the
            termination timeout.
        jobs: starts and bounces jobs (the manager).
        context: the runner's base context (`_isolation.base_context`).
    """

    def __init__(
        self, *, config: ShardingConfig, jobs: JobStarter, context: Context
    ) -> None:
        self._jobs = jobs
        self._context = context
        self._cap = config.max_resident_entities
        self._termination_timeout = config.entity_termination_timeout
        self._backoff = Backoff(
            config.entity_restart_backoff, config.entity_restart_backoff_max
        )
        self.idle = IdleTracker(self._passivate)
        """Idle entities, for passivation and the residency cap."""
        self.resident = 0
        """Slots on this runner."""
        self.crashes = 0
        """Incarnations crashed so far."""

    def add_slot(self, slot: Slot, *, force: bool) -> Slot:
        """Add the new slot of an entity that has none to its shard, making
        room under ``max_resident_entities`` if needed (unless ``force``).

        Raises:
            MailboxFullError: the runner is at the cap and no entity is idle.
        """
        if (
            self._cap is not None
            and self.resident >= self._cap
            and not self.idle.evict_one(trio.current_time())
            and not force
        ):
            raise MailboxFullError(
                address=str(slot.address),
                reason="runner at max_resident_entities, none idle",
            )
        slot.shard.slots[slot.address] = slot
        self.resident += 1
        return slot

    def after_change(self, slot: Slot) -> None:
        """The slot's mailbox changed: if it went idle, track it for
        passivation, or forget it if there is nothing worth keeping."""
        if not slot.idle or slot.stopping or slot.paused:
            return
        if slot.shard.state is not ShardState.ACTIVE:
            return
        if slot.instance is None and slot.crashes == 0:
            self._drop(slot)  # nothing worth keeping: recreate on demand
            return
        self.idle.add(slot, trio.current_time())

    # ------------------------------------------------------------------
    # Crash and restart

    def crash(self, slot: Slot, job: Job) -> None:
        """``job``'s handler crashed the incarnation: pause the mailbox,
        cancel the sibling handlers, and restart after the backoff."""
        self.crashes += 1
        old = slot.instance
        slot.instance = None
        slot.crashes += 1
        slot.pause()
        if slot.running_jobs:
            for other in slot.running_jobs:
                if other is not job and other.scope is not None:
                    other.stop_reason = StopReason.SIBLING_CRASHED
                    other.scope.cancel()
        delay = self._backoff.delay(slot.crashes - 1)
        nursery = slot.shard.nursery
        assert nursery is not None
        spawn(self._context, nursery, self._restart_later, slot, old, delay)

    def retry_later(
        self, slot: Slot, job: Job, crashes: int, failure: RetryLater
    ) -> bool:
        """``job``'s `Around` could not keep its work (``failure``): whether
        to run it again after a backoff, counted as a crash (else the shard's
        next owner claims it). ``crashes``: the slot's count before the job
        ran."""
        # The handler may have succeeded (resetting the count) but its work
        # was not kept: back off further each time.
        slot.crashes = crashes
        # If the shard stopped meanwhile (a storage outage often does both),
        # the job is not requeued in its dead slot: the shard's next owner
        # claims the request again.
        retry = slot.shard.active
        log.warning(
            "%s for %s failed (%s); %s",
            job.handler.what,
            slot.address,
            failure.__cause__ or failure,
            "retrying after a backoff"
            if retry
            else "its shard stopped, so it is left for the next owner",
        )
        if retry:
            if slot.paused:
                # Already crashed in this run (the handler's own error, e.g.
                # its statement met the failure), or by a sibling: its
                # restart is on the way.
                slot.crashes = crashes + 1
            else:
                self.crash(slot, job)
        return retry

    async def _restart_later(
        self, slot: Slot, old: Entity | None, delay: float
    ) -> None:
        if old is not None and slot.entity_type.has_on_stop:
            await self.run_on_stop(old)
        await trio.sleep(delay)
        self._resume(slot)

    def _resume(self, slot: Slot) -> None:
        for job in slot.resume():
            self._jobs.start(slot, job)
        self.after_change(slot)

    async def run_on_stop(self, instance: Entity) -> None:
        """Run ``on_stop`` within the termination timeout, in a fresh copy of
        the base context; its failure or timeout is logged, not raised."""
        with trio.move_on_after(self._termination_timeout) as scope:
            try:
                await run_in(self._context.copy(), _on_stop(instance))
            except Exception as exc:
                log.warning(
                    "on_stop of %s failed: %r", instance.address, exc, exc_info=exc
                )
        if scope.cancelled_caught:
            log.warning(
                "on_stop of %s was cancelled after the termination timeout",
                instance.address,
            )

    # ------------------------------------------------------------------
    # Passivation and shard stop

    def _passivate(self, slot: Slot) -> None:
        instance = slot.instance
        if instance is None or not slot.entity_type.has_on_stop:
            self._drop(slot)
            return
        slot.stopping = True
        slot.pause()
        nursery = slot.shard.nursery
        assert nursery is not None
        spawn(self._context, nursery, self._stop_incarnation, slot, instance)

    async def _stop_incarnation(self, slot: Slot, instance: Entity) -> None:
        await self.run_on_stop(instance)
        slot.instance = None
        slot.stopping = False
        self._resume(slot)

    def _drop(self, slot: Slot) -> None:
        self.idle.remove(slot)
        if slot.shard.slots.pop(slot.address, None) is not None:
            self.resident -= 1

    async def stop_shard(self, shard: ShardHost, *, graceful: bool) -> None:
        """Stop serving a shard: bounce queued messages, then (graceful) wait
        for running handlers and run ``on_stop`` hooks within the termination
        timeout; finally cancel whatever is left and forget the entities.

        Call it shielded: it is cleanup and must finish.
        """
        shard.state = ShardState.STOPPING
        slots = list(shard.slots.values())
        for slot in slots:
            self.idle.remove(slot)
            slot.pause()
            for job in slot.drain():
                self._jobs.bounce(job)
        if graceful:
            with trio.move_on_after(self._termination_timeout):
                while shard.running:
                    shard.idle_event = trio.Event()
                    await shard.idle_event.wait()
                for slot in slots:
                    if slot.instance is not None and slot.entity_type.has_on_stop:
                        await self.run_on_stop(slot.instance)
        shard.cancel_all()
        for slot in slots:
            slot.instance = None
        self.resident -= len(shard.slots)
        shard.slots.clear()
        shard.state = ShardState.STOPPED


# ----------------------------------------------------------------------
# Incarnations


async def activate(slot: Slot) -> Entity:
    """Return the slot's incarnation, creating it (and running ``on_start``)
    if needed. Must run inside the job's scope and in the job's context (a
    copy of the base context: see `_isolation`)."""
    while slot.starting is not None:
        await slot.starting.wait()
    if slot.instance is not None:
        return slot.instance
    event = slot.starting = trio.Event()
    try:
        instance = new_instance(slot)
        if slot.entity_type.has_on_start:
            token = current_entity_var.set(instance)
            try:
                await instance.on_start()
            finally:
                current_entity_var.reset(token)
        slot.instance = instance
        return instance
    finally:
        slot.starting = None
        event.set()


async def _on_stop(instance: Entity) -> None:
    current_entity_var.set(instance)  # in a context of its own: no reset
    await instance.on_stop()


def new_instance(slot: Slot) -> Entity:
    """Create an incarnation: the user's class, with its address set before
    its ``__init__`` runs."""
    cls = slot.entity_type.cls
    instance = cls.__new__(cls)
    instance._tc_address = slot.address
    instance._tc_slot = slot
    cls.__init__(instance)
    return instance
