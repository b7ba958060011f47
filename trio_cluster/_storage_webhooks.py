"""The storage contract's webhook records: endpoints and attempts (interface).

An optional capability of a storage backend: a `Storage` that also
implements `WebhookStorageProvider` can keep the webhooks part's durable
records (`trio_cluster.webhooks`). The deliveries themselves are persisted
messages (the `MessageStorage` contract); what this adds is

* *endpoints* (`EndpointRecord`), by id: registered, changed, disabled and
  deleted at runtime, read by the runners that deliver to them;
* *attempts* (`AttemptRecord`): one per HTTP attempt of a delivery, keyed by
  ``(message_id, endpoint_id, attempt)``, so writing one again (a
  redelivered attempt) replaces it; queryable by message or endpoint.

Every method checkpoints and raises `PersistenceError` when storage fails
(then nothing was written), `TypeError`/`ValueError` for a malformed
argument.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import TYPE_CHECKING

import attrs

if TYPE_CHECKING:
    from collections.abc import Sequence
    from contextlib import AbstractAsyncContextManager

__all__ = [
    "ATTEMPT_OUTCOMES",
    "AttemptRecord",
    "EndpointRecord",
    "WebhookStorage",
    "WebhookStorageProvider",
    "check_attempt",
    "check_endpoint",
    "check_query",
]

ATTEMPT_OUTCOMES = ("success", "failure", "timeout", "error", "gone")
"""What an attempt came to: a 2xx answer in time; another status; no answer
in time; no answer (connection refused, reset, TLS...); 410 Gone (the
endpoint is disabled)."""

MAX_TEXT = 2000
"""Longest text (URL, error) a record may hold."""


@attrs.frozen
class EndpointRecord:
    """A webhook endpoint, as stored."""

    endpoint_id: str
    url: str
    secret: str
    """``whsec_<base64>``."""
    event_types: tuple[str, ...] | None
    """Event types it receives (None: all)."""
    enabled: bool
    ordered: bool
    rate_per_second: float | None
    rate_burst: float
    timeout: float
    disabled_reason: str | None
    updated_at: float
    """Wall-clock seconds of the last change."""


@attrs.frozen
class AttemptRecord:
    """One HTTP attempt of a delivery, as stored."""

    message_id: str
    endpoint_id: str
    attempt: int
    """1 for the first."""
    at: float
    """When it started (wall-clock seconds)."""
    outcome: str
    """One of `ATTEMPT_OUTCOMES`."""
    status: int | None
    """The HTTP status, if an answer came."""
    latency: float
    """Seconds from the request to the answer (or to giving up)."""
    error: str | None
    """What went wrong, if it failed."""
    next_at: float | None
    """When the next attempt is due; None: no more (success or the end)."""


def _text(name: str, value: object, *, limit: int = MAX_TEXT) -> str:
    if not isinstance(value, str) or not value:
        raise TypeError(f"{name} must be a non-empty str, got {value!r}")
    if len(value) > limit:
        raise ValueError(f"{name} must be at most {limit} characters")
    return value


def _number(name: str, value: object) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
    ):
        raise TypeError(f"{name} must be a finite number, got {value!r}")
    return float(value)


def _is_int(value: object, low: int, high: int) -> bool:
    return (
        isinstance(value, int) and not isinstance(value, bool) and low <= value <= high
    )


def check_endpoint(record: object) -> EndpointRecord:
    """``record`` if it is a well-formed `EndpointRecord`.

    Raises:
        TypeError, ValueError: it is not.
    """
    if not isinstance(record, EndpointRecord):
        raise TypeError(f"expected an EndpointRecord, got {record!r}")
    _text("endpoint_id", record.endpoint_id, limit=200)
    _text("url", record.url)
    _text("secret", record.secret)
    if record.event_types is not None:
        if not isinstance(record.event_types, tuple):
            raise TypeError("event_types must be a tuple of str or None")
        for event_type in record.event_types:
            _text("an event type", event_type, limit=200)
    if record.rate_per_second is not None:
        _number("rate_per_second", record.rate_per_second)
    for name in ("rate_burst", "timeout", "updated_at"):
        _number(name, getattr(record, name))
    if record.disabled_reason is not None:
        _text("disabled_reason", record.disabled_reason)
    return record


def check_attempt(record: object) -> AttemptRecord:
    """``record`` if it is a well-formed `AttemptRecord`.

    Raises:
        TypeError, ValueError: it is not.
    """
    if not isinstance(record, AttemptRecord):
        raise TypeError(f"expected an AttemptRecord, got {record!r}")
    _text("message_id", record.message_id, limit=200)
    _text("endpoint_id", record.endpoint_id, limit=200)
    if not _is_int(record.attempt, 1, 2**31 - 1):
        raise ValueError(f"attempt must be an int >= 1, got {record.attempt!r}")
    if record.outcome not in ATTEMPT_OUTCOMES:
        raise ValueError(f"outcome must be one of {ATTEMPT_OUTCOMES}")
    if record.status is not None and not _is_int(record.status, 100, 999):
        raise ValueError(
            f"status must be an HTTP status or None, got {record.status!r}"
        )
    _number("at", record.at)
    _number("latency", record.latency)
    if record.next_at is not None:
        _number("next_at", record.next_at)
    if record.error is not None:
        _text("error", record.error)
    return record


def check_query(
    message_id: object, endpoint_id: object, limit: object
) -> tuple[str | None, str | None, int]:
    """The arguments of `WebhookStorage.attempts`, checked.

    Raises:
        TypeError, ValueError: one is malformed, or neither id is given.
    """
    if message_id is None and endpoint_id is None:
        raise ValueError("give a message_id, an endpoint_id or both")
    if message_id is not None:
        _text("message_id", message_id, limit=200)
    if endpoint_id is not None:
        _text("endpoint_id", endpoint_id, limit=200)
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise ValueError(f"limit must be an int >= 1, got {limit!r}")
    return message_id, endpoint_id, limit  # type: ignore[return-value]


class WebhookStorage(ABC):
    """Endpoints and attempts of the webhooks part (see the module docstring)."""

    @abstractmethod
    async def put_endpoint(self, endpoint: EndpointRecord) -> None:
        """Create or replace the endpoint ``endpoint.endpoint_id``."""

    @abstractmethod
    async def get_endpoint(self, endpoint_id: str) -> EndpointRecord | None:
        """The endpoint ``endpoint_id``, or None."""

    @abstractmethod
    async def list_endpoints(self) -> list[EndpointRecord]:
        """Every endpoint, by id."""

    @abstractmethod
    async def set_enabled(
        self, endpoint_id: str, *, enabled: bool, reason: str | None, now: float
    ) -> bool:
        """Enable or disable endpoint ``endpoint_id`` (``reason`` kept while
        disabled, cleared when enabled; ``updated_at`` set to ``now``);
        False if there is no such endpoint."""

    @abstractmethod
    async def delete_endpoint(self, endpoint_id: str) -> bool:
        """Delete endpoint ``endpoint_id`` (its attempts stay); False if
        there was none."""

    @abstractmethod
    async def record_attempts(self, attempts: Sequence[AttemptRecord]) -> None:
        """Store these attempts, each replacing the one with the same
        ``(message_id, endpoint_id, attempt)``; all or none."""

    @abstractmethod
    async def attempts(
        self,
        *,
        message_id: str | None = None,
        endpoint_id: str | None = None,
        limit: int = 100,
    ) -> list[AttemptRecord]:
        """Up to ``limit`` attempts of this message and/or endpoint, the
        most recent ``limit`` ones, oldest first (by ``at``, then message,
        endpoint and attempt number).

        Raises:
            ValueError: neither ``message_id`` nor ``endpoint_id`` is given.
        """


class WebhookStorageProvider(ABC):
    """A `Storage` that keeps webhook records (`MemoryStorage`,
    `PostgresStorage`)."""

    @abstractmethod
    def open_webhook_storage(
        self, *, name: str
    ) -> AbstractAsyncContextManager[WebhookStorage]:
        """Open a connection for webhook records, shown as ``name``.

        Raises:
            PersistenceError: (on entry) storage could not be reached.

        On exit (also on cancellation) its connections are closed.
        """
