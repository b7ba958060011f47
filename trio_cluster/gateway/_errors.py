"""The errors of the realtime gateway, on both sides of a socket (I/O-free).

Server side, an authentication hook raises `UnauthorizedError` to refuse a
connection (HTTP 401 before the upgrade). Client side, `GatewayCallError`
is what a call gets back for an error that was not declared by the handler
(the server's internals never travel: only a code, a type name for cluster
errors, and a message the server chose), and `GatewayDisconnectedError`
ends a call whose socket closed before its reply.
"""

from __future__ import annotations

import attrs

from .._errors import ClusterError

__all__ = [
    "GatewayCallError",
    "GatewayDisconnectedError",
    "GatewayError",
    "GatewayRefusedError",
    "UnauthorizedError",
]


class GatewayError(ClusterError):
    """Root of the gateway's errors."""


@attrs.define(eq=False, kw_only=True)
class UnauthorizedError(GatewayError):
    """Raised by an authentication hook: the connection is refused with HTTP
    ``status`` (401 by default, 403 for "known but not allowed") before the
    WebSocket upgrade completes."""

    reason: str = "unauthorized"
    status: int = 401

    def __str__(self) -> str:
        return f"{self.status}: {self.reason}"


@attrs.define(eq=False, kw_only=True)
class GatewayCallError(GatewayError):
    """A call failed on the server with an error its handler did not
    declare, or was refused (see ``code``: the protocol's error codes, e.g.
    ``"forbidden"``, ``"not_found"``, ``"bad_request"``,
    ``"too_many_requests"``, ``"unavailable"``, ``"internal"``)."""

    code: str
    message: str
    type_name: str | None = None
    """The cluster error's type for ``"unavailable"`` (e.g.
    ``"MailboxFullError"``), else None."""

    @property
    def retryable(self) -> bool:
        """Whether the same call may succeed later unchanged."""
        return self.code in ("unavailable", "too_many_requests")

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"


@attrs.define(eq=False, kw_only=True)
class GatewayDisconnectedError(GatewayError):
    """The socket closed before the call's reply: whether the call ran is
    unknown (``code`` and ``reason`` are the close frame's, 1006 if none)."""

    code: int
    reason: str

    def __str__(self) -> str:
        return f"gateway connection closed ({self.code}: {self.reason})"


@attrs.define(eq=False, kw_only=True)
class GatewayRefusedError(GatewayError):
    """The server refused the connection before the upgrade (``status``:
    401/403 unauthenticated, 429 rate limited with ``retry_after`` seconds,
    404 wrong path, 400 no common subprotocol)."""

    status: int
    reason: str
    retry_after: float | None = None

    def __str__(self) -> str:
        return f"gateway refused the connection: HTTP {self.status} {self.reason}"
