"""Tests of the lazy public namespace `trio_cluster.testing`."""

from __future__ import annotations

import subprocess
import sys

import pytest

import trio_cluster.testing


def test_import_does_not_import_pytest_or_hypothesis():
    code = (
        "import sys, trio_cluster.testing\n"
        "loaded = sorted({'pytest', 'hypothesis', 'trio_cluster.testing._conformance._storage'}"
        " & set(sys.modules))\n"
        "print(loaded)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "[]"


def test_names_resolve_lazily():
    conformance = trio_cluster.testing.StorageConformance
    assert conformance.__name__ == "StorageConformance"
    assert conformance.__module__ == "trio_cluster.testing"  # the public path
    assert trio_cluster.testing.StorageConformance is conformance  # cached
    assert set(trio_cluster.testing.__all__) <= set(dir(trio_cluster.testing))
    with pytest.raises(AttributeError, match="has no attribute 'Nope'"):
        trio_cluster.testing.Nope  # noqa: B018
