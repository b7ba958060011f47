"""Fixtures of the `MemoryStorage` tests: a storage and two sessions on it."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest

from tests.helpers import session_fixture
from trio_cluster.storage import MemoryStorage

if TYPE_CHECKING:
    pass

LEASE = 0.5
"""Lease of the sessions of the memory tests (on virtual time mostly)."""


@pytest.fixture
def storage() -> MemoryStorage:
    return MemoryStorage()


a = session_fixture("a", lease=LEASE)
b = session_fixture("b", lease=LEASE)
