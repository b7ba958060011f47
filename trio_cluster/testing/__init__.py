"""Test support for trio_cluster and its users (public namespace).

Names are imported lazily, on first access, so that ``import
trio_cluster.testing`` does not import pytest or Hypothesis: those are only
needed by the parts that use them (`StorageConformance` needs pytest).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ._conformance import StorageConformance as StorageConformance
    from ._transport_conformance import (
        TransportConformance as TransportConformance,
    )

__all__ = ["StorageConformance", "TransportConformance"]

# Public name -> private module that defines it (add new names here).
_LAZY: dict[str, str] = {
    "StorageConformance": "._conformance",
    "TransportConformance": "._transport_conformance",
}


def __getattr__(name: str) -> object:
    module_name = _LAZY.get(name)
    if module_name is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module_name, __name__), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
