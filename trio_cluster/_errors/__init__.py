"""The exception hierarchy of trio_cluster (edge-neutral: no I/O).

Every error the library raises derives from `ClusterError`. Errors that can
cross the wire between runners, or be recorded as a persisted reply, are
``attrs`` exception classes with plain fields, so they pickle and encode.

Foreign exceptions (psycopg, trio-websocket, msgpack, cattrs) are translated at
exactly one edge each and never escape the public API. This package's
``__init__`` imports no I/O library, so the sans-IO core may raise these errors
too; the one error that must also be a Trio resource error,
`RunnerClosedError`, lives beside it in `trio_cluster._errors._closed`.
"""

from __future__ import annotations

from typing import cast

import attrs

__all__ = [
    "AlreadyProcessingError",
    "CallInTransactionError",
    "ClusterError",
    "ClusterInternalError",
    "ConfigError",
    "DeadLetteredError",
    "DurableStateError",
    "EntityDefinitionError",
    "EntityNotAssignedError",
    "EventsUnsupportedError",
    "InvalidIdError",
    "InvalidMetadataError",
    "InvalidTransitionError",
    "MailboxFullError",
    "MalformedMessageError",
    "MessageTooLargeError",
    "NoCurrentRunnerError",
    "NotInTransactionError",
    "PersistenceError",
    "RemoteError",
    "RequestInterruptedError",
    "RunnerUnavailableError",
    "StaleEpochError",
    "StorageRefusedError",
    "UnknownEntityTypeError",
]


class ClusterError(Exception):
    """Root of every error raised by trio_cluster."""


def _rebuild(cls: type[ClusterError], fields: dict[str, object]) -> ClusterError:
    return cls(**fields)


class _WireError(ClusterError):
    """Base of the attrs-defined errors that cross the wire: they pickle by
    field (attrs keyword-only exceptions do not rebuild from ``args``)."""

    def __reduce__(self) -> tuple[object, ...]:
        fields = {
            field.name: getattr(self, field.name)
            for field in attrs.fields(cast("type[attrs.AttrsInstance]", type(self)))
        }
        return (_rebuild, (type(self), fields))


class ClusterInternalError(ClusterError):
    """An invariant of trio_cluster was broken: this is a bug, please report it."""


class InvalidIdError(ClusterError, ValueError):
    """An entity id or primary key that cannot be stored: empty, padded with
    whitespace, too long, or holding a NUL character or a lone surrogate.
    Raised before anything is sent or stored; other calls are not affected."""


class InvalidMetadataError(ClusterError, ValueError):
    """Call metadata that cannot travel: a key or value that is not a str,
    empty (keys), too long, reserved for the tracer, or holding a NUL
    character or a lone surrogate; or too many entries or characters in all
    (see `trio_cluster.with_metadata`). Raised before anything is sent."""


class NoCurrentRunnerError(ClusterError, RuntimeError):
    """`current_runner()` was called outside a runner's tasks and handlers."""


class NotInTransactionError(ClusterError, RuntimeError):
    """`current_transaction()` was called outside a transactional handler."""


class CallInTransactionError(ClusterError, RuntimeError):
    """A persisted call that waits for its reply was made inside a storage
    transaction (a transactional handler, ``runner.transaction()``): its
    request would exist only once the transaction commits, after the reply
    it waits for. Send it with ``.discard(...)`` (it is then saved in the
    transaction), or call after the transaction."""


class DurableStateError(ClusterError, RuntimeError):
    """Durable entity state was changed where the change could not be
    saved: outside a transactional handler of its entity (see
    `trio_cluster.durable`). Nothing changed."""


class ConfigError(ClusterError, ValueError):
    """A configuration value is invalid. The message says what to do instead."""


class EventsUnsupportedError(ClusterError, RuntimeError):
    """The runner's storage has no durable event log (a third-party backend
    whose sessions leave ``StorageSession.events`` None): use
    `MemoryStorage` or `PostgresStorage` for the event bus."""


class EntityDefinitionError(ClusterError, TypeError):
    """An entity class, handler or singleton is declared incorrectly.

    Raised eagerly, when the runner is opened (or the decorator runs), with a
    message naming the class and handler at fault.
    """


@attrs.define(eq=False, kw_only=True)
class MailboxFullError(_WireError):
    """The entity's mailbox is at ``mailbox_capacity``, or the runner is at
    ``max_resident_entities`` with no idle entity to passivate.

    Volatile messages only: a persisted one is queued beyond the capacity, or
    waits for room under the cap. The message was not delivered; retrying
    later is safe.
    """

    address: str
    """The entity address, in its string form ``type/id@group:shard``."""
    reason: str = "mailbox full"

    def __str__(self) -> str:
        return f"{self.reason}: {self.address}"


@attrs.define(eq=False, kw_only=True)
class EntityNotAssignedError(_WireError):
    """No runner currently serves the entity's shard (it is moving, or its
    lease lapsed), and the caller's deadline did not leave time to wait."""

    address: str
    detail: str = "shard not assigned to any live runner"

    def __str__(self) -> str:
        return f"{self.detail}: {self.address}"


@attrs.define(eq=False, kw_only=True)
class RunnerUnavailableError(_WireError):
    """A runner could not be reached, or went away while handling a request.

    For a volatile request the outcome is unknown: the handler may or may not
    have run (at most once).
    """

    runner: str
    detail: str = "runner unavailable"

    def __str__(self) -> str:
        return f"{self.detail}: {self.runner}"


@attrs.define(eq=False, kw_only=True)
class AlreadyProcessingError(_WireError):
    """A request with the same id is already being processed."""

    request_id: int

    def __str__(self) -> str:
        return f"request {self.request_id} is already being processed"


@attrs.define(eq=False, kw_only=True)
class RequestInterruptedError(_WireError):
    """The persisted request was interrupted (its sender cancelled it) before a
    value was produced. Seen by callers that attached to a request started by
    somebody else, through its primary key."""

    request_id: int

    def __str__(self) -> str:
        return f"request {self.request_id} was interrupted"


class PersistenceError(ClusterError):
    """The storage backend failed (lost connection, query error, timeout).

    The underlying driver exception, if any, is the ``__cause__``.
    """


class StorageRefusedError(PersistenceError):
    """Storage refused a write because of the data it carries (a value the
    backend cannot hold, a violated constraint), not because storage failed:
    writing the same data again fails again.

    A backend raises it for a batch that one item makes fail, before any of
    the batch is stored; the runtime then writes the batch's items apart, so
    only that item's caller gets an error (a persisted call whose request is
    refused raises `MalformedMessageError`, with this error as its cause).
    """


@attrs.define(eq=False, kw_only=True)
class InvalidTransitionError(_WireError):
    """A state machine's transition was asked for in a state it does not
    start from, or its handler returned a state it does not lead to (see
    `trio_cluster.transition`). Nothing changed."""

    transition: str
    """The transition's wire name."""
    state: str
    """The tag of the state the machine was in."""
    expected: tuple[str, ...]
    """The tags the transition starts from (or, for a returned state of
    another kind, leads to)."""
    returned: str | None = None
    """The tag (or class name) of the state the handler returned, if that
    was the fault."""

    def __str__(self) -> str:
        if self.returned is not None:
            return (
                f"transition {self.transition} returned {self.returned}, not one of"
                f" {', '.join(self.expected)}; the machine stays {self.state}"
            )
        return (
            f"transition {self.transition} is not allowed in state {self.state}"
            f" (only from {', '.join(self.expected)})"
        )


@attrs.define(eq=False, kw_only=True)
class StaleEpochError(_WireError):
    """A write that depends on shard ownership carried an epoch that is no
    longer current: another runner acquired the shard since. The write was
    refused (fencing)."""

    shard: str
    epoch: int
    current_epoch: int | None = None

    def __str__(self) -> str:
        return (
            f"stale epoch {self.epoch} for shard {self.shard}"
            f" (current {self.current_epoch})"
        )


@attrs.define(eq=False, kw_only=True)
class MalformedMessageError(_WireError, ValueError):
    """A message, reply or frame could not be decoded (or encoded).

    ``problems`` lists each problem with the path of the field at fault, for
    example ``"invalid value for type, expected int @ $.amount"``.
    """

    what: str
    problems: list[str] = attrs.field(factory=list)

    def __str__(self) -> str:
        if not self.problems:
            return f"malformed {self.what}"
        return f"malformed {self.what}: " + "; ".join(self.problems)


@attrs.define(eq=False, kw_only=True)
class MessageTooLargeError(_WireError, ValueError):
    """An encoded message or reply is larger than ``max_message_size``."""

    size: int
    limit: int

    def __str__(self) -> str:
        return f"encoded message is {self.size} bytes, over the limit of {self.limit}"


@attrs.define(eq=False, kw_only=True)
class UnknownEntityTypeError(_WireError):
    """The runner that owns the shard has no entity type (or handler) by that
    name registered."""

    entity_type: str
    handler: str | None = None

    def __str__(self) -> str:
        if self.handler is None:
            return f"unknown entity type {self.entity_type!r}"
        return f"entity type {self.entity_type!r} has no handler {self.handler!r}"


@attrs.define(eq=False, kw_only=True)
class RemoteError(_WireError):
    """A handler raised an exception it did not declare.

    The original exception stays on the runner that ran the handler (where it
    is logged with its traceback); the caller gets its type name and message.
    The entity was restarted with backoff.
    """

    type_name: str
    """Name of the original exception type: the bare name for builtins
    (``KeyError``), else ``module.QualName`` (``myapp.errors.Overdrawn``)."""
    message: str
    """``str()`` of the original exception."""
    address: str
    """The entity that raised it."""
    runner: str
    """The runner that ran the handler."""

    def __str__(self) -> str:
        return f"{self.type_name}: {self.message} (in {self.address} on {self.runner})"


@attrs.define(eq=False, kw_only=True)
class DeadLetteredError(_WireError):
    """A persisted request was dead-lettered: its attempts ran out (see
    `RetryPolicy`), or its last error was ``non_retryable``.

    It is its final reply, recorded once; a copy of the request is kept with
    the dead letters (``trio-cluster dlq list``), from where it can be
    replayed as a new request.
    """

    request_id: int
    """The request's id (its dead letter's id)."""
    attempts: int
    """Attempts it had (each a hand-over to its handler)."""
    error: str
    """What ended its last attempt: the exception its handler raised (as
    `RemoteError` reports one), or that its runner stopped during it."""

    def __str__(self) -> str:
        return (
            f"request {self.request_id} was dead-lettered after"
            f" {self.attempts} attempt(s): {self.error}"
        )


def _fixup_module_metadata() -> None:
    for name in __all__:
        obj = globals()[name]
        obj.__module__ = "trio_cluster"


_fixup_module_metadata()
