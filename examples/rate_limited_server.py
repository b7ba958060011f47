"""A rate-limited server: 10 connections a minute per client address, then
a 5-minute block; a message rate per connection.

``python examples/rate_limited_server.py`` serves the gateway on
127.0.0.1:8765 with the limits below, then plays the clients: ten connect,
the eleventh is refused (HTTP 429 with ``Retry-After: 300``), one of the ten
floods its socket and is closed (4008) while the others carry on, and its
reconnection is refused too: its address is blocked.

The limits are the gateway's own (`GatewayConfig`), checked before anything
else: a refused upgrade costs no runner work, and nothing a closed client
sent is processed. The connect limit counts upgrades per client IP in a
window that starts at its first one (the seed's ``maxConnectionsPerIp: 10,
timeWindow: 1 min, blockDuration: 5 min``); the table of addresses is
bounded. The message limit is a token bucket per socket (``burst`` frames
at once, then ``per_second``). Behind a proxy every client has the proxy's
address: put the limit in the proxy then, or serve the gateway directly.
"""

from __future__ import annotations

import trio

import trio_cluster as tc
from trio_cluster.gateway import (
    ClientConfig,
    Gateway,
    GatewayClient,
    GatewayConfig,
    GatewayDisconnectedError,
    GatewayRefusedError,
    GatewayServer,
    RateLimit,
    Service,
    WindowLimit,
    open_gateway_client,
    serve_gateway,
)

LIMITS = GatewayConfig(
    connect_rate=WindowLimit(10, per=60.0, block_for=300.0),  # per client IP
    message_rate=RateLimit(20.0, burst=40.0),  # frames per socket
)


class Echo(Service):
    name = "echo"

    @tc.rpc
    async def say(self, msg: str) -> str:
        return msg


GATEWAY = Gateway(services=[Echo()], config=LIMITS)
APP = {"gateway": GATEWAY}
"""For ``trio-cluster run examples.rate_limited_server:APP --gateway HOST:PORT``."""

ONCE = ClientConfig(max_attempts=1)
"""Clients that give up at the first refusal (the default retries, waiting
at least the ``Retry-After`` of a 429)."""


async def flood(client: GatewayClient) -> str:
    """Send 200 calls at once: more than the burst of 40 frames."""
    closed: list[GatewayDisconnectedError] = []

    async def call() -> None:
        try:
            await client.call("echo.say", "spam")
        except GatewayDisconnectedError as exc:
            closed.append(exc)

    async with trio.open_nursery() as nursery:
        for _ in range(200):
            nursery.start_soon(call)
    return f"{closed[0].code} ({closed[0].reason})"


async def main(port: int = 0) -> list[str]:
    lines: list[str] = []
    async with (
        tc.open_runner() as runner,
        trio.open_nursery() as nursery,
        trio.open_nursery() as clients,
    ):
        server: GatewayServer = await nursery.start(
            serve_gateway, runner, GATEWAY, "127.0.0.1", port
        )
        connected: list[GatewayClient] = []

        async def connect(*, task_status: trio.TaskStatus[GatewayClient]) -> None:
            async with open_gateway_client(server.url, config=ONCE) as client:
                task_status.started(client)
                await trio.sleep_forever()

        for number in range(1, 12):
            client = await clients.start(connect)
            try:
                await client.wait_connected()
                connected.append(client)
            except GatewayRefusedError as exc:
                lines.append(
                    f"connection {number}: refused, HTTP {exc.status},"
                    f" retry after {exc.retry_after:.0f} s"
                )
        lines.append(f"{len(connected)} clients connected")
        flooder, polite, *_ = connected
        lines.append(f"the flooder's socket was closed: {await flood(flooder)}")
        lines.append(f"the others carry on: {await polite.call('echo.say', 'hello')}")
        try:
            await flooder.wait_connected()  # it tries again...
        except GatewayRefusedError as exc:  # ...but its address is blocked
            lines.append(
                f"the flooder is refused: HTTP {exc.status},"
                f" retry after {exc.retry_after:.0f} s"
            )
        clients.cancel_scope.cancel()
        nursery.cancel_scope.cancel()
    print(*lines, sep="\n")
    return lines


if __name__ == "__main__":
    trio.run(main, 8765)
