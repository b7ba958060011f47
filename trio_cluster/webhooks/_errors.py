"""The errors of the webhooks part (delivery part)."""

from __future__ import annotations

__all__ = [
    "EndpointDisabledError",
    "UnknownEndpointError",
    "WebhookDeliveryError",
    "WebhooksNotOpenError",
]


class WebhookDeliveryError(Exception):
    """A delivery ended without success: its attempts ran out (the dead
    letter's error says why), or its endpoint is disabled or gone."""


class EndpointDisabledError(WebhookDeliveryError):
    """The delivery's endpoint is disabled (by ``disable`` or a 410 Gone
    answer) or deleted: the delivery is not attempted."""


class UnknownEndpointError(KeyError):
    """No endpoint has this id."""


class WebhooksNotOpenError(RuntimeError):
    """A delivery reached a runner whose webhooks are not open
    (``Webhooks.open(runner)``); it is retried later."""
