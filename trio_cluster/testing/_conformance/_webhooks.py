"""`WebhookStorageConformance`: the tests of the webhook storage capability
(test support).

A backend that implements `trio_cluster.abc.WebhookStorageProvider` runs
these on its own: subclass `WebhookStorageConformance` in a test module and
provide a ``storage`` fixture returning a fresh, isolated provider. The
tests use the contract of `trio_cluster._storage_webhooks` only, with
explicit times, so they pass on a real database and on virtual time.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import attrs
import pytest
import trio

from trio_cluster._storage_webhooks import (
    AttemptRecord,
    EndpointRecord,
    WebhookStorage,
    WebhookStorageProvider,
)

from ._base import BASE_TIME, TIMEOUT

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

__all__ = ["WebhookStorageConformance", "attempt_record", "endpoint_record"]


def endpoint_record(endpoint_id: str = "ep1", **changes: Any) -> EndpointRecord:
    """An `EndpointRecord` with test values, changed by ``changes``."""
    record = EndpointRecord(
        endpoint_id=endpoint_id,
        url=f"http://127.0.0.1:9/{endpoint_id}",
        secret="whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
        event_types=("invoice.paid", "invoice.failed"),
        enabled=True,
        ordered=False,
        rate_per_second=10.0,
        rate_burst=2.0,
        timeout=15.0,
        disabled_reason=None,
        updated_at=BASE_TIME,
    )
    return attrs.evolve(record, **changes)


def attempt_record(
    message_id: str = "msg1",
    endpoint_id: str = "ep1",
    attempt: int = 1,
    **changes: Any,
) -> AttemptRecord:
    """An `AttemptRecord` with test values, changed by ``changes``."""
    record = AttemptRecord(
        message_id=message_id,
        endpoint_id=endpoint_id,
        attempt=attempt,
        at=BASE_TIME + attempt,
        outcome="failure",
        status=503,
        latency=0.25,
        error="HTTP 503",
        next_at=BASE_TIME + attempt + 5,
    )
    return attrs.evolve(record, **changes)


class WebhookStorageConformance:
    """Base class of a backend's webhook storage tests (see the module
    docstring)."""

    @pytest.fixture
    async def webhooks(self, storage: object) -> AsyncIterator[WebhookStorage]:
        assert isinstance(storage, WebhookStorageProvider)
        async with storage.open_webhook_storage(name="conformance") as opened:
            yield opened

    async def test_endpoints_are_put_read_listed_and_replaced(
        self, webhooks: WebhookStorage
    ) -> None:
        with trio.fail_after(TIMEOUT):
            assert await webhooks.get_endpoint("ep1") is None
            assert await webhooks.list_endpoints() == []
            second = endpoint_record(
                "ep2",
                event_types=None,
                rate_per_second=None,
                ordered=True,
                enabled=False,
                disabled_reason="gone",
            )
            await webhooks.put_endpoint(second)
            await webhooks.put_endpoint(endpoint_record("ep1"))
            assert await webhooks.get_endpoint("ep2") == second
            assert [e.endpoint_id for e in await webhooks.list_endpoints()] == [
                "ep1",
                "ep2",
            ]
            changed = endpoint_record("ep1", url="http://127.0.0.1:9/new", timeout=2.5)
            await webhooks.put_endpoint(changed)
            assert await webhooks.get_endpoint("ep1") == changed

    async def test_set_enabled_keeps_a_reason_while_disabled(
        self, webhooks: WebhookStorage
    ) -> None:
        with trio.fail_after(TIMEOUT):
            await webhooks.put_endpoint(endpoint_record("ep1"))
            assert await webhooks.set_enabled(
                "ep1", enabled=False, reason="HTTP 410", now=BASE_TIME + 7
            )
            found = await webhooks.get_endpoint("ep1")
            assert found is not None
            assert (found.enabled, found.disabled_reason, found.updated_at) == (
                False,
                "HTTP 410",
                BASE_TIME + 7,
            )
            assert await webhooks.set_enabled(
                "ep1", enabled=True, reason="ignored", now=BASE_TIME + 8
            )
            found = await webhooks.get_endpoint("ep1")
            assert found is not None
            assert (found.enabled, found.disabled_reason) == (True, None)
            assert not await webhooks.set_enabled(
                "nope", enabled=False, reason=None, now=BASE_TIME
            )

    async def test_delete_endpoint(self, webhooks: WebhookStorage) -> None:
        with trio.fail_after(TIMEOUT):
            await webhooks.put_endpoint(endpoint_record("ep1"))
            await webhooks.record_attempts([attempt_record()])
            assert await webhooks.delete_endpoint("ep1")
            assert not await webhooks.delete_endpoint("ep1")
            assert await webhooks.get_endpoint("ep1") is None
            assert len(await webhooks.attempts(endpoint_id="ep1")) == 1

    async def test_attempts_by_message_endpoint_or_both(
        self, webhooks: WebhookStorage
    ) -> None:
        with trio.fail_after(TIMEOUT):
            records = [
                attempt_record("m1", "ep1", 1),
                attempt_record(
                    "m1",
                    "ep1",
                    2,
                    outcome="success",
                    status=200,
                    error=None,
                    next_at=None,
                ),
                attempt_record("m1", "ep2", 1, outcome="timeout", status=None),
                attempt_record(
                    "m2",
                    "ep1",
                    1,
                    outcome="error",
                    status=None,
                    error="connection refused",
                ),
            ]
            await webhooks.record_attempts(records)
            assert await webhooks.attempts(message_id="m1") == [
                records[0],
                records[2],
                records[1],
            ]
            assert await webhooks.attempts(endpoint_id="ep1") == [
                records[0],
                records[3],
                records[1],
            ]
            assert await webhooks.attempts(message_id="m1", endpoint_id="ep2") == [
                records[2]
            ]
            assert await webhooks.attempts(message_id="zz") == []

    async def test_attempts_limit_keeps_the_most_recent(
        self, webhooks: WebhookStorage
    ) -> None:
        with trio.fail_after(TIMEOUT):
            records = [attempt_record("m1", "ep1", n) for n in range(1, 6)]
            await webhooks.record_attempts(records)
            assert await webhooks.attempts(message_id="m1", limit=2) == records[3:]
            assert await webhooks.attempts(endpoint_id="ep1", limit=3) == records[2:]

    async def test_an_attempt_written_again_replaces_it(
        self, webhooks: WebhookStorage
    ) -> None:
        with trio.fail_after(TIMEOUT):
            await webhooks.record_attempts([attempt_record()])
            again = attempt_record(
                outcome="success", status=204, error=None, next_at=None, latency=0.5
            )
            await webhooks.record_attempts([again])
            assert await webhooks.attempts(message_id="msg1") == [again]
            await webhooks.record_attempts([])

    async def test_malformed_records_and_queries_are_refused(
        self, webhooks: WebhookStorage
    ) -> None:
        with trio.fail_after(TIMEOUT):
            with pytest.raises(ValueError, match="outcome"):
                await webhooks.record_attempts(
                    [attempt_record(), attempt_record(attempt=2, outcome="maybe")]
                )
            assert await webhooks.attempts(message_id="msg1") == []
            with pytest.raises(ValueError, match="attempt"):
                await webhooks.record_attempts([attempt_record(attempt=0)])
            with pytest.raises(TypeError, match="url"):
                await webhooks.put_endpoint(endpoint_record(url=""))
            with pytest.raises(ValueError, match="message_id"):
                await webhooks.attempts()
            with pytest.raises(ValueError, match="limit"):
                await webhooks.attempts(message_id="m", limit=0)
