"""Fixtures of the multi-process tests: a `MultiCluster` per test, on its own
PostgreSQL schema and table prefix; every process it started is killed at
teardown, whatever the test did."""

from __future__ import annotations

import uuid
from typing import TYPE_CHECKING

import pytest

from .helpers import MultiCluster

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Iterator
    from pathlib import Path

    import trio

    from tests.pg_fixture import PgAdmin, PgSchema


@pytest.fixture
def _kill_leftovers() -> Iterator[list[MultiCluster]]:
    """A last, synchronous safety net: SIGKILL what the async teardown missed."""
    clusters: list[MultiCluster] = []
    yield clusters
    for cluster in clusters:
        cluster.kill_leftovers()


@pytest.fixture
async def cluster(
    pg_schema: PgSchema,
    pg_admin: PgAdmin,
    tmp_path: Path,
    nursery: trio.Nursery,
    _kill_leftovers: list[MultiCluster],
) -> AsyncIterator[MultiCluster]:
    multi = MultiCluster(
        dsn=pg_schema.dsn,
        prefix=f"mp_{uuid.uuid4().hex[:12]}",
        log_dir=tmp_path,
        nursery=nursery,
        admin=type(pg_admin)(pg_schema.dsn),
    )
    _kill_leftovers.append(multi)
    try:
        yield multi
    finally:
        await multi.aclose()
