"""Objects made before the first runner starts are left out of garbage
collections (``gc.freeze``), once per process.

A full (generation 2) collection of CPython scans every object the collector
tracks, however old, and stops the whole process meanwhile: the event loop
stands still, and every timer due then fires late by the pause. Most of
those objects are made at import (functions, classes, the modules of Trio,
psycopg, attrs, cattrs and the application: ~52,000 of a runner's ~90,000
with 1,000 workflows in memory, W12 in ``benchmarks/RESULTS.md``) and live
as long as the process. Frozen, they are never scanned again: a full
collection scans the objects made since, and its pause shrinks in
proportion (on a loaded 2-core machine, 50-150 ms before, the lateness
target is 50 ms).

The first runner of a process to start collects (so that no garbage is
frozen) and freezes; later runners do nothing. An object frozen and later
dropped is still freed by reference counting; only one in a reference
cycle is not (a one-time, bounded cost: what was alive when the first runner
started). ``ShardingConfig.freeze_gc_at_start=False`` turns it off, and so
does a process whose collector is disabled (it manages collections itself).
"""

from __future__ import annotations

import gc

__all__ = ["freeze_once"]

_frozen = False


def freeze_once() -> bool:
    """Collect and freeze what exists now, the first time this is called in
    the process (with the collector enabled); True if it froze. Raises
    nothing."""
    global _frozen
    if _frozen or not gc.isenabled():
        return False
    _frozen = True
    gc.collect()
    gc.freeze()
    return True
