"""State-machine entities: `StateMachine`, `transition`, state timeouts (definition layer).

A state machine is an entity whose durable state (`trio_cluster.durable`)
is one of a closed set of states, attrs classes each with a stable tag::

    class Order(StateMachine[Pending | Paid | Shipped | Cancelled]):
        type_name = "Order"
        states = {"pending": Pending, "paid": Paid, "shipped": Shipped,
                  "cancelled": Cancelled}
        initial_state = Pending
        state_timeouts = {Paid: StateTimeout(after=3600.0, transition="give_up")}

        @transition(from_=Pending, to=Paid)
        async def pay(self, msg: Pay) -> Paid:
            return Paid(amount=msg.amount)

Theory of operation:

* A transition is a persisted, transactional rpc whose handler returns the
  next state. Before the handler runs, the machine's state must be one the
  transition starts from (``from_``); the state it returns must be one it
  leads to (``to``). Otherwise the caller gets `InvalidTransitionError` (a
  declared error) and nothing changes. Otherwise the state is assigned and
  saved with the reply, in the handler's transaction (durable state).
* The stored value is the state with its *entry number*: how many
  transitions the machine made. Entering a state that has a `StateTimeout`
  sends the machine a persisted ``deliver_at`` message (saved in the same
  transaction: it exists if and only if the transition committed) naming
  that entry. When it is delivered, if the machine is still in that entry
  (no transition since), the timeout's transition runs, with the
  `StateTimedOut` message; otherwise it is ignored. Being persisted, the
  timeout survives failover and restarts.
* ``current_state`` (an rpc) answers the committed state; ``watch_state``
  (a stream) yields it, then every state committed after it.

Its messages and records are in `._fsm_records`, its definition checks in
`._fsm_checks`.
"""

from __future__ import annotations

import functools
import typing
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from typing import Any, ClassVar, Generic, TypeVar, cast

import msgpack

from ._context import runner_context
from ._durable import Durable, StateCell
from ._entity import Entity
from ._errors import InvalidTransitionError, MalformedMessageError
from ._fsm_checks import check_machine, check_transitions, state_classes
from ._fsm_records import Entry, GetState, StateTimedOut, StateTimeout, WatchState
from ._handlers import Rpc, rpc, stream
from .serialization._converter import (
    Codec,
    describe_decode_error,
    register_tagged_union,
)

if typing.TYPE_CHECKING:
    import cattrs

__all__ = [
    "GetState",
    "StateMachine",
    "StateTimedOut",
    "StateTimeout",
    "WatchState",
    "transition",
]

S = TypeVar("S")
E = TypeVar("E", bound="StateMachine[Any]")
M = TypeVar("M")
R = TypeVar("R")

_TAG_KEY = "_state"
"""The key of a state's tag in its encoding (and in ``current_state``
replies)."""


class _MachineCodec:
    """Encodes an `Entry` as ``[tagged state, entry number]``."""

    def __init__(self, states: Codec[Any]) -> None:
        self._states = states

    def encode(self, value: Any, /) -> bytes:
        primitive = [self._states.unstructure(value.state), value.number]
        return cast("bytes", msgpack.packb(primitive))

    def decode(self, data: bytes, /) -> Any:
        """Raises: MalformedMessageError: ``data`` is no stored machine."""
        try:
            state, number = msgpack.unpackb(data)
            if type(number) is not int:
                raise TypeError(f"entry number must be an int, got {number!r}")
        except (ValueError, TypeError, msgpack.UnpackException) as exc:
            raise MalformedMessageError(
                what=self._states.what, problems=describe_decode_error(exc)
            ) from None
        return Entry(self._states.structure(state), number)


class _MachineState(Durable[Any]):
    """The durable state of one `StateMachine` class: reads as its state,
    stores it with its entry number."""

    __slots__ = ("machine", "tags")

    def __init__(self, machine: type[StateMachine[Any]]) -> None:
        classes = tuple(machine.states.values())
        union = classes[0] if len(classes) == 1 else typing.Union[classes]  # noqa: UP007
        super().__init__(union, lambda: Entry(machine.initial_state(), 0))
        self.machine = machine
        self.tags = {cls: tag for tag, cls in machine.states.items()}

    def tag_of(self, state: object) -> str:
        return self.tag_of_class(type(state))

    def tag_of_class(self, cls: type) -> str:
        return self.tags.get(cls, cls.__name__)

    def label_of(self, value: Any) -> str:
        """A machine is saved labelled with its state's tag (storage lists
        and counts machines by state)."""
        return self.tag_of(value.state)

    def codec(self, converter: cattrs.Converter, where: str) -> _MachineCodec:
        register_tagged_union(converter, self.type, self.tags, tag_name=_TAG_KEY)
        return _MachineCodec(Codec(converter, self.type, f"{where} state"))

    def check(self, value: object) -> None:
        state = value.state if isinstance(value, Entry) else value
        if type(state) not in self.tags:
            raise TypeError(
                f"{self.machine.__name__} has no state {type(state).__name__};"
                f" its states are {', '.join(self.tags.values())}"
            )

    def __get__(self, instance: object, owner: type[Any]) -> Any:
        if instance is None:
            return self
        return self.entry(instance).state

    def __set__(self, instance: object, value: Any) -> None:
        entry = self.entry(instance)
        super().__set__(instance, Entry(value, entry.number + 1))

    def entry(self, instance: object) -> Entry:
        return cast("Entry", self.cell(instance).value)


def _machine_state(instance: StateMachine[Any]) -> _MachineState:
    return cast("_MachineState", type(instance).__tc_durable__)


class StateMachine(Entity, Generic[S]):
    """Base class of state-machine entities (see the module docstring).

    Class attributes:
        states: every state, by stable tag (the wire name of each state
            class: renaming a class must not orphan stored machines).
        initial_state: makes the state of a machine with none stored.
        state_timeouts: state class -> `StateTimeout`.

    ``self.state`` is the machine's state; transitions change it (it reads
    like durable state, and changes only in transactional handlers).
    """

    states: ClassVar[Mapping[str, type[Any]]]
    initial_state: ClassVar[Callable[[], Any]]
    state_timeouts: ClassVar[Mapping[type[Any], StateTimeout]] = {}

    state: Durable[S] = cast("Durable[S]", None)
    """Replaced in each subclass by its own `_MachineState`."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        if "states" in cls.__dict__:
            check_machine(cls)
            descriptor = _MachineState(cls)
            descriptor.__set_name__(cls, "state")
            cls.state = descriptor
            union = descriptor.type
            _set_handler(cls, "current_state", _current_state, GetState, union)
            _set_handler(cls, "watch_state", _watch_state, WatchState, union)
        super().__init_subclass__(**kwargs)
        if "states" in cls.__dict__:
            check_transitions(cls)

    # Typed for clients; each subclass gets its own, with its state type.
    @rpc
    async def current_state(self, msg: GetState) -> S:
        """The machine's committed state."""
        raise NotImplementedError  # pragma: no cover - replaced per subclass

    @stream
    async def watch_state(self, msg: WatchState) -> AsyncIterator[S]:
        """The machine's committed state, then each one committed after it."""
        raise NotImplementedError  # pragma: no cover
        yield  # type: ignore[unreachable]  # an async generator

    @rpc(
        persisted=True,
        transactional=True,
        primary_key=lambda msg: str(msg.entry),
        deliver_at=lambda msg: msg.at,
        errors=[InvalidTransitionError],
        name="tc.state_timeout",
    )
    async def state_timeout(self, msg: StateTimedOut) -> None:
        """Run the timeout's transition if the machine is still in the entry
        that armed it (see the module docstring)."""
        if _machine_state(self).entry(self).number != msg.entry:
            return  # a transition came first
        timeout = self.state_timeouts.get(type(self.state))
        if timeout is None:  # pragma: no cover - armed only for such states
            return
        run = getattr(self, timeout.transition)
        await run(msg)


async def _current_state(self: StateMachine[Any], msg: GetState) -> Any:
    cell: StateCell = _machine_state(self).cell(self)
    return cast("Entry", cell.committed).state


async def _watch_state(self: StateMachine[Any], msg: WatchState) -> AsyncIterator[Any]:
    cell: StateCell = _machine_state(self).cell(self)
    last = None
    while True:
        entry = cast("Entry", cell.committed)
        if entry is not last:
            last = entry
            yield entry.state
        else:
            await cell.wait_commit()


def _set_handler(
    cls: type[StateMachine[Any]],
    attribute: str,
    fn: Callable[..., Any],
    message: type,
    reply: Any,
) -> None:
    """Give ``cls`` its own ``attribute`` handler: ``fn`` with ``cls``'s
    message and reply types."""

    if attribute == "watch_state":

        async def run_stream(self: Any, msg: Any) -> AsyncIterator[Any]:
            async for item in fn(self, msg):
                yield item

        run_stream.__annotations__ = {"msg": message, "return": AsyncIterator[reply]}
        descriptor: Any = stream(run_stream)
    else:

        async def run_rpc(self: Any, msg: Any) -> Any:
            return await fn(self, msg)

        run_rpc.__annotations__ = {"msg": message, "return": reply}
        descriptor = rpc(run_rpc)
    descriptor.__set_name__(cls, attribute)
    setattr(cls, attribute, descriptor)


def transition(
    *,
    from_: type | Sequence[type],
    to: type | Sequence[type],
    errors: Sequence[type[Exception]] = (),
    primary_key: Callable[[Any], str] | None = None,
    name: str | None = None,
) -> Callable[[Callable[[E, M], Awaitable[R]]], Rpc[E, M, R]]:
    """Declare a transition of a `StateMachine`: ``async def method(self,
    message: M) -> NextState``, returning the next state.

    It is a persisted, transactional rpc (``@rpc(persisted=True,
    transactional=True)``): the next state is saved with its reply.

    Args:
        from_: the state class(es) it may start from.
        to: the state class(es) it may lead to.
        errors: more declared errors (a declared error commits, and leaves
            the state as it was).
        primary_key: deduplication, as for `rpc`.
        name: wire name, as for `rpc`.

    Raises (at the caller):
        InvalidTransitionError: the machine is in no ``from_`` state, or the
            handler returned no ``to`` state; nothing changed.

    Raises:
        EntityDefinitionError: ``from_`` or ``to`` is not a class or classes.
    """
    sources, targets = state_classes(from_, "from_"), state_classes(to, "to")

    def decorate(fn: Callable[[E, M], Awaitable[R]]) -> Rpc[E, M, R]:
        @functools.wraps(fn)
        async def run(self: E, message: M) -> R:
            machine = _machine_state(self)
            wire = name or fn.__name__
            current = self.state
            if not isinstance(current, sources):
                raise InvalidTransitionError(
                    transition=wire,
                    state=machine.tag_of(current),
                    expected=tuple(machine.tag_of_class(c) for c in sources),
                )
            following = await fn(self, message)
            if not isinstance(following, targets):
                raise InvalidTransitionError(
                    transition=wire,
                    state=machine.tag_of(current),
                    expected=tuple(machine.tag_of_class(c) for c in targets),
                    returned=machine.tag_of(following),
                )
            self.state = following
            await _arm_timeout(self, machine)
            return following

        run.__tc_transition__ = (sources, targets)  # type: ignore[attr-defined]
        return rpc(
            persisted=True,
            transactional=True,
            errors=[InvalidTransitionError, *errors],
            primary_key=primary_key,
            name=name,
        )(run)

    return decorate


async def _arm_timeout(self: StateMachine[Any], machine: _MachineState) -> None:
    """Send the machine the timeout of the state it just entered, if any
    (in the transition's transaction)."""
    timeout = self.state_timeouts.get(type(self.state))
    if timeout is None:
        return
    entry = machine.entry(self).number
    at = runner_context().clock.now() + timeout.after
    await self.state_timeout.discard(StateTimedOut(entry=entry, at=at))
