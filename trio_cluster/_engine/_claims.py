"""Claiming stored persisted requests and delivering them to entities (Trio driver).

The read loop claims deliverable requests of the shards this runner serves,
under their epochs, and submits each to the entity manager with the reply
recorder as its sink. It claims when woken (`ClaimSignal`: a local send, a
storage notification, a shard acquired, a reply that frees budget, the next
``deliver_at`` timer, notifications that may have been missed) and, as a
safety net, every ``storage_poll_interval`` unless storage announces every
loss of its notifications (`MessageStorage.notifications_lossless`: both
built-in backends): then nothing is polled while nothing happens.
At most ``max_persisted_in_flight`` persisted jobs are in memory: when that
budget is spent the loop is *starved* and waits for replies to be recorded.
A request for an entity that is not resident while the runner is at
``max_resident_entities`` is not refused: the manager keeps it waiting for
room (see `EntityLifecycle.new_slot`), claimed at this epoch so that no claim
returns it again, and within the budget; if its shard stops meanwhile, it is
given back like a queued job, and the shard's next owner claims it again.

A claim that found nothing more to take marks its shards *caught up* at
their epochs; until then, older requests of a shard may still wait in
storage, so a local send must not take the fast path of being saved already
claimed (it would overtake them: the simulator found a sender's second
message running before its first after a failover). A deliverable request
saved unclaimed by this runner for a shard it serves (`saved_behind`) undoes
that mark, and a claim that began before it was saved cannot set it again.

The budget holds for local sends too (`admits`): a send made while the
runner has ``max_persisted_in_flight`` persisted jobs in memory is saved
unclaimed, not delivered at once, and the read loop claims it when replies
free the budget. Without this, a burst of local sends (100,000 workflow
starts stored at once, W12) put every one of them in memory at once, each
an entity activation with its task: the event loop stalled for seconds
(garbage collections of millions of objects), and the runner lost its lock
session (see also `trio_cluster._stalls`).

A claimed request that cannot be delivered, a *poison row* (an entity id the
API edge refuses, an entity in a shard that is not its own, an unknown type
or handler, a stream handler, a payload that does not decode, or a row
storage could not read back at all: `ClaimBatch.unreadable`), is answered
with a typed error as its final reply and stays stored, for inspection; the
loop serves on (such a row must never stop the runner, on any restart).

Timers are claimed a little early: a claim takes the requests whose
``deliver_at`` falls within `EARLY` seconds, and those not due yet wait in
memory (`_early`, only the claimed rows) for the read loop to deliver them
at their time, without another round trip: the claim's own round trip, and
any wait for a connection behind other traffic, is no longer added to a
timer's lateness (W12: many wake-ups due at once). They count against the
in-flight budget; an interruption reaches them (`interrupt`); a shard that
stops gracefully gives them back (`take_held`); a shard lost meanwhile
drops them, and its next owner claims them again.

Rolling deploys: a request for an entity type this runner does not host
may be for a type that only the new version of the code has, sent by a
runner already upgraded. For ``unknown_type_grace`` seconds after it was
sent (its Snowflake id's time, or its ``deliver_at`` if later; an id not
made by a runner counts as old), it is *held*: left claimed at this epoch
and unanswered, with only its id and deadline in memory. Claims do not
return it again (no retry loop: the types a runner hosts never change
while it runs), and the shard's next owner, a runner of the new version
once this one stops, claims it again and delivers it. Other requests of
the shard go on meanwhile. When the grace is over and this runner still
serves the shard at that epoch, the request is answered with
`UnknownEntityTypeError` as before; the read loop wakes for the earliest
such deadline.
"""

from __future__ import annotations

import heapq
import logging
import math
from typing import TYPE_CHECKING, Any, Final

import attrs
import trio

from .._core._addresses import ShardId, check_entity_id
from .._core._hashing import misplaced
from .._core._snowflake import Snowflake
from .._errors import (
    ClusterError,
    InvalidIdError,
    MalformedMessageError,
    PersistenceError,
    UnknownEntityTypeError,
)
from .._storage_abc import ClaimedRequest
from ._attempts import Attempts
from ._delivery import DeliveryParts
from ._manager import NotDelivered
from ._replies import ReplyRecorder

if TYPE_CHECKING:
    from collections.abc import Mapping

    from .._core._addresses import EntityAddress
    from .._registry import EntityType, Handler
    from .._storage_abc import ClaimBatch, UnreadableRequest
    from ._slots import Job, ShardHost

__all__ = ["Claims"]

log = logging.getLogger("trio_cluster.persisted")

_FLOAT_TOLERANCE: Final = 1e-6
"""Seconds of slack when a ``deliver_at`` timer fires, for float rounding
between the timer and the wall clock."""
EARLY: Final = 1.0
"""Seconds before its ``deliver_at`` that a request may be claimed (see the
module docstring). More than a claim's round trip on a loaded server: at
0.25 s, claims of 0.3 s (PostgreSQL and the runner sharing 2 busy cores)
took some wake-ups after their time (W12)."""


@attrs.frozen
class _Held:
    """A request for a type not hosted here, kept during the grace period."""

    shard: ShardId
    epoch: int
    entity_type: str
    until: float
    """Wall-clock time at which it is answered, if still ours."""


@attrs.define(eq=False)
class Claims:
    """The read loop and the delivery of persisted requests to entities."""

    _parts: DeliveryParts
    _recorder: ReplyRecorder
    _attempts: Attempts
    _caught_up: dict[ShardId, int] = attrs.field(init=False, factory=dict)
    """Shard -> the epoch at which a claim found nothing more to take
    (see the module docstring)."""
    _behind: dict[ShardId, int] = attrs.field(init=False, factory=dict)
    """Shard -> deliverable requests saved unclaimed here so far (a claim
    marks a shard caught up only if this did not change while it ran)."""
    _held: dict[int, _Held] = attrs.field(init=False, factory=dict)
    """Request id -> a request held during the unknown-type grace period."""
    _deadlines: list[tuple[float, int]] = attrs.field(init=False, factory=list)
    """Heap of ``(until, request id)`` of the held requests."""
    _early: dict[int, ClaimedRequest] = attrs.field(init=False, factory=dict)
    """Request id -> a request claimed before its ``deliver_at``."""
    _early_times: list[tuple[float, int]] = attrs.field(init=False, factory=list)
    """Heap of ``(deliver_at, request id)`` of `_early`."""
    _early_added: trio.Event = attrs.field(init=False, factory=trio.Event)
    reserved: int = attrs.field(init=False, default=0)
    """Local sends being saved already claimed: in the budget, not yet
    in the entity manager."""
    delivered: int = attrs.field(init=False, default=0)
    claims: int = attrs.field(init=False, default=0)
    redelivered: int = attrs.field(init=False, default=0)
    """Claimed requests delivered that had been claimed before, under an
    earlier epoch (`ClaimedRequest.claimed_before`)."""

    @property
    def held(self) -> int:
        """Requests for types not hosted here, held during their grace."""
        return len(self._held)

    def take_held(self, host: ShardHost) -> list[int]:
        """The requests held for ``host``'s shard at its epoch (for an
        unknown type, or claimed early), forgotten here (its shard stopped:
        the next owner claims them again)."""
        taken = [
            request_id
            for request_id, held in self._held.items()
            if held.shard == host.shard_id and held.epoch == host.epoch
        ]
        for request_id in taken:
            del self._held[request_id]
        early = [
            request_id
            for request_id, request in self._early.items()
            if request.address.shard == host.shard_id and request.epoch == host.epoch
        ]
        for request_id in early:
            del self._early[request_id]
        return taken + early

    def interrupt(self, request_id: int) -> None:
        """A request was interrupted: if it was claimed early, it is
        answered as interrupted at its time instead of run."""
        request = self._early.get(request_id)
        if request is not None:
            self._early[request_id] = attrs.evolve(request, interrupted=True)

    def caught_up(self, shard: ShardId, epoch: int) -> bool:
        """Whether no older request of ``shard`` can wait in storage at
        ``epoch`` (a local send may then be saved already claimed)."""
        return self._caught_up.get(shard) == epoch

    def admits(self) -> bool:
        """Whether a local send may be saved claimed and delivered at once:
        fewer than ``max_persisted_in_flight`` persisted jobs are in memory."""
        in_flight = len(self._parts.manager.persisted_jobs) + self.reserved
        return in_flight < self._parts.config.max_persisted_in_flight

    def saved_behind(self, shard: ShardId) -> None:
        """A deliverable request of ``shard`` (served here) was saved
        unclaimed: the shard is no longer caught up, until a claim that began
        after this finds nothing more."""
        self._caught_up.pop(shard, None)
        self._behind[shard] = self._behind.get(shard, 0) + 1

    async def run(self) -> None:
        """The read loop and the timer of the requests claimed early (see
        the module docstring), until cancelled."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._fire_early)
            await self._read_loop()

    async def _fire_early(self) -> None:
        """Deliver the requests claimed early at their times (apart from the
        read loop, which may be waiting for a claim then)."""
        times = self._early_times
        while True:
            self._early_added = trio.Event()
            self._deliver_early()
            timeout = math.inf
            if times:
                timeout = max(0.0, times[0][0] - self._parts.clock.now())
            with trio.move_on_after(timeout):
                await self._early_added.wait()

    async def _read_loop(self) -> None:
        signal = self._parts.signal
        poll = self._parts.config.storage_poll_interval
        # No safety net is needed when storage announces every loss of its
        # notifications (`NotificationsMissed` nudges this loop).
        idle = math.inf if self._parts.storage.notifications_lossless else poll
        while True:
            signal.rearm()
            self._answer_expired()
            shards = self._parts.shards.serving_epochs()
            budget = (
                self._parts.config.max_persisted_in_flight
                - len(self._parts.manager.persisted_jobs)
                - self.reserved
                - len(self._early)
            )
            signal.starved = bool(shards) and budget <= 0
            claiming = bool(shards) and budget > 0
            if claiming:
                signal.next_deliver_at = math.inf
                behind = dict(self._behind)
                try:
                    with trio.fail_after(self._parts.config.lease_refresh_interval):
                        batch = await self._parts.storage.claim(
                            shards,
                            now=self._parts.clock.now() + _FLOAT_TOLERANCE + EARLY,
                            limit=min(self._parts.config.persisted_batch_size, budget),
                        )
                except (PersistenceError, trio.TooSlowError) as exc:
                    log.warning("claiming persisted messages failed: %r", exc)
                    await trio.sleep(min(1.0, poll))
                    continue
                self._take(shards, batch, behind)
                if batch.more:
                    await trio.lowlevel.checkpoint()
                    continue
            timeout = idle
            # A request due is worth waking for only if it can be claimed:
            # without a shard, or at the in-flight limit, a due time past
            # would make every wait zero (a busy loop, and virtual time
            # standing still); a nudge, or a job's end, wakes the loop.
            wake = signal.next_deliver_at - EARLY if claiming else math.inf
            if self._deadlines:
                wake = min(wake, self._deadlines[0][0])
            if wake != math.inf:
                timeout = min(timeout, max(0.0, wake - self._parts.clock.now()))
            with trio.move_on_after(timeout):
                await signal.wait()

    def _take(
        self, shards: dict[ShardId, int], batch: ClaimBatch, behind: dict[ShardId, int]
    ) -> None:
        """Deliver a claimed batch and note what it says about the shards
        (``behind``: `_behind` when the claim began)."""
        self.claims += 1
        if not batch.more:
            for shard, epoch in shards.items():
                if shard not in batch.stale_shards and self._behind.get(
                    shard, 0
                ) == behind.get(shard, 0):
                    self._caught_up[shard] = epoch
        due = self._parts.clock.now() + _FLOAT_TOLERANCE
        for request in batch.requests:
            at = request.deliver_at
            if at is not None and at > due:
                self._early[request.request_id] = request
                heapq.heappush(self._early_times, (at, request.request_id))
                self._early_added.set()
            else:
                self._deliver_claimed(request)
        for unreadable in batch.unreadable:
            self._answer_unreadable(unreadable)
        if batch.next_deliver_at is not None:
            self._parts.signal.next_deliver_at = min(
                self._parts.signal.next_deliver_at, batch.next_deliver_at
            )

    def deliver(
        self,
        host: ShardHost,
        address: EntityAddress,
        entity_type: EntityType,
        handler: Handler,
        message: Any,
        request_id: int,
        metadata: Mapping[str, str] | None,
        *,
        here: bool = False,
    ) -> Job | None:
        """Submit a claimed request to its entity (once: a request already in
        memory is left alone), to run with ``metadata``. Returns its job, if
        submitted (``here``: see `EntityManager.submit`)."""
        if request_id in self._parts.manager.persisted_jobs:
            return None
        recorder = self._recorder
        try:
            job = self._parts.manager.submit(
                host,
                address,
                entity_type,
                handler,
                message,
                request_id=request_id,
                sink=recorder.record,
                force=True,
                around=recorder.in_transaction if handler.spec.transactional else None,
                metadata=metadata,
                here=here,
            )
        except NotDelivered:
            # The shard is stopping: its next owner claims the request again.
            self._parts.signal.nudge()
            return None
        self.delivered += 1
        return job

    def _deliver_claimed(self, request: ClaimedRequest) -> None:
        host = self._parts.shards.host(request.address.shard)
        if host is None or host.epoch != request.epoch:
            return
        if request.request_id in self._parts.manager.persisted_jobs:
            return
        entity_type = self._parts.registry.get(request.address.entity_type)
        handler = None if entity_type is None else entity_type.handlers.get(request.tag)
        error = self._undeliverable(request, entity_type, handler)
        if error is not None:
            if entity_type is None and self._hold(request, error):
                return
            self._refuse(host, request.request_id, error, handler)
            return
        assert entity_type is not None
        assert handler is not None
        if request.interrupted:
            interrupted = handler.reply.encode_interrupted()
            self._recorder.record_soon(host, request.request_id, interrupted)
            return
        beyond = self._attempts.beyond_attempts(request, handler)
        if beyond is not None:
            exit_, text = beyond
            payload = handler.reply.encode_exit(exit_)
            self._recorder.record_soon(
                host, request.request_id, payload, exit_, dead_letter=text
            )
            return
        try:
            message = handler.message.decode(request.payload)
        except MalformedMessageError as exc:
            self._refuse(host, request.request_id, exc, handler)
            return
        delivered = self.delivered
        job = self.deliver(
            host,
            request.address,
            entity_type,
            handler,
            message,
            request.request_id,
            request.metadata or None,
        )
        if job is not None:
            job.attempt = request.attempts
        if request.claimed_before and self.delivered != delivered:
            self.redelivered += 1

    def _undeliverable(
        self,
        request: ClaimedRequest,
        entity_type: EntityType | None,
        handler: Handler | None,
    ) -> ClusterError | None:
        """Why a claimed request cannot be delivered, if it cannot.

        Storage gives back what was stored, and a row may have been written
        by hand, by another program or by an older version: its address is
        checked again as the API edge checks it, so an entity never runs
        under an id the API refuses, nor in a shard that is not its own (a
        second instance of it), and only a persisted ``@rpc`` handler runs
        from storage.
        """
        address = request.address
        try:
            check_entity_id(address.entity_id.value)
        except InvalidIdError as exc:
            return exc
        except TypeError as exc:
            return InvalidIdError(str(exc))
        if entity_type is None or handler is None:
            return UnknownEntityTypeError(
                entity_type=address.entity_type,
                handler=None if entity_type is None else request.tag,
            )
        if request.stream or handler.spec.kind == "stream":
            # Stream handlers are never persisted: no sender stores one.
            return UnknownEntityTypeError(
                entity_type=entity_type.name, handler=request.tag
            )
        problem = misplaced(
            address, entity_type.shard_group, self._parts.config.shards_per_group
        )
        if problem is not None:
            return MalformedMessageError(
                what=f"stored request {request.request_id}", problems=[problem]
            )
        if not handler.spec.persisted:
            # A volatile handler runs at most once, never redelivered from
            # storage (no sender here stores one; an older version may have).
            return MalformedMessageError(
                what=f"stored request {request.request_id}",
                problems=[f"{handler.what} is volatile: it never runs from storage"],
            )
        return None

    def _hold(self, request: ClaimedRequest, error: ClusterError) -> bool:
        """Hold a request for a type not hosted here if it is still in its
        grace period (see the module docstring); False if it is not."""
        if not isinstance(error, UnknownEntityTypeError):
            return False  # an invalid id: never deliverable
        grace = self._parts.config.unknown_type_grace
        try:
            sent = Snowflake(request.request_id).timestamp_ms / 1000
        except (TypeError, ValueError):
            return False  # not a Snowflake id: counts as old
        until = max(sent, request.deliver_at or sent) + grace
        if until <= self._parts.clock.now():
            return False
        if request.request_id not in self._held:
            log.info(
                "stored request %d is for entity type %r, which this runner does"
                " not host: kept for the shard's next owner until its grace"
                " period ends",
                request.request_id,
                request.address.entity_type,
            )
        self._held[request.request_id] = _Held(
            request.address.shard, request.epoch, request.address.entity_type, until
        )
        heapq.heappush(self._deadlines, (until, request.request_id))
        return True

    def _deliver_early(self) -> None:
        """Deliver the requests claimed early whose time has come (if this
        runner still serves their shard at the epoch of the claim)."""
        now = self._parts.clock.now() + _FLOAT_TOLERANCE
        times = self._early_times
        while times and times[0][0] <= now:
            _, request_id = heapq.heappop(times)
            request = self._early.pop(request_id, None)
            if request is not None:  # else given back (its shard stopped)
                self._deliver_claimed(request)

    def _answer_expired(self) -> None:
        """Answer the held requests whose grace period is over, if this
        runner still serves their shard at the epoch they were held at."""
        now = self._parts.clock.now() + _FLOAT_TOLERANCE
        while self._deadlines and self._deadlines[0][0] <= now:
            _, request_id = heapq.heappop(self._deadlines)
            held = self._held.get(request_id)
            if held is None or held.until > now:
                continue  # answered already, or held again later
            del self._held[request_id]
            host = self._parts.shards.host(held.shard)
            if host is None or host.epoch != held.epoch:
                continue  # the shard moved on: its new owner has it
            error = UnknownEntityTypeError(entity_type=held.entity_type, handler=None)
            self._refuse(host, request_id, error, None)

    def _answer_unreadable(self, request: UnreadableRequest) -> None:
        """A claimed request storage could not read back: answer it with
        what is wrong with it (kept in storage, for inspection)."""
        host = self._parts.shards.host(request.shard)
        if host is None or host.epoch != request.epoch:
            return
        self._refuse(host, request.request_id, request.error, None)

    def _refuse(
        self,
        host: ShardHost,
        request_id: int,
        error: ClusterError,
        handler: Handler | None,
    ) -> None:
        """Record ``error`` as the final reply of a request that cannot be
        delivered; the request stays stored (answered), for inspection."""
        log.error("stored request %d cannot be delivered: %s", request_id, error)
        codec = self._parts.registry.generic_reply if handler is None else handler.reply
        self._recorder.record_soon(host, request_id, codec.encode_error(error))
