"""Helpers of the workflow tests."""

from __future__ import annotations

from typing import TYPE_CHECKING

import trio

import trio_cluster as tc

from ..helpers import ORIGIN, config

if TYPE_CHECKING:
    from collections.abc import Sequence
    from contextlib import AbstractAsyncContextManager

    from trio_cluster.abc import Storage


def open_clocked_runner(
    entities: Sequence[type[tc.Entity]],
    cfg: tc.ShardingConfig | None = None,
    storage: Storage | None = None,
) -> AbstractAsyncContextManager[tc.Runner]:
    """A runner of ``entities`` whose wall clock reads ``ORIGIN`` plus the
    virtual time, so that runners opened one after another on the same
    storage share one timeline."""
    return tc.open_runner(
        entities=entities,
        config=config() if cfg is None else cfg,
        storage=storage,
        clock=tc.TrioWallClock(origin=ORIGIN + trio.current_time()),
    )
