"""One HTTP attempt of a delivery, inside its endpoint's entity (delivery
part).

The pieces the unordered handler (`_delivery`) and the ordered one
(`_ordered`) share: the endpoint entity's in-memory state (`EndpointState`:
the endpoint's cached record, its circuit breaker and token bucket), the
cached read of the endpoint's record, and `make_attempt`, which waits for
the rate limit, POSTs and tells the breaker how it went.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import trio

from trio_cluster import Entity

from .._core._breaker import CircuitBreaker
from .._core._ratelimit import RateLimit, TokenBucket
from ._http import post_attempt

if TYPE_CHECKING:
    from trio_cluster.abc import EndpointRecord

    from ._client import WebhookClient
    from ._http import AttemptResult
    from ._webhooks import Webhooks

__all__ = [
    "EndpointState",
    "breaker_of",
    "endpoint_record",
    "make_attempt",
    "not_enabled",
]


class EndpointState(Entity):
    """Base of the endpoint entity types: the endpoint's record (cached),
    circuit breaker and token bucket, in memory."""

    type_name = "trio_cluster.webhooks"

    def __init__(self) -> None:
        self.record: EndpointRecord | None = None
        self.loaded_at = -float("inf")
        self.breaker: CircuitBreaker | None = None
        self.bucket: TokenBucket | None = None
        self.limit: RateLimit | None = None


def breaker_of(webhooks: Webhooks, state: EndpointState) -> CircuitBreaker:
    """The endpoint's circuit breaker (closed in a new incarnation)."""
    if state.breaker is None:
        state.breaker = CircuitBreaker(webhooks.breaker)
    return state.breaker


async def endpoint_record(
    webhooks: Webhooks, state: EndpointState, client: WebhookClient
) -> EndpointRecord | None:
    """The endpoint's record (None: deleted), read again when older than
    the part's ``endpoint_refresh``.

    Raises:
        PersistenceError: storage failed.
    """
    now = trio.current_time()
    if now - state.loaded_at >= webhooks.endpoint_refresh:
        state.record = await client.storage.get_endpoint(state.id)
        state.loaded_at = now
    else:
        await trio.lowlevel.checkpoint()
    return state.record


def not_enabled(endpoint: EndpointRecord | None) -> str | None:
    """Why deliveries to ``endpoint`` are not attempted, or None if they are."""
    if endpoint is None:
        return "not attempted: it is deleted"
    if not endpoint.enabled:
        return (
            f"not attempted: it is disabled ({endpoint.disabled_reason or 'by hand'})"
        )
    return None


async def make_attempt(
    webhooks: Webhooks,
    state: EndpointState,
    client: WebhookClient,
    endpoint: EndpointRecord,
    message_id: str,
    body: bytes,
) -> tuple[float, AttemptResult]:
    """Wait for the endpoint's rate limit, POST ``body`` and tell the
    circuit breaker the outcome; returns the attempt's wall-clock start and
    result. The caller has been admitted by the breaker.

    On cancellation (or when the HTTP pools are closed: `RuntimeError`) the
    attempt has no outcome: the breaker forgets it (a probe must not stay
    out forever) and the exception propagates.
    """
    breaker = breaker_of(webhooks, state)
    try:
        await _take_rate(state, endpoint)
        wall = client.runner.clock.now()
        result = await post_attempt(
            client.pools.for_endpoint(state.id),
            client.pools.limiter,
            endpoint,
            message_id,
            body,
            wall,
        )
    except BaseException:
        breaker.abandoned()
        raise
    if result.outcome == "success":
        breaker.succeeded()
    else:
        breaker.failed(trio.current_time())
    return wall, result


async def _take_rate(state: EndpointState, endpoint: EndpointRecord) -> None:
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
