"""The calling task's deadline, as a remote request carries it (Trio driver).

Every remote call sends the time its caller has left (``None``: no
deadline), so the owner stops waiting when the caller does. Trio's
`trio.current_effective_deadline` finds it by walking every cancel scope
above the calling task, with three Python calls per scope (a recursive
method and two properties): about 1.5 µs for the ten or so scopes of a
caller in a runner, on every remote call, most of them to find that there is
no deadline at all.

`effective_deadline` returns the same value with one loop over the same
chain, reading the attributes those properties read (about 0.3 µs). Trio
keeps them private: when its classes do not have them (another version of
Trio), `trio.current_effective_deadline` itself is used. The tests compare
both on cancel scopes of every kind (nested, shielded, cancelled, with a
relative deadline, a deadline moved after entering).
"""

from __future__ import annotations

import math
from typing import Final

import attrs
import trio

__all__ = ["effective_deadline"]

_INF: Final = math.inf
_current_task = trio.lowlevel.current_task


def _fields(cls: object) -> frozenset[str]:
    try:
        return frozenset(field.name for field in attrs.fields(cls))  # type: ignore[arg-type]
    except (TypeError, attrs.exceptions.NotAnAttrsClassError):
        return frozenset()


def _layout_known() -> bool:
    """Whether Trio's cancel scopes and statuses have the attributes
    `_walk` reads (they are attrs classes in the versions that do)."""
    try:
        from trio._core._run import CancelScope, CancelStatus, Task
    except ImportError:  # pragma: no cover - another Trio
        return False
    return (
        {"_scope", "_parent", "effectively_cancelled"} <= _fields(CancelStatus)
        and {"_deadline", "_shield"} <= _fields(CancelScope)
        and "_cancel_status" in _fields(Task)
    )


def _walk() -> float:
    """`trio.current_effective_deadline`, as one loop: ``-inf`` if the
    task is cancelled, else the earliest deadline of the scopes above it up
    to the first that shields."""
    status = _current_task()._cancel_status
    deadline = _INF
    while True:
        if status.effectively_cancelled:
            return -_INF
        scope = status._scope
        if scope._deadline < deadline:
            deadline = scope._deadline
        if scope._shield:
            return deadline
        parent = status._parent
        if parent is None:
            return deadline
        status = parent


effective_deadline = _walk if _layout_known() else trio.current_effective_deadline
"""The calling task's effective deadline, as `trio.current_effective_deadline`
(the same value, cheaper)."""
