"""The gateway the multi-process gateway tests serve from real runner
processes (``trio-cluster run tests.multiprocess.gateway_app:APP --gateway
...``): topics named ``room:*``, each socket present with its connection
id."""

from __future__ import annotations

from typing import Any

from trio_cluster.gateway import ClientInfo, Gateway, GatewayConfig


def present(client: ClientInfo, topic: str) -> dict[str, Any]:
    return {"connection": client.id}


GATEWAY = Gateway(
    topics=lambda name: name.startswith("room:"),
    presence=present,
    # The test's clients all come from 127.0.0.1 and reconnect.
    config=GatewayConfig(connect_rate=None),
)

APP = {"entities": [], "gateway": GATEWAY}
