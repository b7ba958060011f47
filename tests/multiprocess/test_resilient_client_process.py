"""examples/resilient_client.py against a real runner process that is
killed (SIGKILL) and started again on the same gateway port: the client
reconnects by itself, says so in its state, its subscription goes on and
says that the topic's history was lost (a new epoch), and an add sent
again after the kill gets its recorded reply (PostgreSQL kept it)."""

from __future__ import annotations

import socket

import pytest
import trio

import trio_cluster as tc
from trio_cluster.gateway import GatewayCallError, publish
from trio_cluster.gateway._subscriptions import Subscription

from ..helpers import load_example
from .helpers import FAST_LEASES, MultiCluster

pytestmark = [pytest.mark.postgres, pytest.mark.multiprocess, pytest.mark.slow]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


async def publish_until_seen(
    runner: tc.Runner, subscription: Subscription, tick: int
) -> None:
    """Publish ``tick`` (again while the topic's runner is coming back)
    until the subscription hands it over."""
    while True:
        try:
            await publish(runner, "ticks", tick)
        except tc.ClusterError:  # the topic is moving: again
            await trio.sleep(0.2)
            continue
        with trio.move_on_after(2.0):
            async for publication in subscription:
                if publication.data == tick:
                    return


async def test_the_client_recovers_from_a_killed_runner(cluster: MultiCluster) -> None:
    example = load_example("resilient_client")
    port = free_port()
    target = "examples.resilient_client:APP"
    args = ["--gateway", f"127.0.0.1:{port}"]
    first = await cluster.spawn("a", target=target, args=args, env=FAST_LEASES)
    await first.wait_ready()
    url = f"ws://127.0.0.1:{port}/ws"
    with trio.fail_after(120):
        async with (
            cluster.client() as publisher,
            example.open_gateway_client(url, config=example.CONFIG) as client,
            client.subscribe("ticks") as ticks,
        ):
            counter = client.entities(example.Counter)("visits")
            assert await counter.add(example.Add("r-1", 1)) == 1
            second_add = example.Add("r-2", 1)
            assert await counter.add(second_add) == 2
            await publish_until_seen(publisher, ticks, 1)
            assert client.state.reconnect_count == 0

            first.kill()
            assert await first.wait_exit() == -9
            while client.state.connected:  # noqa: ASYNC110
                await trio.sleep(0.05)
            second = await cluster.spawn("b", target=target, args=args, env=FAST_LEASES)
            await second.wait_ready()
            await client.wait_connected()
            assert client.state.reconnect_count == 1
            assert client.state.last_error is not None

            # The add sent again gets its recorded reply (a new run on the
            # new, empty counter would answer 1).
            while True:
                try:
                    reply = await counter.add(second_add)
                except GatewayCallError as exc:  # the shards are moving
                    if not exc.retryable:
                        raise
                    await trio.sleep(0.2)
                    continue
                break
            assert reply == 2
            # The subscription goes on; the history died with the runner.
            await publish_until_seen(publisher, ticks, 2)
            assert ticks.recovered is False
