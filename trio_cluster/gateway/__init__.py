"""The realtime client gateway: browsers and services call a cluster over
WebSocket.

A `Gateway` names what clients may reach (entity handlers through
`expose`, stateless `Service` classes) and the hooks that protect it
(``authenticate`` at connect, ``authorize`` per request);
`serve_gateway` serves it for a runner (``nursery.start``) and
``trio-cluster run --gateway HOST:PORT`` from the command line. Clients
speak the protocol of ``docs/gateway.md`` over the ``trio_cluster.json.v1``
or ``trio_cluster.msgpack.v1`` subprotocol (`asgi_app` serves the same
under an ASGI server on Trio, such as hypercorn): from Trio with
`open_gateway_client`, from a browser with the JavaScript module the
gateway serves at ``/gateway.js``.
"""

from __future__ import annotations

# The messages of topics are attrs classes shown as trio_cluster.gateway.X:
# their annotations (``data: Any``) resolve in this module's namespace.
from typing import Any

from .._core._ratelimit import RateLimit, WindowLimit
from .._metadata import fixup_module_metadata
from ._asgi import GatewayAsgiApp, asgi_app
from ._bridge import bridge, event_data
from ._client import GatewayClient, open_gateway_client
from ._client_config import ClientConfig, ConnectionState
from ._client_info import ClientInfo, current_client
from ._connection import ClientConnection
from ._definition import (
    Exposed,
    Gateway,
    GatewayConfig,
    Handshake,
    Operation,
    Service,
    expose,
)
from ._errors import (
    GatewayCallError,
    GatewayDisconnectedError,
    GatewayError,
    GatewayRefusedError,
    UnauthorizedError,
)
from ._protocol import JSON, MSGPACK, PROTOCOL_VERSION, CloseCode, ErrorCode
from ._pushes import ReceivedPush
from ._server import GatewayServer, serve_gateway
from ._sessions import PushFailedError, Session, SessionTakenError, send_reliable
from ._statistics import ConnectionStatistics, GatewayStatistics
from ._topics import Position, Publication, Topic, presence, publish
from ._users import UserPushes, send_to_users

__all__ = [  # noqa: RUF022 (plain sorted order, checked by tests/test_exports.py)
    "ClientConfig",
    "ClientConnection",
    "ClientInfo",
    "CloseCode",
    "ConnectionState",
    "ConnectionStatistics",
    "ErrorCode",
    "Exposed",
    "Gateway",
    "GatewayAsgiApp",
    "GatewayCallError",
    "GatewayClient",
    "GatewayConfig",
    "GatewayDisconnectedError",
    "GatewayError",
    "GatewayRefusedError",
    "GatewayServer",
    "GatewayStatistics",
    "Handshake",
    "JSON",
    "MSGPACK",
    "Operation",
    "PROTOCOL_VERSION",
    "Position",
    "Publication",
    "PushFailedError",
    "RateLimit",
    "ReceivedPush",
    "Service",
    "Session",
    "SessionTakenError",
    "Topic",
    "UnauthorizedError",
    "UserPushes",
    "WindowLimit",
    "asgi_app",
    "bridge",
    "current_client",
    "event_data",
    "expose",
    "open_gateway_client",
    "presence",
    "publish",
    "send_reliable",
    "send_to_users",
    "serve_gateway",
]

fixup_module_metadata(__name__, globals())
del fixup_module_metadata
