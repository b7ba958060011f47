"""The entities that deliver webhooks, one per endpoint (delivery part).

Theory of operation: a delivery of message ``m`` to endpoint ``e`` is a
persisted message `WebhookMessage` to the entity ``e`` of the part's
endpoint type (or of its ordered type, concurrency 1, for an ordered
endpoint). Each attempt is its own persisted message: the first is saved by
``send`` (primary key ``m/<generation>/1/0``, so an idempotent send is not
saved twice); when an attempt fails, the handler saves the next one with
``deliver_at`` on the `RetrySchedule` (or later, for a ``Retry-After``)
before it returns. So every retry is in storage before the attempt before
it is done, is delivered at its time by whichever runner owns the endpoint
then, and an attempt interrupted by a crash is made again by the next owner.
That is the unordered endpoints' handler (`_deliver`); an ordered
endpoint's handler keeps the delivery through its retries instead, so its
later deliveries wait (`_ordered`).

The handler never raises for a failed attempt: a delivery that ends
without success (attempts exhausted, endpoint disabled, 410 Gone) is handed
to the part's *dead* entity type, whose handler raises
`WebhookDeliveryError` once so the runtime keeps it with the dead letters
(``runner.dead_letters``, ``trio-cluster webhooks replay``). Other
deliveries of the endpoint never see that exception (an exception in an
entity restarts it and cancels its other handlers).

The circuit breaker and the rate limit are per endpoint and per
incarnation of its entity (in memory: a new owner starts closed). While the
breaker is open a delivery to an unordered endpoint is saved again for the
end of the cool-down, with the same attempt number: waiting is not an
attempt. The HTTP attempt itself, with the rate limit and the breaker's
bookkeeping, is `_attempt.make_attempt`.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import attrs
import trio

from trio_cluster import Backoff, Entity, RetryPolicy, current_runner, rpc

from .._core._retry import spread
from ._attempt import (
    EndpointState,
    breaker_of,
    endpoint_record,
    make_attempt,
    not_enabled,
)
from ._errors import (
    EndpointDisabledError,
    WebhookDeliveryError,
    WebhooksNotOpenError,
)
from ._ordered import deliver_in_order

if TYPE_CHECKING:
    from ._client import WebhookClient
    from ._webhooks import Webhooks

__all__ = ["DeadDelivery", "WebhookMessage", "entity_classes"]

log = logging.getLogger("trio_cluster.webhooks")

ORDERED_MAX_CLAIMS = 1000
"""Attempts the runtime allows an ordered delivery's request (each claim by
a new owner of its shard counts one; see `entity_classes`)."""

MIN_POSTPONE = 0.05
"""A delivery the circuit breaker holds for less than this (seconds) waits
in its handler instead of being saved again."""


@attrs.frozen
class WebhookMessage:
    """One attempt of a delivery, as stored."""

    message_id: str
    """The ``webhook-id``: the same for every endpoint and attempt."""
    event_type: str
    body: bytes
    attempt: int = 1
    """1 for the first attempt."""
    postponed: int = 0
    """Times this attempt was put off by the circuit breaker."""
    due: float | None = None
    """Not before (wall-clock seconds); None: at once."""
    generation: int = 0
    """Times the delivery was replayed from the dead letters."""
    earlier: int = 0
    """Attempts made before the replay that started this schedule (its
    attempts are recorded as numbers ``earlier + attempt``)."""


@attrs.frozen
class DeadDelivery:
    """A delivery that ended without success, kept as a dead letter."""

    endpoint_id: str
    message: WebhookMessage
    error: str
    disabled: bool = False
    """Not attempted (or no longer): its endpoint is disabled or gone."""


def _key(message: WebhookMessage) -> str:
    return (
        f"{message.message_id}/{message.generation}/{message.attempt}"
        f"/{message.postponed}"
    )


def _due(message: WebhookMessage) -> float | None:
    return message.due


def _dead_key(dead: DeadDelivery) -> str:
    return f"{dead.message.message_id}/{dead.message.generation}/dead"


def entity_classes(webhooks: Webhooks) -> tuple[type[Entity], ...]:
    """The endpoint, ordered endpoint and dead entity types of ``webhooks``."""
    engine_retry = RetryPolicy(max_attempts=20, backoff=Backoff(0.5, 30.0, jitter=0.5))
    # An ordered delivery is held in its handler through its retries (hours
    # on the default schedule): a wait is not a failure, but every new owner
    # of its shard claims it again, and storage counts each claim as an
    # attempt. Room for that many failovers.
    ordered_retry = RetryPolicy(
        max_attempts=ORDERED_MAX_CLAIMS, backoff=Backoff(0.5, 30.0, jitter=0.5)
    )

    async def deliver(self: EndpointState, message: WebhookMessage) -> None:
        await _deliver(webhooks, self, message)

    async def deliver_ordered(self: EndpointState, message: WebhookMessage) -> None:
        await deliver_in_order(webhooks, self, message)

    classes: list[type[Entity]] = []
    for suffix, concurrency, handler, retry in (
        ("", webhooks.concurrency, deliver, engine_retry),
        (".ordered", 1, deliver_ordered, ordered_retry),
    ):
        handler.__annotations__ = {"message": WebhookMessage, "return": type(None)}
        namespace = {
            "type_name": f"trio_cluster.webhooks.{webhooks.name}{suffix}",
            "concurrency": concurrency,
            "max_idle": 300.0,
            "deliver": rpc(
                persisted=True,
                primary_key=_key,
                deliver_at=_due,
                retry=retry,
                name="deliver",
            )(handler),
            "__module__": __name__,
        }
        name = f"WebhookEndpoint_{webhooks.name}{suffix.replace('.', '_')}"
        classes.append(type(name, (EndpointState,), namespace))

    async def dead(self: Entity, dead: DeadDelivery) -> None:
        error = EndpointDisabledError if dead.disabled else WebhookDeliveryError
        raise error(f"endpoint {dead.endpoint_id}: {dead.error}")

    dead.__annotations__ = {"dead": DeadDelivery, "return": type(None)}
    namespace = {
        "type_name": f"trio_cluster.webhooks.{webhooks.name}.dead",
        "concurrency": 1,
        "max_idle": 10.0,
        "dead": rpc(
            persisted=True,
            primary_key=_dead_key,
            # Its error is the delivery's final answer: dead-lettered at
            # once, no restart, no traceback (the dead letter says why).
            retry=RetryPolicy(max_attempts=1, non_retryable=(WebhookDeliveryError,)),
        )(dead),
        "__module__": __name__,
    }
    classes.append(type(f"WebhookDead_{webhooks.name}", (Entity,), namespace))
    return tuple(classes)


async def _deliver(
    webhooks: Webhooks, state: EndpointState, message: WebhookMessage
) -> None:
    client = _client(webhooks)
    endpoint = await endpoint_record(webhooks, state, client)
    if (why := not_enabled(endpoint)) is not None:
        await client.dead(state.id, message, why, disabled=True)
        return
    assert endpoint is not None
    breaker = breaker_of(webhooks, state)
    while (wait := breaker.admit(trio.current_time())) > 0:
        if wait < MIN_POSTPONE:
            # Due at the end of the cool-down, give or take the rounding of
            # wall-clock times: wait here rather than save it again.
            await trio.sleep(wait)
            continue
        await client.postpone(state.id, endpoint.ordered, message, wait)
        return
    wall, result = await make_attempt(
        webhooks, state, client, endpoint, message.message_id, message.body
    )
    if result.outcome == "success":
        await client.record(state.id, message, wall, result, None)
        return
    if result.outcome == "gone":
        state.record = attrs.evolve(endpoint, enabled=False)
        await client.disable_gone(state.id)
        await client.record(state.id, message, wall, result, None)
        await client.dead(
            state.id, message, "the endpoint answered 410 Gone", disabled=True
        )
        return
    delay = webhooks.schedule.next_delay(
        message.attempt,
        retry_after=result.retry_after,
        random_unit=spread(f"{message.message_id}/{state.id}/{message.attempt}"),
    )
    if delay is None:
        await client.record(state.id, message, wall, result, None)
        await client.dead(
            state.id,
            message,
            f"{message.attempt} attempt(s) failed, the last with {result.error}",
        )
        return
    next_at = client.runner.clock.now() + delay
    await client.retry(state.id, endpoint.ordered, message, next_at)
    await client.record(state.id, message, wall, result, next_at)


def _client(webhooks: Webhooks) -> WebhookClient:
    """The part's client on the runner running the handler.

    Raises:
        WebhooksNotOpenError: the part is not open on this runner (the
            runtime retries the delivery later).
    """
    client = webhooks.client_of(current_runner())
    if client is None:
        raise WebhooksNotOpenError(
            f"webhooks {webhooks.name!r} are not open on this runner"
            " (Webhooks.open(runner, storage)): the delivery is retried later"
        )
    return client
