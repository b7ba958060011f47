"""Webhook endpoints and attempts on PostgreSQL: `WebhookStorage` (edge adapter).

`PgWebhooks` runs one statement per call on a small pool of its own
(`PostgresStorage.open_webhook_storage`), on the tables of schema version 7
(``<prefix>_webhook_endpoints``, ``<prefix>_webhook_attempts``). Errors: the
driver's `PersistenceError` subclasses; on cancellation the statement is
cancelled (it either committed, as a whole, or not at all).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import trio

from trio_cluster._storage_webhooks import (
    AttemptRecord,
    EndpointRecord,
    WebhookStorage,
    check_attempt,
    check_endpoint,
    check_query,
)

if TYPE_CHECKING:
    from collections.abc import Sequence

    from ._driver._pool import PgPool
    from ._schema import PgNames

__all__ = ["PgWebhooks"]

_ENDPOINT_COLUMNS = (
    "endpoint_id, url, secret, event_types, enabled, ordered, rate_per_second,"
    " rate_burst, timeout, disabled_reason, updated_at"
)
_ATTEMPT_COLUMNS = (
    "message_id, endpoint_id, attempt, at, outcome, status, latency, error, next_at"
)


def _endpoint(row: Sequence[Any]) -> EndpointRecord:
    (
        endpoint_id,
        url,
        secret,
        event_types,
        enabled,
        ordered,
        rate,
        burst,
        timeout,
        reason,
        updated,
    ) = row
    return EndpointRecord(
        endpoint_id=endpoint_id,
        url=url,
        secret=secret,
        event_types=None if event_types is None else tuple(event_types),
        enabled=bool(enabled),
        ordered=bool(ordered),
        rate_per_second=None if rate is None else float(rate),
        rate_burst=float(burst),
        timeout=float(timeout),
        disabled_reason=reason,
        updated_at=float(updated),
    )


def _attempt(row: Sequence[Any]) -> AttemptRecord:
    message_id, endpoint_id, attempt, at, outcome, status, latency, error, next_at = row
    return AttemptRecord(
        message_id=message_id,
        endpoint_id=endpoint_id,
        attempt=int(attempt),
        at=float(at),
        outcome=outcome,
        status=None if status is None else int(status),
        latency=float(latency),
        error=error,
        next_at=None if next_at is None else float(next_at),
    )


class PgWebhooks(WebhookStorage):
    """Webhook records on PostgreSQL (see `WebhookStorage`).

    Args:
        pool: the connection pool it runs its statements on.
        names: the cluster's table names.
    """

    def __init__(self, pool: PgPool, names: PgNames) -> None:
        self._pool = pool
        e, a = names.webhook_endpoints, names.webhook_attempts
        self._put = (
            f"INSERT INTO {e} ({_ENDPOINT_COLUMNS}) VALUES ($1::text, $2::text,"
            " $3::text, $4::text[], $5::bool, $6::bool, $7::float8, $8::float8,"
            " $9::float8, $10::text, $11::float8) ON CONFLICT (endpoint_id) DO UPDATE"
            " SET (url, secret, event_types, enabled, ordered, rate_per_second,"
            " rate_burst, timeout, disabled_reason, updated_at) = (EXCLUDED.url,"
            " EXCLUDED.secret, EXCLUDED.event_types, EXCLUDED.enabled,"
            " EXCLUDED.ordered, EXCLUDED.rate_per_second, EXCLUDED.rate_burst,"
            " EXCLUDED.timeout, EXCLUDED.disabled_reason, EXCLUDED.updated_at)"
        )
        self._get = f"SELECT {_ENDPOINT_COLUMNS} FROM {e} WHERE endpoint_id = $1::text"
        self._list = f"SELECT {_ENDPOINT_COLUMNS} FROM {e} ORDER BY endpoint_id"
        self._enable = (
            f"UPDATE {e} SET enabled = $2::bool, disabled_reason = $3::text,"
            " updated_at = $4::float8 WHERE endpoint_id = $1::text"
        )
        self._delete = f"DELETE FROM {e} WHERE endpoint_id = $1::text"
        self._record = (
            f"INSERT INTO {a} ({_ATTEMPT_COLUMNS}) SELECT * FROM unnest($1::text[],"
            " $2::text[], $3::int4[], $4::float8[], $5::text[], $6::int4[],"
            " $7::float8[], $8::text[], $9::float8[])"
            " ON CONFLICT (message_id, endpoint_id, attempt) DO UPDATE SET"
            " (at, outcome, status, latency, error, next_at) = (EXCLUDED.at,"
            " EXCLUDED.outcome, EXCLUDED.status, EXCLUDED.latency, EXCLUDED.error,"
            " EXCLUDED.next_at)"
        )
        newest = "ORDER BY at DESC, message_id DESC, endpoint_id DESC, attempt DESC"
        self._by_message = (
            f"SELECT {_ATTEMPT_COLUMNS} FROM {a} WHERE message_id = $1::text"
            f" AND ($2::text IS NULL OR endpoint_id = $2::text) {newest}"
            " LIMIT $3::int8"
        )
        self._by_endpoint = (
            f"SELECT {_ATTEMPT_COLUMNS} FROM {a} WHERE endpoint_id = $1::text"
            f" {newest} LIMIT $2::int8"
        )

    async def put_endpoint(self, endpoint: EndpointRecord) -> None:
        r = check_endpoint(endpoint)
        await self._pool.execute(
            self._put,
            [
                r.endpoint_id,
                r.url,
                r.secret,
                None if r.event_types is None else list(r.event_types),
                r.enabled,
                r.ordered,
                r.rate_per_second,
                r.rate_burst,
                r.timeout,
                r.disabled_reason,
                r.updated_at,
            ],
        )

    async def get_endpoint(self, endpoint_id: str) -> EndpointRecord | None:
        rows = (await self._pool.execute(self._get, [str(endpoint_id)])).rows
        return _endpoint(rows[0]) if rows else None

    async def list_endpoints(self) -> list[EndpointRecord]:
        return [_endpoint(row) for row in (await self._pool.execute(self._list)).rows]

    async def set_enabled(
        self, endpoint_id: str, *, enabled: bool, reason: str | None, now: float
    ) -> bool:
        result = await self._pool.execute(
            self._enable,
            [str(endpoint_id), bool(enabled), None if enabled else reason, float(now)],
        )
        return bool(result.rowcount)

    async def delete_endpoint(self, endpoint_id: str) -> bool:
        result = await self._pool.execute(self._delete, [str(endpoint_id)])
        return bool(result.rowcount)

    async def record_attempts(self, attempts: Sequence[AttemptRecord]) -> None:
        checked = [check_attempt(record) for record in attempts]
        latest: dict[tuple[str, str, int], AttemptRecord] = {}
        for record in checked:  # one row per key in one statement
            latest[(record.message_id, record.endpoint_id, record.attempt)] = record
        rows = list(latest.values())
        if not rows:
            await trio.lowlevel.checkpoint()
            return
        await self._pool.execute(
            self._record,
            [
                [r.message_id for r in rows],
                [r.endpoint_id for r in rows],
                [r.attempt for r in rows],
                [r.at for r in rows],
                [r.outcome for r in rows],
                [r.status for r in rows],
                [r.latency for r in rows],
                [r.error for r in rows],
                [r.next_at for r in rows],
            ],
        )

    async def attempts(
        self,
        *,
        message_id: str | None = None,
        endpoint_id: str | None = None,
        limit: int = 100,
    ) -> list[AttemptRecord]:
        message_id, endpoint_id, limit = check_query(message_id, endpoint_id, limit)
        if message_id is not None:
            result = await self._pool.execute(
                self._by_message, [message_id, endpoint_id, limit]
            )
        else:
            result = await self._pool.execute(self._by_endpoint, [endpoint_id, limit])
        return [_attempt(row) for row in reversed(result.rows)]
