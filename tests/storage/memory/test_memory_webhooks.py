"""The webhook storage conformance suite on `MemoryStorage`."""

from __future__ import annotations

import pytest

from trio_cluster.storage import MemoryStorage
from trio_cluster.testing import WebhookStorageConformance


class TestMemoryWebhookConformance(WebhookStorageConformance):
    @pytest.fixture
    def storage(self) -> MemoryStorage:
        return MemoryStorage()
