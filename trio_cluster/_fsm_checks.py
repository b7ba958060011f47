"""Definition checks of state-machine entities (definition layer): run when
a `trio_cluster.StateMachine` subclass is defined."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import attrs

from ._errors import EntityDefinitionError
from ._fsm_records import StateTimeout

__all__ = ["check_machine", "check_transitions", "state_classes"]


def state_classes(value: object, what: str) -> tuple[type, ...]:
    listed = (value,) if isinstance(value, type) else value
    if not isinstance(listed, Sequence) or not listed:
        raise EntityDefinitionError(f"transition(): {what} must name state classes")
    classes = tuple(listed)
    if not all(isinstance(c, type) for c in classes):
        raise EntityDefinitionError(
            f"transition(): {what} must be classes, got {value!r}"
        )
    return classes


def check_machine(cls: Any) -> None:
    where = cls.__qualname__
    states = cls.__dict__["states"]
    if not isinstance(states, Mapping) or len(states) < 2:
        raise EntityDefinitionError(
            f"{where}: states must map two or more stable tags to state classes"
        )
    for tag, state in states.items():
        if not isinstance(tag, str) or not tag:
            raise EntityDefinitionError(f"{where}: state tags must be strings")
        if not isinstance(state, type) or not attrs.has(state):
            raise EntityDefinitionError(
                f"{where}: state {tag!r} must be an attrs class, got {state!r}"
            )
    if len(set(states.values())) != len(states):
        raise EntityDefinitionError(f"{where}: a state class is listed twice")
    if not callable(getattr(cls, "initial_state", None)):
        raise EntityDefinitionError(
            f"{where}: set initial_state to a state class (or a function making"
            " the initial state)"
        )
    for state, timeout in cls.state_timeouts.items():
        if state not in states.values() or not isinstance(timeout, StateTimeout):
            raise EntityDefinitionError(
                f"{where}: state_timeouts maps state classes to StateTimeout,"
                f" got {state!r}: {timeout!r}"
            )
        if not timeout.after >= 0:
            raise EntityDefinitionError(f"{where}: a StateTimeout's after is >= 0")


def check_transitions(cls: Any) -> None:
    """Every transition's states are the machine's; every timeout's
    transition is one of its transitions."""
    where = cls.__qualname__
    known = set(cls.states.values())
    transitions = {}
    for spec in cls.__tc_handlers__.values():
        declared = getattr(spec.fn, "__tc_transition__", None)
        if declared is not None:
            transitions[spec.attribute] = declared
            unknown = [
                c.__name__ for c in (*declared[0], *declared[1]) if c not in known
            ]
            if unknown:
                raise EntityDefinitionError(
                    f"{where}.{spec.attribute}: {', '.join(unknown)} is not a state"
                    " of the machine (list it in states)"
                )
    for state, timeout in cls.state_timeouts.items():
        declared = transitions.get(timeout.transition)
        if declared is None:
            raise EntityDefinitionError(
                f"{where}: the timeout of {state.__name__} names"
                f" {timeout.transition!r}, which is no transition of the machine"
            )
        if state not in declared[0]:
            raise EntityDefinitionError(
                f"{where}: the timeout of {state.__name__} runs"
                f" {timeout.transition}, which does not start from it"
            )
