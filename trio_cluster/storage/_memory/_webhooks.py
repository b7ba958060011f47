"""Webhook endpoints and attempts kept in process memory (edge adapter).

`WebhookTables` is the shared "database" of one `MemoryStorage`;
`MemoryWebhooks` is one connection to it (`MemoryStorage.open_webhook_storage`).
Every operation runs the storage's fault hook, checkpoints, then does its
work synchronously, so it is atomic.
"""

from __future__ import annotations

import heapq
from typing import TYPE_CHECKING

import attrs

from trio_cluster._storage_webhooks import (
    AttemptRecord,
    EndpointRecord,
    WebhookStorage,
    check_attempt,
    check_endpoint,
    check_query,
)

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Sequence

__all__ = ["MemoryWebhooks", "WebhookTables"]


def _order(record: AttemptRecord) -> tuple[float, str, str, int]:
    return (record.at, record.message_id, record.endpoint_id, record.attempt)


@attrs.define
class WebhookTables:
    """The endpoints and attempts of one `MemoryStorage`."""

    endpoints: dict[str, EndpointRecord] = attrs.field(factory=dict)
    attempts: dict[tuple[str, str, int], AttemptRecord] = attrs.field(factory=dict)
    by_message: dict[str, set[tuple[str, str, int]]] = attrs.field(factory=dict)
    by_endpoint: dict[str, set[tuple[str, str, int]]] = attrs.field(factory=dict)


class MemoryWebhooks(WebhookStorage):
    """One connection to a `WebhookTables` (see `WebhookStorage`).

    Args:
        tables: the shared tables.
        enter: awaited at the start of every operation with its name (the
            storage's fault hook and a checkpoint).
    """

    def __init__(
        self, tables: WebhookTables, enter: Callable[[str], Awaitable[None]]
    ) -> None:
        self._tables = tables
        self._enter = enter

    async def put_endpoint(self, endpoint: EndpointRecord) -> None:
        check_endpoint(endpoint)
        await self._enter("put_endpoint")
        self._tables.endpoints[endpoint.endpoint_id] = endpoint

    async def get_endpoint(self, endpoint_id: str) -> EndpointRecord | None:
        await self._enter("get_endpoint")
        return self._tables.endpoints.get(endpoint_id)

    async def list_endpoints(self) -> list[EndpointRecord]:
        await self._enter("list_endpoints")
        return [self._tables.endpoints[key] for key in sorted(self._tables.endpoints)]

    async def set_enabled(
        self, endpoint_id: str, *, enabled: bool, reason: str | None, now: float
    ) -> bool:
        await self._enter("set_enabled")
        found = self._tables.endpoints.get(endpoint_id)
        if found is None:
            return False
        self._tables.endpoints[endpoint_id] = attrs.evolve(
            found,
            enabled=bool(enabled),
            disabled_reason=None if enabled else reason,
            updated_at=float(now),
        )
        return True

    async def delete_endpoint(self, endpoint_id: str) -> bool:
        await self._enter("delete_endpoint")
        return self._tables.endpoints.pop(endpoint_id, None) is not None

    async def record_attempts(self, attempts: Sequence[AttemptRecord]) -> None:
        checked = [check_attempt(record) for record in attempts]
        await self._enter("record_attempts")
        tables = self._tables
        for record in checked:
            key = (record.message_id, record.endpoint_id, record.attempt)
            tables.attempts[key] = record
            tables.by_message.setdefault(record.message_id, set()).add(key)
            tables.by_endpoint.setdefault(record.endpoint_id, set()).add(key)

    async def attempts(
        self,
        *,
        message_id: str | None = None,
        endpoint_id: str | None = None,
        limit: int = 100,
    ) -> list[AttemptRecord]:
        message_id, endpoint_id, limit = check_query(message_id, endpoint_id, limit)
        await self._enter("attempts")
        tables = self._tables
        keys: set[tuple[str, str, int]] | None = None
        if message_id is not None:
            keys = set(tables.by_message.get(message_id, ()))
        if endpoint_id is not None:
            of_endpoint = tables.by_endpoint.get(endpoint_id, set())
            keys = of_endpoint.copy() if keys is None else keys & of_endpoint
        assert keys is not None
        records = [tables.attempts[key] for key in keys]
        return sorted(heapq.nlargest(limit, records, key=_order), key=_order)
