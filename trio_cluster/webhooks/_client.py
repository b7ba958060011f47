"""`WebhookClient`: one runner's face of a `Webhooks` part (delivery part).

Opened by `Webhooks.open` with the runner, the storage of the webhook
records and the runner's HTTP pools (`HttpPools`: a keep-alive pool per
endpoint, closed with the client). Application code registers endpoints and sends events
through it; the endpoint entities running on this runner make their HTTP
attempts with its pool and write their attempts through its storage.
"""

from __future__ import annotations

import base64
import collections
import hashlib
import json
import logging
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import attrs
import trio

from trio_cluster import NotInTransactionError, current_transaction
from trio_cluster.abc import AttemptRecord
from trio_cluster.serialization import Codec

from ._delivery import DeadDelivery, WebhookMessage
from ._endpoint import WebhookEndpoint
from ._errors import UnknownEndpointError

if TYPE_CHECKING:
    from collections.abc import Sequence

    from trio_cluster import Runner
    from trio_cluster.abc import WebhookStorage

    from ._http import AttemptResult, HttpPools
    from ._webhooks import Webhooks

__all__ = ["SentWebhook", "WebhookClient", "WebhookStatistics"]

log = logging.getLogger("trio_cluster.webhooks")

MAX_EVENT_TYPE = 200
MAX_KEY = 200


@attrs.frozen
class SentWebhook:
    """What `WebhookClient.send` saved."""

    message_id: str
    """The ``webhook-id`` of every delivery of the event."""
    endpoint_ids: tuple[str, ...]
    """The endpoints a delivery was saved for, by id."""


@attrs.frozen
class WebhookStatistics:
    """Counters of one runner's webhook attempts (``metrics_text``)."""

    attempts: dict[str, int]
    """Attempts made here, by outcome (`trio_cluster.abc.AttemptRecord`)."""
    postponed: int
    """Deliveries put off by an open circuit breaker."""
    dead: int
    """Deliveries that ended here without success (to the dead letters)."""


def _check_text(name: str, value: object, limit: int) -> str:
    if not isinstance(value, str) or not value or len(value) > limit:
        raise TypeError(f"{name} must be a str of 1-{limit} characters, got {value!r}")
    return value


def message_id_for(idempotency_key: str) -> str:
    """The message id of an idempotent send: the same key, the same id."""
    digest = hashlib.sha256(idempotency_key.encode()).digest()[:18]
    return "msg_" + base64.urlsafe_b64encode(digest).decode()


def event_body(event_type: str, payload: object, wall_now: float) -> bytes:
    """The JSON body of an event, as the Standard Webhooks payload
    structure recommends: ``{"type", "timestamp", "data"}``.

    Raises:
        TypeError: ``payload`` is not JSON-serializable.
    """
    stamp = datetime.fromtimestamp(wall_now, UTC).isoformat().replace("+00:00", "Z")
    try:
        text = json.dumps(
            {"type": event_type, "timestamp": stamp, "data": payload},
            separators=(",", ":"),
            allow_nan=False,
        )
    except (TypeError, ValueError) as exc:
        raise TypeError(f"a webhook payload must be JSON-serializable: {exc}") from None
    return text.encode()


class WebhookClient:
    """Endpoints, sends, attempts and replays of one `Webhooks` part through
    one runner (`Webhooks.open`).

    Every async method checkpoints and raises `PersistenceError` when
    storage fails (then nothing was changed, except where said), and
    `TypeError`/`ValueError`/`ConfigError` for a bad argument.
    """

    def __init__(
        self,
        webhooks: Webhooks,
        runner: Runner,
        storage: WebhookStorage,
        pools: HttpPools,
    ) -> None:
        self.webhooks = webhooks
        self.runner = runner
        self.storage = storage
        """The webhook records (endpoints and attempts)."""
        self.pools = pools
        """The runner's keep-alive pools."""
        self._endpoints = runner.client(webhooks.endpoint_type)
        self._ordered = runner.client(webhooks.ordered_type)
        self._dead = runner.client(webhooks.dead_type)
        self._dead_codec: Codec[DeadDelivery] = Codec(
            runner.converter, DeadDelivery, "dead webhook delivery"
        )
        self._attempts: collections.Counter[str] = collections.Counter()
        self._postponed = 0
        self._dead_count = 0

    # ------------------------------------------------------------------
    # Endpoints

    async def register(self, endpoint: WebhookEndpoint) -> None:
        """Create or replace ``endpoint`` (by id). Runners see a change
        within the part's ``endpoint_refresh`` seconds."""
        if not isinstance(endpoint, WebhookEndpoint):
            raise TypeError(f"expected a WebhookEndpoint, got {endpoint!r}")
        await self.storage.put_endpoint(endpoint.to_record(self.runner.clock.now()))

    async def endpoint(self, endpoint_id: str) -> WebhookEndpoint | None:
        """The endpoint ``endpoint_id``, or None."""
        record = await self.storage.get_endpoint(endpoint_id)
        return None if record is None else WebhookEndpoint.from_record(record)

    async def endpoints(self) -> list[WebhookEndpoint]:
        """Every endpoint, by id."""
        return [
            WebhookEndpoint.from_record(record)
            for record in await self.storage.list_endpoints()
        ]

    async def disable(self, endpoint_id: str, *, reason: str = "disabled") -> None:
        """Disable an endpoint: sends skip it, and its saved deliveries go to
        the dead letters unattempted.

        Raises:
            UnknownEndpointError: no endpoint has that id.
        """
        await self._set_enabled(endpoint_id, False, reason)

    async def enable(self, endpoint_id: str) -> None:
        """Enable an endpoint again (a 410 Gone disables it).

        Raises:
            UnknownEndpointError: no endpoint has that id.
        """
        await self._set_enabled(endpoint_id, True, None)

    async def _set_enabled(
        self, endpoint_id: str, enabled: bool, reason: str | None
    ) -> None:
        _check_text("endpoint_id", endpoint_id, MAX_KEY)
        found = await self.storage.set_enabled(
            endpoint_id, enabled=enabled, reason=reason, now=self.runner.clock.now()
        )
        if not found:
            raise UnknownEndpointError(endpoint_id)

    async def delete(self, endpoint_id: str) -> bool:
        """Delete an endpoint (its attempts stay); False if there was none.
        Its saved deliveries go to the dead letters unattempted."""
        return await self.storage.delete_endpoint(endpoint_id)

    # ------------------------------------------------------------------
    # Sending

    async def send(
        self,
        event_type: str,
        payload: object,
        *,
        idempotency_key: str | None = None,
        endpoint_ids: Sequence[str] | None = None,
    ) -> SentWebhook:
        """Save a delivery of an event to every enabled endpoint that
        receives ``event_type`` (or to those of ``endpoint_ids``); each is
        attempted at once and retried on the part's schedule (at least once,
        see `Webhooks`).

        Args:
            event_type: the event's type (the ``type`` of the body, and what
                endpoints filter on).
            payload: the event's ``data``: any JSON-serializable value.
            idempotency_key: a send with the same key (and endpoints) is the
                same message: its deliveries are not saved again.
            endpoint_ids: only these endpoints (still only the enabled ones
                that receive ``event_type``).

        Returns once every delivery is saved (inside ``runner.transaction()``
        or a transactional handler: saved in that transaction, so they exist
        once it commits, the outbox). On cancellation some deliveries may be
        saved: send again with the same ``idempotency_key`` to be sure.

        Raises:
            TypeError: a bad argument, or a payload that is not JSON.
            MessageTooLargeError: the body is larger than messages may be.
            PersistenceError: storage failed (some deliveries may be saved).
        """
        _check_text("event_type", event_type, MAX_EVENT_TYPE)
        wall = self.runner.clock.now()
        body = event_body(event_type, payload, wall)
        if idempotency_key is None:
            message_id = f"msg_{int(self.runner.new_id())}"
        else:
            message_id = message_id_for(
                _check_text("idempotency_key", idempotency_key, MAX_KEY)
            )
        if isinstance(endpoint_ids, str):
            raise TypeError("endpoint_ids must be a sequence of ids, not a str")
        wanted = None if endpoint_ids is None else set(endpoint_ids)
        targets = [
            record
            for record in await self.storage.list_endpoints()
            if record.enabled
            and (record.event_types is None or event_type in record.event_types)
            and (wanted is None or record.endpoint_id in wanted)
        ]
        message = WebhookMessage(message_id, event_type, body)
        try:
            current_transaction()
        except NotInTransactionError:
            async with trio.open_nursery() as nursery:
                for record in targets:
                    nursery.start_soon(
                        self._save, record.endpoint_id, record.ordered, message
                    )
        else:
            # One transaction runs one statement at a time.
            for record in targets:
                await self._save(record.endpoint_id, record.ordered, message)
        return SentWebhook(message_id, tuple(r.endpoint_id for r in targets))

    async def _save(
        self, endpoint_id: str, ordered: bool, message: WebhookMessage
    ) -> None:
        clients = self._ordered if ordered else self._endpoints
        handle: Any = clients(endpoint_id)
        await handle.deliver.discard(message)

    # ------------------------------------------------------------------
    # Attempts and replays

    async def attempts(
        self,
        *,
        message_id: str | None = None,
        endpoint_id: str | None = None,
        limit: int = 100,
    ) -> list[AttemptRecord]:
        """The most recent ``limit`` attempts of a message and/or endpoint,
        oldest first: when, outcome, HTTP status, latency, error, and when
        the next attempt is due.

        Raises:
            ValueError: neither ``message_id`` nor ``endpoint_id`` is given.
        """
        return await self.storage.attempts(
            message_id=message_id, endpoint_id=endpoint_id, limit=limit
        )

    async def dead_deliveries(self) -> list[tuple[int, DeadDelivery]]:
        """The deliveries of this part in the dead letters, with their dead
        letters' ids, oldest first (read through ``runner.dead_letters``)."""
        found: list[tuple[int, DeadDelivery]] = []
        async for letter in self.runner.dead_letters.all():
            if letter.entity_type != self.webhooks.dead_type.type_name:
                continue
            try:
                found.append(
                    (letter.request_id, self._dead_codec.decode(letter.payload))
                )
            except Exception as exc:  # a row this code cannot read: skip it
                log.warning("dead letter %d is unreadable: %s", letter.request_id, exc)
        return found

    async def replay(self, message_id: str, *, endpoint_id: str | None = None) -> int:
        """Deliver a dead message again, from the first attempt of the
        schedule (same ``webhook-id``), to its endpoints (or only
        ``endpoint_id``), and delete its dead letters; returns how many
        deliveries were saved. An endpoint disabled meanwhile sends it back
        to the dead letters unattempted: enable it first.

        On cancellation some may be replayed; replaying again is safe (a
        replayed dead letter is gone).
        """
        _check_text("message_id", message_id, MAX_KEY)
        replayed = 0
        for letter_id, dead in await self.dead_deliveries():
            if dead.message.message_id != message_id or (
                endpoint_id is not None and dead.endpoint_id != endpoint_id
            ):
                continue
            record = await self.storage.get_endpoint(dead.endpoint_id)
            again = attrs.evolve(
                dead.message,
                attempt=1,
                postponed=0,
                due=None,
                generation=dead.message.generation + 1,
                earlier=dead.message.earlier + dead.message.attempt,
            )
            await self._save(
                dead.endpoint_id, record is not None and record.ordered, again
            )
            await self.runner.dead_letters.purge([letter_id])
            replayed += 1
        return replayed

    # ------------------------------------------------------------------
    # For the endpoint entities

    async def retry(
        self, endpoint_id: str, ordered: bool, message: WebhookMessage, at: float
    ) -> None:
        """Save the next attempt of ``message``, due at wall time ``at``."""
        await self._save(
            endpoint_id,
            ordered,
            attrs.evolve(message, attempt=message.attempt + 1, postponed=0, due=at),
        )

    async def postpone(
        self, endpoint_id: str, ordered: bool, message: WebhookMessage, wait: float
    ) -> None:
        """Save ``message`` again, ``wait`` seconds from now, same attempt."""
        self._postponed += 1
        due = self.runner.clock.now() + wait
        await self._save(
            endpoint_id,
            ordered,
            attrs.evolve(message, postponed=message.postponed + 1, due=due),
        )

    @property
    def is_open(self) -> bool:
        """Whether it is still its part's open client on its runner (not
        closed by the exit of `Webhooks.open`)."""
        return self.webhooks.client_of(self.runner) is self

    def count_postponed(self) -> None:
        """Count a delivery the circuit breaker holds in its handler (an
        ordered endpoint's: it waits there rather than being saved again)."""
        self._postponed += 1

    async def dead(
        self,
        endpoint_id: str,
        message: WebhookMessage,
        error: str,
        *,
        disabled: bool = False,
    ) -> None:
        """Hand a delivery that ended without success to the dead letters."""
        self._dead_count += 1
        log.warning(
            "webhook %s to endpoint %s failed for good: %s",
            message.message_id,
            endpoint_id,
            error,
        )
        # One dead entity per delivery: its handler raises (that is how the
        # runtime keeps a dead letter), and an entity restarts with a
        # growing backoff after each exception.
        dead_id = f"{endpoint_id}|{message.message_id}|{message.generation}"
        handle: Any = self._dead(dead_id)
        await handle.dead.discard(DeadDelivery(endpoint_id, message, error, disabled))

    async def disable_gone(self, endpoint_id: str) -> None:
        """The endpoint answered 410 Gone: disable it."""
        log.warning("webhook endpoint %s answered 410 Gone: disabled", endpoint_id)
        await self.storage.set_enabled(
            endpoint_id,
            enabled=False,
            reason="it answered 410 Gone",
            now=self.runner.clock.now(),
        )

    async def record(
        self,
        endpoint_id: str,
        message: WebhookMessage,
        at: float,
        result: AttemptResult,
        next_at: float | None,
    ) -> None:
        """Write one attempt's record, and count it."""
        self._attempts[result.outcome] += 1
        await self.storage.record_attempts(
            [
                AttemptRecord(
                    message_id=message.message_id,
                    endpoint_id=endpoint_id,
                    attempt=message.earlier + message.attempt,
                    at=at,
                    outcome=result.outcome,
                    status=result.status,
                    latency=result.latency,
                    error=result.error,
                    next_at=next_at,
                )
            ]
        )

    # ------------------------------------------------------------------
    # Observation

    def statistics(self) -> WebhookStatistics:
        """This runner's counters."""
        return WebhookStatistics(
            attempts=dict(self._attempts),
            postponed=self._postponed,
            dead=self._dead_count,
        )

    def metrics_text(self) -> str:
        """The counters in the Prometheus text format:
        ``trio_cluster_webhook_attempts_total{outcome}``,
        ``trio_cluster_webhook_postponed_total``,
        ``trio_cluster_webhook_dead_total``."""
        name = "trio_cluster_webhook_attempts_total"
        lines = [
            f"# HELP {name} Webhook HTTP attempts made by this runner, by outcome.",
            f"# TYPE {name} counter",
        ]
        lines.extend(
            f'{name}{{outcome="{outcome}"}} {self._attempts[outcome]}'
            for outcome in ("success", "failure", "timeout", "error", "gone")
        )
        for suffix, value, text in (
            ("postponed", self._postponed, "Deliveries put off by an open breaker."),
            ("dead", self._dead_count, "Deliveries that ended without success."),
        ):
            metric = f"trio_cluster_webhook_{suffix}_total"
            lines += [
                f"# HELP {metric} {text}",
                f"# TYPE {metric} counter",
                f"{metric} {value}",
            ]
        return "\n".join(lines) + "\n"
