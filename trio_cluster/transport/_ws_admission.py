"""Admission of accepted connections: how many a WebSocket endpoint holds at
once (Trio driver helper of the transport edge).

Theory of operation. Every accepted stream asks `Admission.admit` for a
`Slot` before anything is read from it. There are two bounds:

* ``max_connections``: accepted connections open at once, whether still
  handshaking or up;
* ``max_pending_handshakes`` (smaller): those of them that have not
  completed their hello yet. A client that connects and says nothing holds
  one of these until ``connect_timeout`` closes it.

A stream over either bound is refused at once: closed without reading a
byte, counted in ``connections_refused``; the connections already admitted
are untouched. A slot is released when its connection's task ends
(`Slot.release`), and stops counting as pending when the hello is done
(`Slot.hello_done`). Connections this endpoint dials are not counted: they
are bounded by the peers the runtime sends to, not by what clients do.
"""

from __future__ import annotations

import attrs

from .._errors import ConfigError
from ._peers import positive_int

__all__ = ["Admission", "ConnectionLimits", "Slot"]


@attrs.frozen
class ConnectionLimits:
    """How many accepted connections an endpoint holds (validated eagerly).

    Raises:
        ConfigError: a value that is not an int >= 1, or
            ``max_pending_handshakes`` over ``max_connections``.
    """

    max_connections: int = attrs.field(validator=positive_int)
    """Most accepted connections open at once (handshaking or up)."""
    max_pending_handshakes: int = attrs.field(validator=positive_int)
    """Most accepted connections whose hello is not done yet."""

    def __attrs_post_init__(self) -> None:
        if self.max_pending_handshakes > self.max_connections:
            raise ConfigError(
                f"max_pending_handshakes ({self.max_pending_handshakes}) must be"
                f" at most max_connections ({self.max_connections})"
            )


class Slot:
    """One admitted connection's place (see `Admission.admit`)."""

    def __init__(self, admission: Admission) -> None:
        self._admission: Admission | None = admission
        self._pending = True

    def hello_done(self) -> None:
        """The client's hello is checked: no longer a pending handshake."""
        if self._pending and self._admission is not None:
            self._pending = False
            self._admission.pending -= 1

    def release(self) -> None:
        """The connection is closed: free its place (idempotent)."""
        admission = self._admission
        if admission is None:
            return
        self.hello_done()
        admission.open -= 1
        self._admission = None


class Admission:
    """The counts of an endpoint's accepted connections, against its
    `ConnectionLimits`."""

    def __init__(self, limits: ConnectionLimits) -> None:
        self.limits = limits
        self.open = 0
        """Accepted connections holding a slot."""
        self.pending = 0
        """Those of them whose hello is not done."""

    def admit(self) -> Slot | None:
        """A slot for a newly accepted stream; None if a limit is reached
        (the caller closes the stream at once and counts it)."""
        limits = self.limits
        if (
            self.open >= limits.max_connections
            or self.pending >= limits.max_pending_handshakes
        ):
            return None
        self.open += 1
        self.pending += 1
        return Slot(self)
