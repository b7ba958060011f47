"""The webhook storage conformance suite on PostgreSQL, and its migration."""

from __future__ import annotations

import pytest
import trio

from trio_cluster.storage import PostgresStorage
from trio_cluster.storage._postgres._driver._driver import PgConnection
from trio_cluster.storage._postgres._schema import LATEST_VERSION, schema_version
from trio_cluster.testing import WebhookStorageConformance

pytestmark = pytest.mark.postgres


class TestPostgresWebhookConformance(WebhookStorageConformance):
    """The suite on the ``storage`` fixture of ``conftest.py``."""


async def test_opening_webhook_storage_migrates_the_schema(
    storage: PostgresStorage, pg_schema: object
) -> None:
    with trio.fail_after(20):
        async with storage.open_webhook_storage(name="t") as webhooks:
            assert await webhooks.list_endpoints() == []
        conn = await PgConnection.connect(storage._dsn, application_name="t")
        async with conn:
            assert await schema_version(conn, storage.names) == LATEST_VERSION
