"""Entity lifecycle: incarnations, crashes, passivation and shard stop (Trio driver).

Theory of operation:

* A slot (an entity on this runner) is created by its first message, within
  ``max_resident_entities``: at the cap, the least recently used idle entity
  is passivated to make room (`EntityLifecycle.new_slot`). With no idle
  entity, a volatile message is refused (`MailboxFullError`), and a persisted
  one (already stored and claimed) *waits*: its slot is kept aside, not
  resident, its mailbox paused, and the messages that follow for the same
  entity queue behind it. Waiting slots are admitted in the order they began
  to wait, as soon as there is room: when a resident entity is forgotten
  (passivated, or its shard stopped) or goes idle (it is then passivated for
  them). While any waits, new entities are not admitted ahead of them.
* Its incarnation (the user's object) is created, its durable state loaded
  (`_durable_state`), and ``on_start`` run, when the first handler is about
  to run (`activate`, or the manager's one-step fast path with
  `new_instance`, never taken for a type with durable state).
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
from typing import TYPE_CHECKING, Final, Protocol

import trio

from .._context import current_entity_var
from .._core._job import StopReason
from .._core._retry import Backoff, spread
from .._durable import state_writer_var
from .._errors import MailboxFullError
from ._isolation import run_in, spawn
from ._passivation import IdleTracker
from ._slots import ShardState, Slot

if TYPE_CHECKING:
    from contextvars import Context

    from .._core._addresses import EntityAddress
    from .._core._config import ShardingConfig
    from .._entity import Entity
    from .._registry import EntityType
    from ._outcomes import RetryLater
    from ._slots import Job, ShardHost

__all__ = ["EntityLifecycle", "JobStarter", "activate", "new_instance"]

log = logging.getLogger("trio_cluster.entity")

_ACTIVE: Final = ShardState.ACTIVE
"""Read on every call (see `_slots._ACTIVE`)."""


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
        self._waiting: dict[EntityAddress, Slot] = {}
        """Slots of persisted messages waiting for room under the cap, in the
        order they began to wait (see the module docstring)."""
        self._admitting = False
        self._passivating = 0
        """Incarnations running ``on_stop`` on their way out of memory."""
        self._passivated = trio.Event()
        """Set (and replaced) each time a passivation's ``on_stop`` ends."""
        self.crashes = 0
        """Incarnations crashed so far."""

    def new_slot(
        self,
        shard: ShardHost,
        address: EntityAddress,
        entity_type: EntityType,
        *,
        wait: bool,
    ) -> Slot:
        """The slot for a message to an entity with no resident slot: a new
        resident one, making room under ``max_resident_entities`` if needed.
        Else, with ``wait`` (a persisted message: it must not be refused), the
        entity's waiting slot, created if needed: its mailbox admits messages
        but starts none until there is room.

        Raises:
            MailboxFullError: the runner is at the cap and no entity is idle
                (or persisted messages already wait for room), and not ``wait``.
        """
        if wait and (slot := self._waiting.get(address)) is not None:
            return slot
        slot = Slot(address, entity_type, shard)
        if self._cap is None or (
            # NOTE: while messages wait, newcomers queue behind them.
            not self._waiting
            and (
                self.resident < self._cap
                # A volatile message cannot wait: an idle entity is
                # passivated for it, even if its on_stop has yet to run.
                or (not wait and self.idle.evict_one(trio.current_time()))
            )
        ):
            self._add(slot)
        elif wait:
            slot.pause()
            self._waiting[address] = slot
            # Passivate an idle entity for it; if that freed a place at once,
            # it is admitted now, before its first message is offered (which
            # then starts as usual).
            self._admit_waiting()
        else:
            raise MailboxFullError(
                address=str(address),
                reason="runner at max_resident_entities, none idle",
            )
        return slot

    def _add(self, slot: Slot) -> None:
        slot.shard.slots[slot.address] = slot
        self.resident += 1

    def _admit_waiting(self) -> None:
        """Admit waiting slots, oldest first, while there is room."""
        if self._admitting:
            return  # room made within the loop is seen by the loop
        self._admitting = True
        try:
            while self._waiting and self._room():
                slot = self._waiting.pop(next(iter(self._waiting)))
                if not slot.shard.active:
                    # Its shard's nursery is closing: the next owner (or the
                    # next epoch here) claims its messages again.
                    for job in slot.drain():
                        self._jobs.bounce(job)
                    continue
                self._add(slot)
                # NOTE: not `_resume`: a slot admitted with no message is the
                # one `new_slot` is creating, whose message comes next.
                for job in slot.resume():
                    self._jobs.start(slot, job)
        finally:
            self._admitting = False

    def _room(self) -> bool:
        """Whether a waiting slot fits now. At the cap, idle entities are
        passivated for the slots that wait, one each beyond the passivations
        already under way (an entity counts until its ``on_stop`` returns)."""
        while self._cap is not None and self.resident >= self._cap:
            if self._passivating >= len(self._waiting) or not self.idle.evict_one(
                trio.current_time()
            ):
                return False
        return True

    def after_change(self, slot: Slot) -> None:
        """The slot's mailbox changed: if it went idle, track it for
        passivation, or forget it if there is nothing worth keeping."""
        if self._waiting and self._waiting.get(slot.address) is slot:
            if slot.idle:  # every message it waited with was withdrawn
                del self._waiting[slot.address]
            return
        if not slot.idle or slot.stopping or slot.paused:
            return
        if slot.shard.state is not _ACTIVE:
            return
        if slot.instance is None and slot.crashes == 0:
            self._drop(slot)  # nothing worth keeping: recreate on demand
            return
        self.idle.add(slot, slot.shard.current_time())
        if self._waiting and not slot.keep_alive:
            # Nothing else is idle (it would have made room already): this
            # entity is passivated for the messages that wait.
            self._admit_waiting()

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
        backoff = slot.entity_type.restart_backoff or self._backoff
        delay = backoff.delay(
            slot.crashes - 1, spread(f"{slot.address}/{slot.crashes}")
        )
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
            # The incarnation ends here: the instance and its slot refer to
            # each other, a cycle left to the garbage collector otherwise.
            slot.instance = None
            self._drop(slot)
            return
        slot.stopping = True
        slot.pause()
        nursery = slot.shard.nursery
        assert nursery is not None
        spawn(self._context, nursery, self._stop_incarnation, slot, instance)
        self._passivating += 1

    async def _stop_incarnation(self, slot: Slot, instance: Entity) -> None:
        try:
            await self.run_on_stop(instance)
        except BaseException:
            # Cancelled: its shard stops and forgets it. The stop may have
            # looked for room while this passivation still counted.
            self._passivating -= 1
            if self._waiting:
                self._admit_waiting()
            raise
        self._passivating -= 1
        slot.instance = None
        slot.stopping = False
        self._passivated.set()
        self._passivated = trio.Event()
        self._resume(slot)  # forgotten, unless a message came meanwhile
        if self._waiting:
            self._admit_waiting()

    def _drop(self, slot: Slot) -> None:
        self.idle.remove(slot)
        if slot.shard.slots.pop(slot.address, None) is not None:
            self.resident -= 1
            if self._waiting:
                self._admit_waiting()

    async def stop_shard(self, shard: ShardHost, *, graceful: bool) -> None:
        """Stop serving a shard: bounce queued messages, then (graceful) end
        its streams (`ShardHost.end_streams`), wait for the other running
        handlers and run ``on_stop`` hooks within the termination timeout;
        finally cancel whatever is left and forget the entities.

        Call it shielded: it is cleanup and must finish.
        """
        shard.state = ShardState.STOPPING
        for waiting in [s for s in self._waiting.values() if s.shard is shard]:
            del self._waiting[waiting.address]
            for job in waiting.drain():
                self._jobs.bounce(job)
        slots = list(shard.slots.values())
        for slot in slots:
            self.idle.remove(slot)
            slot.pause()
            for job in slot.drain():
                self._jobs.bounce(job)
        if graceful:
            shard.end_streams()
            # The shard keeps its lease meanwhile (refreshes extend it); a lost
            # lock or a lapsed lease cancels this scope (`force_stop`).
            with trio.move_on_after(self._termination_timeout) as drain:
                shard.drain_scope = drain
                await shard.wait_idle()
                for slot in slots:
                    # A slot being passivated runs its ``on_stop`` already
                    # (once: it is waited for below, not run again).
                    if (
                        slot.instance is not None
                        and slot.entity_type.has_on_stop
                        and not slot.stopping
                    ):
                        await self.run_on_stop(slot.instance)
                while any(slot.stopping for slot in slots):
                    await self._passivated.wait()
            shard.drain_scope = None
        shard.cancel_all()
        for slot in slots:
            slot.instance = None
        self.resident -= len(shard.slots)
        shard.slots.clear()
        shard.state = ShardState.STOPPED
        if self._waiting:
            self._admit_waiting()


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
        if slot.entity_type.durable is not None:
            states = slot.shard.states
            assert states is not None, "set when the shard started"
            await states.load(slot, instance)
        if slot.entity_type.has_on_start:
            token = current_entity_var.set(instance)
            # Even when a transactional handler activates it, on_start may
            # not change durable state (its change would be saved only then).
            writer = state_writer_var.set(None)
            try:
                await instance.on_start()
            finally:
                state_writer_var.reset(writer)
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
