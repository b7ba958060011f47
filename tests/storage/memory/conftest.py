"""Fixtures of the `MemoryStorage` tests: a storage and two sessions on it."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest

from trio_cluster.storage import MemoryStorage

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from trio_cluster.abc import StorageSession

LEASE = 0.5
"""Lease of the sessions of the memory tests (on virtual time mostly)."""


@pytest.fixture
def storage() -> MemoryStorage:
    return MemoryStorage()


@pytest.fixture
async def a(storage: MemoryStorage) -> AsyncIterator[StorageSession]:
    async with storage.open_session(name="a", lease_duration=LEASE) as session:
        yield session


@pytest.fixture
async def b(storage: MemoryStorage) -> AsyncIterator[StorageSession]:
    async with storage.open_session(name="b", lease_duration=LEASE) as session:
        yield session
