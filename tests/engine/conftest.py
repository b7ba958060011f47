"""Fixtures of the engine tests."""

from __future__ import annotations

import pytest


@pytest.fixture(params=[True, False], ids=["serialized", "direct"])
def serialize(request):
    return request.param
