"""How a job ended, as a tagged union, and the exception -> `Exit` mapping
(pure helpers of the Trio driver; no Trio, no I/O).

An `Outcome` is one of:

* `Exit`: a value or an error for the caller (or the sink, which records it);
* `Requeue` (its one member `REQUEUE`): a persisted job was cut short by a
  restart of its entity; it goes back to the front of the mailbox and runs
  again, and nothing is reported;
* `NotRun` (`NOT_RUN`): the job never ran here, or was cut short by its shard
  stopping. A local caller routes it again; a persisted request stays stored
  and the shard's next owner delivers it again.

The markers are single-member enums, the typed form of a sentinel: mypy
narrows ``outcome is REQUEUE`` and makes every consumer handle all three.

The functions below turn what a handler did (returned, raised a declared
error, crashed, was stopped) into the `Exit` its caller sees. When local
calls are serialized, values and declared errors make the round trip through
their codecs, exactly as they would across the wire.
"""

from __future__ import annotations

import enum
from typing import TYPE_CHECKING, Any, Final, TypeAlias

from .._core._job import StopReason
from .._errors import EntityNotAssignedError, RemoteError, RequestInterruptedError
from ..serialization._replies import Exit, value_exit

if TYPE_CHECKING:
    from .._core._addresses import EntityAddress
    from .._registry import Handler

__all__ = [
    "NOT_RUN",
    "REQUEUE",
    "NotRun",
    "Outcome",
    "Requeue",
    "RetryLater",
    "crashed",
    "declared",
    "interrupted",
    "not_served",
    "returned",
    "stopped",
    "stream_item",
    "type_name",
]


class Requeue(enum.Enum):
    """Marker outcome: replay the persisted job (see the module docstring)."""

    REQUEUE = "requeue"


class NotRun(enum.Enum):
    """Marker outcome: the job did not run here (see the module docstring)."""

    NOT_RUN = "not run"


REQUEUE: Final = Requeue.REQUEUE
NOT_RUN: Final = NotRun.NOT_RUN

Outcome: TypeAlias = Exit | Requeue | NotRun
"""How a job ended (see the module docstring)."""


class RetryLater(Exception):
    """Raised by a job's `Around` wrapper: its work could not be completed
    (e.g. a transaction failed to commit); run it again after a backoff. The
    cause is the ``__cause__``."""


def type_name(exc: BaseException) -> str:
    """The name `RemoteError` reports for ``exc``'s type: the bare name for
    builtins, else ``module.QualName``."""
    cls = type(exc)
    return (
        cls.__qualname__
        if cls.__module__ == "builtins"
        else f"{cls.__module__}.{cls.__qualname__}"
    )


def returned(handler: Handler, value: object, serialize: bool) -> Exit:
    """The outcome of a handler that returned ``value``.

    With ``serialize``, the value as the caller would decode it (the value
    itself when that is the same immutable value), or the
    `MalformedMessageError` saying why it cannot travel.
    """
    if serialize and handler.reply.value.size_if_unchanged(value) is None:
        try:
            return handler.reply.decode_exit(handler.reply.encode_value(value))
        except Exception as exc:  # MalformedMessageError: the reply cannot travel
            return Exit(error=exc)
    return value_exit(value)


def declared(handler: Handler, exc: Exception, serialize: bool) -> Exit:
    """The outcome of a handler that raised one of its declared errors.

    With ``serialize``, the error as the caller would decode it, or the error
    saying why it cannot travel.
    """
    if serialize:
        try:
            return handler.reply.decode_exit(handler.reply.encode_error(exc))
        except Exception as encode_error:
            return Exit(error=encode_error)
    return Exit(error=exc)


def crashed(exc: Exception, *, address: EntityAddress, runner: str) -> Exit:
    """The outcome of a handler that raised an undeclared exception: a
    `RemoteError` naming it, with the original as its ``__cause__``. Its
    message is cut to `REMOTE_MESSAGE_LIMIT` characters: it travels to the
    caller, and an exception's text may carry a whole payload."""
    remote = RemoteError(
        type_name=type_name(exc),
        message=_cut(str(exc)),
        address=str(address),
        runner=runner,
    )
    remote.__cause__ = exc
    return Exit(error=remote, failure=exc)


REMOTE_MESSAGE_LIMIT = 1000
"""Characters of an undeclared exception's message that reach its caller."""


def _cut(message: str) -> str:
    if len(message) <= REMOTE_MESSAGE_LIMIT:
        return message
    rest = len(message) - REMOTE_MESSAGE_LIMIT
    return f"{message[:REMOTE_MESSAGE_LIMIT]}... ({rest} more characters)"


def interrupted(request_id: int) -> Exit:
    """The outcome of a persisted request interrupted by its sender."""
    return Exit(error=RequestInterruptedError(request_id=request_id))


def not_served(address: EntityAddress) -> Exit:
    """The outcome of a job bounced before it ran (its shard stopped)."""
    return Exit(
        error=EntityNotAssignedError(
            address=str(address), detail="shard stopped before the request ran"
        )
    )


def stopped(
    reason: StopReason | None,
    *,
    persisted: bool,
    request_id: int | None,
    address: EntityAddress,
    runner: str,
) -> Outcome:
    """The outcome of a handler whose scope the runtime cancelled, for
    ``reason`` (None: its shard stopped)."""
    if reason is StopReason.INTERRUPTED:
        return interrupted(request_id or 0)
    if reason is StopReason.SIBLING_CRASHED:
        if persisted:
            return REQUEUE
        # TODO(review rec. 9): a real error type instead of this type name;
        # callers and tests match it today.
        return Exit(
            error=RemoteError(
                type_name="trio_cluster.EntityRestarted",
                message="another handler of this entity crashed; the entity restarted",
                address=str(address),
                runner=runner,
            )
        )
    if persisted:
        # Detached jobs die with their shard's nursery before getting here
        # (Trio lets Cancelled reach the outermost cancelled scope); this
        # guards the rule should that ever change: record nothing.
        return NOT_RUN
    return Exit(
        error=EntityNotAssignedError(
            address=str(address),
            detail="shard stopped while the handler ran (it may have partly run)",
        )
    )


def stream_item(handler: Handler, item: Any, serialize: bool) -> Any:
    """One item of a stream as its caller receives it (with ``serialize``,
    after the round trip through the handler's value codec)."""
    if not serialize:
        return item
    codec = handler.reply.value
    return codec.decode(codec.encode(item))
