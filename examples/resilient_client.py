"""A resilient client: reconnects with jittered backoff, reports its
connection state, resumes its topic, and retries idempotent calls.

``python examples/resilient_client.py`` runs a runner that publishes a tick
every 50 ms on the topic ``ticks`` and serves a ``Counter``; a client
follows the ticks and adds to the counter while the gateway is killed (its
sockets cut, no close frame) and started again on the same port a second
later. The client gets every tick once, in order, and every add counts
once.

* **Reconnect**: `open_gateway_client` keeps one socket up in the
  background. After a socket ends it waits ``reconnect.delay(0)`` (up to
  0.1 s here), then longer after each failed attempt (doubling to 30 s,
  each delay cut by up to half at random so that clients dropped together
  do not come back together); ``open_timeout`` bounds each attempt.
* **State**: ``client.state`` says whether it is connected, the last
  error, how many times it reconnected and when it last connected.
* **Resume**: the subscription resumes from the last tick it handed out;
  ``subscription.recovered`` says whether nothing was lost (False if the
  topic's history was lost with its runner: the client knows).
* **Calls**: a call whose socket dropped raises
  `GatewayDisconnectedError`: whether it ran is unknown. ``add`` is a
  persisted handler with the request's id as its primary key, so sending
  it again is safe: it runs once, and the retry gets the same reply.
"""

from __future__ import annotations

import secrets
from collections.abc import Awaitable, Callable
from typing import TypeVar

import attrs
import trio

import trio_cluster as tc
from trio_cluster.gateway import (
    ClientConfig,
    Gateway,
    GatewayClient,
    GatewayDisconnectedError,
    GatewayServer,
    Topic,
    expose,
    open_gateway_client,
    publish,
    serve_gateway,
)

T = TypeVar("T")

CONFIG = ClientConfig(
    open_timeout=10.0,  # to connect and get the welcome frame
    reconnect=tc.Backoff(0.1, 30.0, factor=2.0, jitter=0.5),
)


@attrs.frozen
class Add:
    request_id: str
    amount: int


class Counter(tc.Entity):
    type_name = "Counter"

    def __init__(self) -> None:
        self.value = 0

    @tc.rpc(persisted=True, primary_key=lambda add: add.request_id)
    async def add(self, msg: Add) -> int:
        self.value += msg.amount
        return self.value


GATEWAY = Gateway(entities=[expose(Counter)], topics=lambda name: name == "ticks")
APP = {"entities": [Counter], "gateway": GATEWAY}
"""For ``trio-cluster run examples.resilient_client:APP --gateway HOST:PORT``."""


async def retry_dropped(call: Callable[[], Awaitable[T]], *, attempts: int = 3) -> T:
    """Make an idempotent call, again if its socket dropped (the client
    reconnects meanwhile; the call waits for the new socket)."""
    for attempt in range(1, attempts + 1):
        try:
            return await call()
        except GatewayDisconnectedError:
            if attempt == attempts:
                raise
    raise AssertionError("unreachable")


async def add(client: GatewayClient, counter: str, amount: int) -> int:
    """Add to a counter once, whatever the socket does."""
    request = Add(secrets.token_hex(8), amount)  # one id for every attempt
    handle = client.entities(Counter)(counter)
    return await retry_dropped(lambda: handle.add(request))


async def follow(
    client: GatewayClient,
    *,
    task_status: trio.TaskStatus[list[int]] = trio.TASK_STATUS_IGNORED,
) -> bool:
    """Follow the ticks (in the list it starts with) until at least 40 came
    and a resume was answered: whether it recovered everything."""
    ticks: list[int] = []
    async with client.subscribe("ticks") as subscription:
        task_status.started(ticks)
        async for publication in subscription:
            ticks.append(publication.data)
            if len(ticks) >= 40 and subscription.recovered is not None:
                return subscription.recovered
    raise AssertionError("the subscription ended")


async def main(port: int = 0) -> list[str]:
    lines: list[str] = []

    def report(line: str) -> None:
        lines.append(line)
        print(line)

    async with (
        tc.open_runner(entities=[Counter, Topic]) as runner,
        trio.open_nursery() as nursery,
    ):
        gateway = trio.CancelScope()

        async def serve(
            port: int, *, task_status: trio.TaskStatus[GatewayServer]
        ) -> None:
            with gateway:
                await serve_gateway(
                    runner, GATEWAY, "127.0.0.1", port, task_status=task_status
                )

        server: GatewayServer = await nursery.start(serve, port)
        async with (
            open_gateway_client(server.url, config=CONFIG) as client,
            trio.open_nursery() as work,
        ):
            recovered: list[bool] = []
            totals: list[int] = []
            followed = trio.Event()

            async def follower(*, task_status: trio.TaskStatus[list[int]]) -> None:
                recovered.append(await follow(client, task_status=task_status))
                followed.set()

            async def adder() -> None:
                for _ in range(20):
                    totals.append(await add(client, "visits", 1))
                    await trio.sleep(0.1)

            async def ticker() -> None:
                for tick in range(1, 1000):
                    if followed.is_set():
                        return
                    await publish(runner, "ticks", tick)
                    await trio.sleep(0.05)

            ticks = await work.start(follower)
            work.start_soon(adder)
            work.start_soon(ticker)
            await trio.sleep(0.5)
            gateway.cancel()  # killed: sockets cut, no close frame
            await trio.sleep(0.1)
            report(f"gateway killed: {describe(client)}")
            print(f"  (last error: {client.state.last_error})")
            await trio.sleep(1.0)
            gateway = trio.CancelScope()
            await nursery.start(serve, server.port)  # same port
            await client.wait_connected()
            report(f"gateway back: {describe(client)}")
        in_order = ticks == list(range(1, len(ticks) + 1))
        report(f"ticks: each once, in order: {in_order}")
        report(f"resumed without loss: {recovered[0]}")
        report(f"20 adds, total: {totals[-1]}")
        nursery.cancel_scope.cancel()
    return lines


def describe(client: GatewayClient) -> str:
    state = client.state
    return f"connected={state.connected}, reconnects={state.reconnect_count}"


if __name__ == "__main__":
    trio.run(main)
