"""The `Entity` base class (`trio_cluster._entity`): handlers collected from
the class and its bases."""

from __future__ import annotations

import trio_cluster as tc

from .helpers import Add


def test_subclass_overrides_handlers():
    class Base(tc.Entity):
        type_name = "Base"

        @tc.rpc
        async def f(self, msg: Add) -> int:
            return 1

        @tc.rpc
        async def g(self, msg: Add) -> int:
            return 2

    class Child(Base):
        type_name = "Child"

        @tc.rpc(name="f2")
        async def f(self, msg: Add) -> int:
            return 3

        g = None  # type: ignore[assignment]

    assert set(Child.__tc_handlers__) == {"f2"}
    assert set(Base.__tc_handlers__) == {"f", "g"}
