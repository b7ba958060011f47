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

The handler never raises for a failed attempt: a delivery that ends
without success (attempts exhausted, endpoint disabled, 410 Gone) is handed
to the part's *dead* entity type, whose handler raises
`WebhookDeliveryError` once so the runtime keeps it with the dead letters
(``runner.dead_letters``, ``trio-cluster webhooks replay``). Other
deliveries of the endpoint never see that exception (an exception in an
entity restarts it and cancels its other handlers).

The circuit breaker and the rate limit are per endpoint and per
incarnation of its entity (in memory: a new owner starts closed). While the
breaker is open a delivery is saved again for the end of the cool-down,
with the same attempt number: waiting is not an attempt.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import attrs
import trio

from trio_cluster import Backoff, Entity, RetryPolicy, current_runner, rpc

from .._core._breaker import CircuitBreaker
from .._core._ratelimit import RateLimit, TokenBucket
from .._core._retry import spread
from ._errors import (
    EndpointDisabledError,
    WebhookDeliveryError,
    WebhooksNotOpenError,
)
from ._http import post_attempt

if TYPE_CHECKING:
    from trio_cluster.abc import EndpointRecord

    from ._client import WebhookClient
    from ._webhooks import Webhooks

__all__ = ["DeadDelivery", "WebhookMessage", "entity_classes"]

log = logging.getLogger("trio_cluster.webhooks")

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


class _EndpointState(Entity):
    """Base of the endpoint entity types: the endpoint's record (cached),
    circuit breaker and token bucket, in memory."""

    type_name = "trio_cluster.webhooks"

    def __init__(self) -> None:
        self.record: EndpointRecord | None = None
        self.loaded_at = -float("inf")
        self.breaker: CircuitBreaker | None = None
        self.bucket: TokenBucket | None = None
        self.limit: RateLimit | None = None


def entity_classes(webhooks: Webhooks) -> tuple[type[Entity], ...]:
    """The endpoint, ordered endpoint and dead entity types of ``webhooks``."""
    engine_retry = RetryPolicy(max_attempts=20, backoff=Backoff(0.5, 30.0, jitter=0.5))

    async def deliver(self: _EndpointState, message: WebhookMessage) -> None:
        await _deliver(webhooks, self, message)

    deliver.__annotations__ = {"message": WebhookMessage, "return": type(None)}
    options: dict[str, Any] = {
        "persisted": True,
        "primary_key": _key,
        "deliver_at": _due,
        "retry": engine_retry,
    }
    classes: list[type[Entity]] = []
    for suffix, concurrency in (("", webhooks.concurrency), (".ordered", 1)):
        namespace = {
            "type_name": f"trio_cluster.webhooks.{webhooks.name}{suffix}",
            "concurrency": concurrency,
            "max_idle": 300.0,
            "deliver": rpc(**options)(deliver),
            "__module__": __name__,
        }
        name = f"WebhookEndpoint_{webhooks.name}{suffix.replace('.', '_')}"
        classes.append(type(name, (_EndpointState,), namespace))

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


async def _endpoint(
    webhooks: Webhooks, state: _EndpointState, client: WebhookClient
) -> EndpointRecord | None:
    """The endpoint's record, read again when older than the part's
    ``endpoint_refresh``."""
    now = trio.current_time()
    if now - state.loaded_at >= webhooks.endpoint_refresh:
        state.record = await client.storage.get_endpoint(state.id)
        state.loaded_at = now
    else:
        await trio.lowlevel.checkpoint()
    return state.record


async def _deliver(
    webhooks: Webhooks, state: _EndpointState, message: WebhookMessage
) -> None:
    client = webhooks.client_of(current_runner())
    if client is None:
        raise WebhooksNotOpenError(
            f"webhooks {webhooks.name!r} are not open on this runner"
            " (Webhooks.open(runner, storage)): the delivery is retried later"
        )
    endpoint = await _endpoint(webhooks, state, client)
    if endpoint is None or not endpoint.enabled:
        why = (
            "it is deleted"
            if endpoint is None
            else f"it is disabled ({endpoint.disabled_reason or 'by hand'})"
        )
        await client.dead(state.id, message, f"not attempted: {why}", disabled=True)
        return
    if state.breaker is None:
        state.breaker = CircuitBreaker(webhooks.breaker)
    while (wait := state.breaker.admit(trio.current_time())) > 0:
        if wait < MIN_POSTPONE:
            # Due at the end of the cool-down, give or take the rounding of
            # wall-clock times: wait here rather than save it again.
            await trio.sleep(wait)
            continue
        await client.postpone(state.id, endpoint.ordered, message, wait)
        return
    wall = client.runner.clock.now()
    try:
        await _take_rate(state, endpoint)
        wall = client.runner.clock.now()
        result = await post_attempt(
            client.pools.for_endpoint(state.id),
            client.pools.limiter,
            endpoint,
            message.message_id,
            message.body,
            wall,
        )
    except BaseException:
        # Cancelled (or the pools closed): no outcome, and a probe must not
        # stay out forever.
        state.breaker.abandoned()
        raise
    if result.outcome == "success":
        state.breaker.succeeded()
        await client.record(state.id, message, wall, result, None)
        return
    state.breaker.failed(trio.current_time())
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


async def _take_rate(state: _EndpointState, endpoint: EndpointRecord) -> None:
    """Wait for the endpoint's rate limit, if it has one."""
    if endpoint.rate_per_second is None:
        state.bucket = state.limit = None
        return
    limit = RateLimit(endpoint.rate_per_second, endpoint.rate_burst)
    if state.bucket is None or state.limit != limit:
        state.bucket = TokenBucket(limit, trio.current_time())
        state.limit = limit
    delay = state.bucket.take(trio.current_time())
    if delay > 0:
        await trio.sleep(delay)
