"""Transports between runners (public namespace).

`MemoryTransport` connects runners of one process over a shared
`MemoryNetwork` (tests, the simulator, the demo), with fault injection
(`MemoryNetwork.partition`, `MemoryNetwork.kill`, and frame faults such as
`RandomFaults`). `WebSocketTransport` connects runners in different processes
(over TLS with the contexts `tls_contexts` builds from PEM files). Both speak
the same framing, protocol version `PROTOCOL_VERSION`, and implement
`trio_cluster.abc.Transport`.
"""

from __future__ import annotations

from .._metadata import fixup_module_metadata
from ._faults import FrameFault as FrameFault, RandomFaults as RandomFaults
from ._framing import PROTOCOL_VERSION as PROTOCOL_VERSION
from ._memory import (
    MemoryEndpoint as MemoryEndpoint,
    MemoryTransport as MemoryTransport,
)
from ._memory_network import MemoryNetwork as MemoryNetwork
from ._peers import EndpointStatistics as EndpointStatistics
from ._tls import tls_contexts as tls_contexts
from ._websocket import (
    WebSocketEndpoint as WebSocketEndpoint,
    WebSocketTransport as WebSocketTransport,
)

# Plain sorted() order, as tests/test_exports.py checks (ruff's isort-style
# order would put the constant first).
__all__ = [  # noqa: RUF022
    "EndpointStatistics",
    "FrameFault",
    "MemoryEndpoint",
    "MemoryNetwork",
    "MemoryTransport",
    "PROTOCOL_VERSION",
    "RandomFaults",
    "WebSocketEndpoint",
    "WebSocketTransport",
    "tls_contexts",
]

fixup_module_metadata(__name__, globals())
del fixup_module_metadata
