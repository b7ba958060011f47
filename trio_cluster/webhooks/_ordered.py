"""Deliveries to an ordered endpoint: a FIFO across retries (delivery part).

Theory of operation: an ordered endpoint's deliveries go to its entity of
the part's ordered type, which runs one handler at a time and takes its
persisted messages in the order they were saved. Its handler
(`deliver_in_order`) keeps a delivery until it ends: after a failed attempt
it records the attempt with the next one's due time (``next_at``, on the
`RetrySchedule`, ``Retry-After`` honoured), waits for it and attempts
again, in the same handler. So the endpoint's later deliveries wait in the
mailbox: delivery N+1 is attempted only once N succeeded or was given up
(attempts exhausted, endpoint disabled, deleted or gone: to the dead
letters, as for unordered endpoints).

Meanwhile the request stays claimed. When its shard stops (runner closed,
shard moved, lease lost) the wait is cancelled and the shard's next owner
runs the request again: `resume` reads the delivery's recorded attempts
(numbered ``earlier + attempt``, see `WebhookMessage`) to continue the
schedule where it was, at the next attempt number and its recorded due
time, rather than restarting it. An attempt interrupted before its record
was written is made again (at least once); a delivery whose last recorded
attempt ended it (a success, or the last failure) is not attempted again.

While waiting, the handler reads the endpoint's record again every
``max(endpoint_refresh, RECHECK)`` seconds, so a disabled or deleted
endpoint drains its deliveries to the dead letters without waiting for
their retries. The circuit breaker holds a delivery in the handler too (not
counted as an attempt).

Nothing while the delivery is held hands the request back to the runtime
(which would let the next delivery pass it): each step uses the part's
client open on the runner then, waiting for one if the part is not open
(yet, or again: `open_client`), and a storage failure (reading the
endpoint, recording an attempt) is retried in the handler with a backoff;
the shard's lease bounds how long that lasts. Only a part closed during an
HTTP attempt raises (its pools are closed).
"""

from __future__ import annotations

import functools
import logging
import math
from typing import TYPE_CHECKING, ParamSpec, TypeVar

import attrs
import trio

from trio_cluster import Backoff, PersistenceError, current_runner
from trio_cluster.abc import AttemptRecord

from .._core._retry import spread
from ._attempt import breaker_of, endpoint_record, make_attempt, not_enabled

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Sequence

    from trio_cluster.abc import EndpointRecord

    from ._attempt import EndpointState
    from ._client import WebhookClient
    from ._delivery import WebhookMessage
    from ._webhooks import Webhooks

__all__ = ["RECHECK", "Resume", "deliver_in_order", "open_client", "resume"]

log = logging.getLogger("trio_cluster.webhooks")

RECHECK = 1.0
"""Shortest interval (seconds) at which a held delivery reads its
endpoint's record again (the part's ``endpoint_refresh`` if longer)."""

STORAGE_BACKOFF = Backoff(0.5, 30.0, jitter=0.5)
"""Between tries of a storage write or read that failed while a delivery
is held."""

T = TypeVar("T")
P = ParamSpec("P")


@attrs.frozen
class Resume:
    """Where a delivery's schedule stands, from its recorded attempts."""

    attempt: int
    """The next attempt's number within this schedule (1 for the first)."""
    due: float | None
    """When it is due (wall-clock seconds); None: at once."""
    last: AttemptRecord | None = None
    """The last recorded attempt, if it ended the delivery (no ``next_at``):
    nothing is left to attempt."""


def resume(message: WebhookMessage, records: Sequence[AttemptRecord]) -> Resume:
    """Where ``message``'s schedule stands, given the attempts recorded for
    its delivery: past this generation's (numbered after
    ``message.earlier``), else where the message itself says."""
    mine = [r for r in records if r.attempt - message.earlier >= message.attempt]
    if not mine:
        return Resume(message.attempt, message.due)
    last = max(mine, key=lambda record: record.attempt)
    if last.next_at is None:
        return Resume(last.attempt - message.earlier, None, last)
    return Resume(last.attempt - message.earlier + 1, last.next_at)


async def deliver_in_order(
    webhooks: Webhooks, state: EndpointState, message: WebhookMessage
) -> None:
    """Deliver ``message`` to its ordered endpoint, retrying in this handler
    until it succeeds or ends with the dead letters (see the module
    docstring); continues a schedule already started (`resume`). It uses
    the part's client open on this runner at each step, waiting for one
    (`open_client`).

    Cancellation (the shard stops) propagates at once: the request stays
    claimed, for the shard's next owner to resume. Raises `RuntimeError`
    if the part closes during an HTTP attempt (its pools close): the
    runtime retries the request.
    """
    records = await _stubborn(
        webhooks,
        lambda c: c.storage.attempts,
        message_id=message.message_id,
        endpoint_id=state.id,
    )
    where = resume(message, records)
    if where.last is not None:
        await _finished(webhooks, state.id, message, where.last)
        return
    step: Resume | None = where
    while step is not None:
        step = await _attempt_once(webhooks, state, message, step)


async def _attempt_once(
    webhooks: Webhooks, state: EndpointState, message: WebhookMessage, step: Resume
) -> Resume | None:
    """Wait for attempt ``step`` and make it; the next one, or None if the
    delivery ended (success, dead letters)."""
    current = attrs.evolve(message, attempt=step.attempt, due=step.due)
    endpoint = await _hold(webhooks, state, step.due)
    if (why := not_enabled(endpoint)) is not None:
        await _stubborn(
            webhooks, lambda c: c.dead, state.id, current, why, disabled=True
        )
        return None
    assert endpoint is not None
    client = await open_client(webhooks)
    await _admit(webhooks, state, client)
    wall, result = await make_attempt(
        webhooks, state, client, endpoint, message.message_id, message.body
    )
    if result.outcome == "success":
        await _stubborn(
            webhooks, lambda c: c.record, state.id, current, wall, result, None
        )
        return None
    if result.outcome == "gone":
        state.record = attrs.evolve(endpoint, enabled=False)
        await _stubborn(webhooks, lambda c: c.disable_gone, state.id)
        await _stubborn(
            webhooks, lambda c: c.record, state.id, current, wall, result, None
        )
        await _stubborn(
            webhooks,
            lambda c: c.dead,
            state.id,
            current,
            "the endpoint answered 410 Gone",
            disabled=True,
        )
        return None
    delay = webhooks.schedule.next_delay(
        step.attempt,
        retry_after=result.retry_after,
        random_unit=spread(f"{message.message_id}/{state.id}/{step.attempt}"),
    )
    next_at = None if delay is None else client.runner.clock.now() + delay
    await _stubborn(
        webhooks, lambda c: c.record, state.id, current, wall, result, next_at
    )
    if next_at is None:
        await _stubborn(
            webhooks,
            lambda c: c.dead,
            state.id,
            current,
            f"{step.attempt} attempt(s) failed, the last with {result.error}",
        )
        return None
    return Resume(step.attempt + 1, next_at)


async def _finished(
    webhooks: Webhooks,
    endpoint_id: str,
    message: WebhookMessage,
    last: AttemptRecord,
) -> None:
    """The delivery's last recorded attempt ended it, before its request
    was done (its runner stopped): hand a failed one to the dead letters
    (saved once: a dead letter has a primary key); a success is done."""
    if last.outcome == "success":
        await trio.lowlevel.checkpoint()
        return
    current = attrs.evolve(message, attempt=last.attempt - message.earlier)
    if last.outcome == "gone":
        error, disabled = "the endpoint answered 410 Gone", True
    else:
        error = f"{current.attempt} attempt(s) failed, the last with {last.error}"
        disabled = False
    await _stubborn(
        webhooks, lambda c: c.dead, endpoint_id, current, error, disabled=disabled
    )


async def open_client(webhooks: Webhooks) -> WebhookClient:
    """The part's client on the runner running the handler, once the part
    is open there (checked every `RECHECK` seconds): an ordered delivery
    waits in its handler, so that the next one cannot pass it.
    Cancellation propagates."""
    runner = current_runner()
    warned = False
    while (client := webhooks.client_of(runner)) is None:
        if not warned:
            log.warning(
                "webhooks %r are not open on this runner (Webhooks.open(runner,"
                " storage)): an ordered delivery waits for them",
                webhooks.name,
            )
            warned = True
        await trio.sleep(RECHECK)
    await trio.lowlevel.checkpoint()
    return client


async def _hold(
    webhooks: Webhooks, state: EndpointState, due: float | None
) -> EndpointRecord | None:
    """Wait until wall time ``due``; return the endpoint's record then, or
    as soon as it is disabled or deleted (read again every
    ``max(endpoint_refresh, RECHECK)`` seconds)."""
    interval = max(webhooks.endpoint_refresh, RECHECK)
    while True:
        endpoint = await _stubborn(
            webhooks, lambda c: functools.partial(endpoint_record, webhooks, state, c)
        )
        now = current_runner().clock.now()
        left = -math.inf if due is None else due - now
        if left <= 0 or not_enabled(endpoint) is not None:
            return endpoint
        await trio.sleep(min(left, interval))


async def _admit(
    webhooks: Webhooks, state: EndpointState, client: WebhookClient
) -> None:
    """Wait while the endpoint's circuit breaker is open (counted as a
    postponement, not an attempt)."""
    breaker = breaker_of(webhooks, state)
    held = False
    while (wait := breaker.admit(trio.current_time())) > 0:
        if not held:
            client.count_postponed()
            held = True
        await trio.sleep(wait)


async def _stubborn(
    webhooks: Webhooks,
    method: Callable[[WebhookClient], Callable[P, Awaitable[T]]],
    *args: P.args,
    **kwargs: P.kwargs,
) -> T:
    """``method(client)(*args, **kwargs)`` with the part's open client,
    tried again while it raises `PersistenceError`: with a backoff, or at
    once with the next client if the part was closed meanwhile (a held
    delivery must not be handed back to the runtime: the next one would
    pass it). Cancellation propagates."""
    failures = 0
    while True:
        client = await open_client(webhooks)
        try:
            return await method(client)(*args, **kwargs)
        except PersistenceError as exc:
            if not client.is_open:
                continue  # closed under it: its successor (when open) goes on
            delay = STORAGE_BACKOFF.delay(failures, random_unit=spread(f"{failures}"))
            failures += 1
            log.warning(
                "webhook storage failed while an ordered delivery is held"
                " (try %d, again in %.1f s): %s",
                failures,
                delay,
                exc,
            )
            await trio.sleep(delay)
