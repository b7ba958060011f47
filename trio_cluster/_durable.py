"""Durable entity state: the `durable` declaration and its descriptor (definition layer).

An entity class declares at most one durable state attribute::

    @attrs.frozen
    class Tally:
        count: int = 0

    class Counter(Entity):
        type_name = "Counter"
        state = durable(Tally)                # Durable[Tally]; initial Tally()

        @rpc(persisted=True, transactional=True)
        async def add(self, msg: Add) -> int:
            self.state = Tally(self.state.count + msg.amount)
            return self.state.count

Theory of operation: the value lives in a `StateCell` on the incarnation
(``Entity._tc_state``), with the encoding and version of the snapshot it
was loaded from or last saved as. The engine loads the snapshot at
activation (before ``on_start``), saves the value in the transaction of
each transactional handler whose value changed (with its reply, fenced by
the shard epoch), and puts the last committed value back when that
transaction does not commit (`trio_cluster._engine._durable_state`).

Assignment is the only way to change the state (state values are meant to
be immutable: frozen attrs classes, builtins), and it is allowed only in a
transactional handler of the entity (`state_writer_var`): anywhere else
(a volatile or non-transactional handler, a stream, ``on_start``) it raises
`DurableStateError` and changes nothing, so no change is ever silently lost.
An entity constructed by hand, outside any runner (a unit test), keeps its
state as a plain attribute.
"""

from __future__ import annotations

from contextvars import ContextVar
from typing import TYPE_CHECKING, Any, Generic, Protocol, TypeVar, cast, overload

import attrs
import trio

from ._errors import DurableStateError, EntityDefinitionError, MalformedMessageError
from ._storage_state import MAX_LABEL
from .serialization._converter import Codec

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    import cattrs

__all__ = [
    "Durable",
    "PendingSave",
    "StateCell",
    "StateCodec",
    "StateWriter",
    "checkpoint_state",
    "durable",
    "state_writer_var",
]

S = TypeVar("S")


class StateWriter:
    """The transactional handler running in this context (`state_writer_var`):
    the entity whose durable state it may change, and the state it changed."""

    __slots__ = ("cell", "checkpoint", "slot")

    def __init__(
        self, slot: object, checkpoint: Callable[[StateWriter], Awaitable[None]]
    ) -> None:
        self.slot = slot
        """The slot (the engine's record of the entity) it runs for."""
        self.checkpoint = checkpoint
        """Commits the state it assigned now, outside the handler's
        transaction (`checkpoint_state`)."""
        self.cell: StateCell | None = None
        """The state it assigned (None: it changed nothing). Kept here, not
        looked up on the entity afterwards: by the time the transaction
        saves it, the incarnation may already be gone from its slot (its
        shard stopped while the transaction was still being written)."""


state_writer_var: ContextVar[StateWriter | None] = ContextVar(
    "trio_cluster.state_writer", default=None
)
"""The transactional handler running in this context, if any."""


class StateCodec(Protocol):
    """Encodes and decodes one entity type's state."""

    def encode(self, value: Any, /) -> bytes: ...

    def decode(self, data: bytes, /) -> Any: ...


class StateCell:
    """An incarnation's durable state: its value, and the snapshot it stands
    on (what a rollback goes back to)."""

    __slots__ = ("committed", "payload", "value", "version", "watchers")

    def __init__(self, value: object, payload: bytes | None, version: int) -> None:
        self.value = value
        """The current value (changed by the running transactional handler
        before it commits)."""
        self.committed = value
        """The last committed (or loaded) value."""
        self.payload = payload
        """The encoding of ``committed``; None if it was never encoded (an
        entity made by hand)."""
        self.version = version
        """The stored version ``payload`` is (0: none)."""
        self.watchers: trio.lowlevel.ParkingLot | None = None
        """Tasks waiting for the next commit (`wait_commit`)."""

    def commit(self, value: object, payload: bytes, version: int) -> None:
        """``value`` (encoded as ``payload``) was saved as ``version``."""
        self.committed, self.payload, self.version = value, payload, version
        if self.watchers is not None:
            self.watchers.unpark_all()

    async def wait_commit(self) -> None:
        """Wait until the next commit (cancellable; no other error)."""
        if self.watchers is None:
            self.watchers = trio.lowlevel.ParkingLot()
        await self.watchers.park()


@attrs.frozen(eq=False)
class PendingSave:
    """A state saved in an open transaction, committed with it."""

    cell: StateCell
    value: object
    payload: bytes
    version: int

    def commit(self) -> None:
        self.cell.commit(self.value, self.payload, self.version)


class Durable(Generic[S]):
    """The descriptor made by `durable`: reads and assigns the entity's
    durable state (``self.state``). On the class, it is the declaration."""

    __slots__ = ("attribute", "initial", "label", "type")

    def __init__(
        self,
        type_: Any,
        initial: Callable[[], S],
        label: Callable[[S], str] | None = None,
    ) -> None:
        self.type = type_
        """The state's type (what the converter encodes)."""
        self.initial = initial
        """Makes the value of an entity with no stored state."""
        self.label = label
        """Makes the label a value is saved with (None: no label)."""
        self.attribute = "state"

    def __set_name__(self, owner: type, attribute: str) -> None:
        self.attribute = attribute

    def codec(self, converter: cattrs.Converter, where: str) -> StateCodec:
        """The codec of the state, on the runner's converter.

        Raises:
            EntityDefinitionError: the converter cannot encode the type.
        """
        return Codec(converter, self.type, f"{where} durable state")

    def label_of(self, value: Any) -> str | None:
        """The label ``value`` is saved with (listed and counted by).

        Raises:
            MalformedMessageError: the label function raised, or made no str
                of at most `MAX_LABEL` characters (the state cannot be saved,
                as when it does not encode: nothing changes).
        """
        if self.label is None:
            return None
        what = f"label of the durable {self.attribute}"
        try:
            label: object = self.label(value)
        except Exception as exc:
            raise MalformedMessageError(what=what, problems=[repr(exc)]) from exc
        if not isinstance(label, str) or len(label) > MAX_LABEL:
            problem = f"must be a str of at most {MAX_LABEL} characters, got {label!r}"
            raise MalformedMessageError(what=what, problems=[problem])
        return label

    def check(self, value: object) -> None:
        """Raise `TypeError` if ``value`` is not a state of this type."""
        if isinstance(self.type, type) and not isinstance(value, self.type):
            raise TypeError(
                f"{self.attribute} must be a {self.type.__name__},"
                f" got {type(value).__name__}"
            )

    def cell(self, instance: Any) -> StateCell:
        """``instance``'s cell, made with the initial value if it has none."""
        try:
            cell: StateCell = instance._tc_state
        except AttributeError:
            cell = instance._tc_state = StateCell(self.initial(), None, 0)
        return cell

    @overload
    def __get__(self, instance: None, owner: type[Any]) -> Durable[S]: ...
    @overload
    def __get__(self, instance: object, owner: type[Any]) -> S: ...
    def __get__(self, instance: object, owner: type[Any]) -> Durable[S] | S:
        if instance is None:
            return self
        return cast("S", self.cell(instance).value)

    def __set__(self, instance: object, value: S) -> None:
        slot = getattr(instance, "_tc_slot", None)
        writer = state_writer_var.get()
        if slot is not None and (writer is None or writer.slot is not slot):
            raise DurableStateError(
                f"{type(instance).__name__}.{self.attribute} can change only in a"
                " transactional handler of its entity"
                " (@rpc(persisted=True, transactional=True)), where it is saved"
                " with the reply; nothing changed"
            )
        self.check(value)
        cell = self.cell(instance)
        cell.value = value
        if writer is not None:
            writer.cell = cell


def durable(
    type_: type[S],
    /,
    *,
    initial: Callable[[], S] | None = None,
    label: Callable[[S], str] | None = None,
) -> Durable[S]:
    """Declare an entity's durable state: ``state = durable(Tally)``.

    The state is loaded when the entity is activated (before ``on_start``;
    an entity with no stored state starts from ``initial()``), and saved
    when a transactional handler (``@rpc(persisted=True,
    transactional=True)``) that changed it commits: in the handler's
    storage transaction, together with its reply, fenced by the shard's
    epoch. If the transaction does not commit (the handler crashed, was
    interrupted, its shard moved on, storage failed), the value goes back to
    the last committed one. Assigning it anywhere else raises
    `DurableStateError`. See ``docs/state.md``.

    Args:
        type_: the state's type: an immutable value the runner's converter
            encodes (a frozen attrs class, a builtin).
        initial: makes the initial value; default ``type_()``.
        label: makes, from a value, the short text (at most 200 characters)
            it is saved with, which storage can list and count snapshots by
            (``StateStorage.list_states``/``count_states``) without decoding
            them: a status, a state's name. None: no label.

    Raises:
        EntityDefinitionError: ``type_`` is not a type, or ``initial`` or
            ``label`` is not callable.
    """
    if not isinstance(type_, type):
        raise EntityDefinitionError(
            f"durable(): the state type must be a class, got {type_!r}"
        )
    if initial is None:
        initial = type_
    elif not callable(initial):
        raise EntityDefinitionError(
            f"durable(): initial must make the initial value, got {initial!r}"
        )
    if label is not None and not callable(label):
        raise EntityDefinitionError(
            f"durable(): label must make a str of a value, got {label!r}"
        )
    return Durable(type_, initial, label)


async def checkpoint_state() -> None:
    """Commit the durable state the running transactional handler assigned,
    now, in a storage write of its own (fenced by the shard's epoch and the
    version it replaces, as the handler's own save), instead of waiting for
    the handler's transaction: a *checkpoint*. What the handler writes in its
    transaction (its reply, its SQL, the messages it sends) still commits
    only with the transaction; if that rolls back, the state goes back to
    the last checkpoint (not further). Nothing to do if the state did not
    change since it was last committed.

    Raises:
        DurableStateError: not in a transactional handler of an entity with
            durable state (nothing is saved).
        PersistenceError: storage failed (nothing is known to be saved: the
            state in memory stays as assigned).
        Exception: an internal one when the shard's epoch moved on (this
            runner no longer owns the entity): let it propagate; the
            runtime ends the handler, records nothing, and the request
            runs on the new owner.
        RetryLater: the stored state is newer than this incarnation's.

    Cancellation: the write may or may not have committed; the handler
    then rolls back to the last known commit and the request runs again.
    """
    writer = state_writer_var.get()
    if writer is None:
        await trio.lowlevel.checkpoint()
        raise DurableStateError(
            "checkpoint_state() runs only in a transactional handler of an entity"
            " with durable state"
        )
    await writer.checkpoint(writer)
