"""The first runner of a process freezes the objects that exist then
(`trio_cluster._gc_freeze`), so that full garbage collections no longer scan
them (their pauses made durable timers fire late: W12)."""

from __future__ import annotations

import gc

import pytest

import trio_cluster as tc
from trio_cluster import _gc_freeze

from .helpers import config


async def test_the_first_runner_of_a_process_freezes_what_exists(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(_gc_freeze, "_frozen", False)  # as in a new process
    gc.unfreeze()
    freezes: list[int] = []
    freeze = gc.freeze

    def counted() -> None:
        freezes.append(1)
        freeze()

    monkeypatch.setattr(gc, "freeze", counted)
    async with tc.open_runner(config=config()):
        assert (len(freezes), gc.get_freeze_count()) == (0, 0)  # off by default
    async with tc.open_runner(config=config(freeze_gc_at_start=True)):
        assert len(freezes) == 1
        assert gc.get_freeze_count() > 1000  # modules, classes, functions
    async with tc.open_runner(config=config(freeze_gc_at_start=True)):
        assert len(freezes) == 1  # once per process
