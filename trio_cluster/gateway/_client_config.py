"""How a gateway client connects, and the state it reports (definition
layer of the client: no I/O)."""

from __future__ import annotations

from typing import Any

import attrs

from .._core._retry import Backoff
from .._errors import ConfigError
from ._protocol import JSON, MSGPACK

__all__ = ["ClientConfig", "ConnectionState"]


def _positive(_: object, attribute: attrs.Attribute[Any], value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise ConfigError(f"{attribute.name} must be a positive number, got {value!r}")


@attrs.frozen
class ClientConfig:
    """How a `GatewayClient` connects (validated eagerly).

    Raises:
        ConfigError: a value of the wrong type or out of range.
    """

    subprotocol: str = attrs.field(default=MSGPACK)
    open_timeout: float = attrs.field(default=10.0, validator=_positive)
    """Longest time to connect and read the welcome frame."""
    reconnect: Backoff = attrs.field(factory=lambda: Backoff(0.1, 30.0, jitter=0.5))
    """Delays before reconnecting: ``delay(0)`` after a socket that was up
    ends, growing with each failed attempt after that."""
    max_attempts: int | None = None
    """Consecutive failed attempts before the client gives up (None: never)."""
    max_message_size: int = 1 << 20
    close_timeout: float = attrs.field(default=2.0, validator=_positive)

    @subprotocol.validator
    def _check_subprotocol(self, _: object, value: object) -> None:
        if value not in (JSON, MSGPACK):
            raise ConfigError(
                f"subprotocol must be {JSON!r} or {MSGPACK!r}, got {value!r}"
            )


@attrs.frozen
class ConnectionState:
    """A snapshot of a client's connection (`GatewayClient.state`)."""

    connected: bool
    last_error: str | None
    """Why the last attempt or socket failed (None: none has)."""
    reconnect_count: int
    """Sockets opened after the first one."""
    last_connect_time: float | None
    """``trio.current_time()`` of the last socket opened."""
    failed_attempts: int
    """Attempts failed since the last socket opened."""
    connection_id: str | None
    """The server's id of the current socket."""
