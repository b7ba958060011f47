"""Fixtures of the PostgreSQL storage tests (see also ``tests/pg_fixture.py``)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest

from tests.pg_fixture import unique_prefix
from trio_cluster.storage import PostgresStorage

if TYPE_CHECKING:
    from tests.pg_fixture import PgSchema


@pytest.fixture
def storage(pg_schema: PgSchema) -> PostgresStorage:
    """A `PostgresStorage` in the test's schema, under a table prefix of its own."""
    return PostgresStorage(pg_schema.dsn, table_prefix=unique_prefix())
