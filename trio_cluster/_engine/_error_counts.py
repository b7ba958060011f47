"""`ErrorCounts`: errors raised to callers on this runner, by type (Trio
driver bookkeeping).

The router counts every exception a call, a fire-and-forget send or a stream
raises to its caller (`trio.Cancelled` and other non-`Exception`s are not
errors of the call: they are not counted). The label set is bounded, so a
metric can carry it: the library's own errors by class name (a subclass
counts as its public parent: `StorageRefusedError` as ``PersistenceError``),
every error the handler declared as ``declared`` (user classes are not
bounded), anything else as ``other``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final

from .._errors import (
    AlreadyProcessingError,
    EntityNotAssignedError,
    InvalidIdError,
    MailboxFullError,
    MalformedMessageError,
    MessageTooLargeError,
    PersistenceError,
    RemoteError,
    RequestInterruptedError,
    RunnerUnavailableError,
    StaleEpochError,
    UnknownEntityTypeError,
)
from .._errors._closed import RunnerClosedError

if TYPE_CHECKING:
    from .._registry import Handler

__all__ = ["DECLARED", "ERROR_LABELS", "OTHER", "ErrorCounts"]

_KNOWN: Final[tuple[type[Exception], ...]] = (
    MailboxFullError,
    RunnerUnavailableError,
    EntityNotAssignedError,
    PersistenceError,
    RemoteError,
    UnknownEntityTypeError,
    MalformedMessageError,
    MessageTooLargeError,
    RequestInterruptedError,
    AlreadyProcessingError,
    StaleEpochError,
    InvalidIdError,
    RunnerClosedError,
)
DECLARED: Final = "declared"
"""The label of errors the handler declared (``errors=`` of `rpc`/`stream`)."""
OTHER: Final = "other"
"""The label of any other exception (a bug, or an error of the caller's own
code such as a ``primary_key`` function)."""
ERROR_LABELS: Final = (*(cls.__name__ for cls in _KNOWN), DECLARED, OTHER)
"""Every label `ErrorCounts` uses."""


class ErrorCounts:
    """Counts of errors raised to callers, by label (see the module docstring)."""

    __slots__ = ("by_label",)

    def __init__(self) -> None:
        self.by_label: dict[str, int] = {}
        """Label -> errors so far (labels never seen are absent)."""

    def count(self, handler: Handler, exc: BaseException) -> None:
        """Count ``exc``, raised to a caller of ``handler``."""
        if not isinstance(exc, Exception):
            return
        label = label_of(handler, exc)
        self.by_label[label] = self.by_label.get(label, 0) + 1


def label_of(handler: Handler, exc: Exception) -> str:
    """The label of ``exc``, raised to a caller of ``handler``."""
    if handler.reply.is_declared(exc):
        return DECLARED
    for cls in _KNOWN:
        if isinstance(exc, cls):
            return cls.__name__
    return OTHER
