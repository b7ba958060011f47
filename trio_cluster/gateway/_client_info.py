"""Who a gateway request comes from: `ClientInfo` and `current_client`
(I/O-free)."""

from __future__ import annotations

import contextvars

import attrs

__all__ = ["ClientInfo", "current_client", "current_info"]


@attrs.frozen
class ClientInfo:
    """Who a request comes from (see `current_client`)."""

    id: str
    """The connection's id, unique in the cluster."""
    principal: object
    """What the authentication hook returned (None without one)."""
    remote: str
    """The client's ``host:port``."""
    subprotocol: str


current_info: contextvars.ContextVar[ClientInfo] = contextvars.ContextVar(
    "trio_cluster_gateway_client"
)


def current_client() -> ClientInfo:
    """The client whose request is running (in a service method, an
    ``authorize`` hook, or anything they call in the same task).

    Raises:
        LookupError: not inside a gateway request.
    """
    return current_info.get()
