"""The messages and records of state-machine entities (definition layer)."""

from __future__ import annotations

from typing import Any

import attrs

__all__ = ["Entry", "GetState", "StateTimedOut", "StateTimeout", "WatchState"]


@attrs.frozen
class StateTimeout:
    """A state's timeout: ``after`` seconds in it, run ``transition``."""

    after: float
    """Seconds after entering the state."""
    transition: str
    """The attribute name of the `transition` to run; it takes a
    `StateTimedOut` message."""


@attrs.frozen
class StateTimedOut:
    """The message of a state timeout (and of the transition it runs)."""

    entry: int
    """The entry (transitions made so far) that armed it."""
    at: float
    """When it was due (Unix seconds)."""


@attrs.frozen
class GetState:
    """The message of ``current_state``."""


@attrs.frozen
class WatchState:
    """The message of ``watch_state``."""


@attrs.frozen
class Entry:
    """The stored value of a machine: its state and entry number."""

    state: Any
    number: int
