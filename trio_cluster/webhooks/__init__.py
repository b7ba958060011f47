"""Webhooks: signed HTTP deliveries, persisted and retried (delivery part).

Define the part, host its entity types, open it on each runner::

    webhooks = Webhooks()

    async with tc.open_runner(entities=[*webhooks.entities], storage=storage) as runner:
        async with webhooks.open(runner, storage) as hooks:
            await hooks.register(WebhookEndpoint("shop", "https://example.com/hooks"))
            await hooks.send("invoice.paid", {"invoice": 42})

Receivers check signatures with `verify_webhook` and deduplicate on its
result (the ``webhook-id``). See `Webhooks` for the guarantees, and
``docs/webhooks.md``.
"""

from __future__ import annotations

from .._core._breaker import BreakerPolicy
from .._core._ratelimit import RateLimit
from .._core._schedule import SVIX_DELAYS, RetrySchedule
from ._client import SentWebhook, WebhookClient, WebhookStatistics
from ._delivery import DeadDelivery, WebhookMessage
from ._endpoint import WebhookEndpoint
from ._errors import (
    EndpointDisabledError,
    UnknownEndpointError,
    WebhookDeliveryError,
    WebhooksNotOpenError,
)
from ._signing import (
    WebhookSignatureError,
    new_secret,
    sign_webhook,
    verify_webhook,
    webhook_headers,
)
from ._webhooks import Webhooks

__all__ = [
    "SVIX_DELAYS",
    "BreakerPolicy",
    "DeadDelivery",
    "EndpointDisabledError",
    "RateLimit",
    "RetrySchedule",
    "SentWebhook",
    "UnknownEndpointError",
    "WebhookClient",
    "WebhookDeliveryError",
    "WebhookEndpoint",
    "WebhookMessage",
    "WebhookSignatureError",
    "WebhookStatistics",
    "Webhooks",
    "WebhooksNotOpenError",
    "new_secret",
    "sign_webhook",
    "verify_webhook",
    "webhook_headers",
]
