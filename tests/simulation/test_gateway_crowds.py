"""Gateway crowds under the simulator (scaled down from the targets of
issue 14; the full sizes are benchmarks):

* every client of a runner that is killed reconnects to the others and
  resumes: each gets every publication once, and all are back within 5
  virtual seconds;
* a client that floods and one that stops reading lose their own sockets
  and nothing else: every other client gets every publication, and its
  calls are answered.
"""

from __future__ import annotations

import random
from typing import Any

import pytest
import trio

import trio_cluster as tc
from trio_cluster.gateway import (
    ClientConfig,
    Gateway,
    GatewayCallError,
    GatewayClient,
    GatewayConfig,
    GatewayDisconnectedError,
    Publication,
    RateLimit,
    Service,
    Topic,
    open_gateway_client,
    publish,
)
from trio_cluster.testing import (
    MemoryGateways,
    SimulatedCluster,
    SimulatedRunner,
    open_simulated_cluster,
    run_simulation,
)

pytestmark = [pytest.mark.simulation, pytest.mark.slow]

TOPIC = "room:crowd"


class Echo(Service):
    name = "echo"

    @tc.rpc
    async def say(self, msg: str) -> str:
        return msg


GATEWAY = Gateway(
    services=[Echo()],
    topics=lambda name: name.startswith("room:"),
    config=GatewayConfig(
        connect_rate=None,
        message_rate=RateLimit(50, burst=50),
        send_queue=64,
        send_timeout=2.0,
    ),
)
CLIENT = ClientConfig(open_timeout=5.0)  # the default backoff: 0.1 s, jitter 0.5


async def subscriber(
    gateways: MemoryGateways,
    name: str,
    order: list[str],
    got: list[Publication],
    clients: dict[str, GatewayClient],
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    async with (
        open_gateway_client(
            "ws://gateway/ws",
            config=CLIENT,
            connect=gateways.connector(name, order=order),
            rng=random.Random(name),
        ) as client,
        client.subscribe(TOPIC) as subscription,
    ):
        clients[name] = client
        task_status.started()
        async for publication in subscription:
            got.append(publication)  # noqa: PERF401 - read meanwhile


async def publisher(cluster: SimulatedCluster, count: int, every: float) -> list[int]:
    """Publish ``0 .. count-1`` through runner 2 (never killed here); the
    numbers accepted."""
    accepted = []
    for number in range(count):
        runner = cluster.runner(2).runner
        assert runner is not None
        try:
            await publish(runner, TOPIC, number)
        except tc.ClusterError:
            pass
        else:
            accepted.append(number)
        await trio.sleep(every)
    return accepted


async def crowd_loses_its_runner(size: int) -> tuple[list[int], dict[str, Any], float]:
    gateways = MemoryGateways()

    async def serve(handle: SimulatedRunner, runner: tc.Runner) -> None:
        await gateways.serve(handle.name, runner, GATEWAY)

    received: dict[str, list[Publication]] = {}
    clients: dict[str, GatewayClient] = {}
    async with (
        open_simulated_cluster([Topic], runners=3, runner_tasks=[serve]) as cluster,
        trio.open_nursery() as nursery,
    ):
        topic_host = cluster.owner_of(cluster.client(Topic).address_of(TOPIC))
        victim = next(i for i in (0, 1) if i != topic_host)
        others = [f"r{i}" for i in range(3) if i != victim]
        for n in range(size):
            name = f"c{n}"
            received[name] = []
            # The victim's gateway first, then one of the others.
            order = [f"r{victim}", *others[n % 2 :], *others[: n % 2]]
            await nursery.start(
                subscriber, gateways, name, order, received[name], clients
            )
        assert {link.gateway for link in gateways.links()} == {f"r{victim}"}
        accepted: list[int] = []

        async def publish_all() -> None:
            accepted.extend(await publisher(cluster, 40, 0.25))

        async with trio.open_nursery() as publishing:
            publishing.start_soon(publish_all)
            await trio.sleep(2.0)
            killed_at = trio.current_time()
            await cluster.kill(victim)
            while not all(  # noqa: ASYNC110
                c.state.connected and c.state.reconnect_count == 1
                for c in clients.values()
            ):
                await trio.sleep(0.01)
            recovered_after = trio.current_time() - killed_at
        with trio.fail_after(60):
            while any(  # noqa: ASYNC110
                not got or got[-1].data != accepted[-1] for got in received.values()
            ):
                await trio.sleep(0.1)
        nursery.cancel_scope.cancel()
    return accepted, received, recovered_after


def test_the_clients_of_a_killed_runner_all_resume_elsewhere() -> None:
    accepted, received, recovered_after = run_simulation(crowd_loses_its_runner, 200)
    assert len(accepted) == 40
    for name, got in received.items():
        assert [p.data for p in got] == accepted, name
    assert recovered_after <= 5.0


async def crowd_with_a_flooder_and_a_stall(
    size: int,
) -> tuple[list[int], dict[str, Any], dict[str, int], dict[str, int]]:
    gateways = MemoryGateways(buffer=256)  # small TCP buffers: a stall shows soon

    async def serve(handle: SimulatedRunner, runner: tc.Runner) -> None:
        await gateways.serve(handle.name, runner, GATEWAY)

    received: dict[str, list[Publication]] = {}
    clients: dict[str, GatewayClient] = {}
    answered: dict[str, int] = {}
    async with (
        open_simulated_cluster([Topic], runners=3, runner_tasks=[serve]) as cluster,
        trio.open_nursery() as nursery,
    ):
        for n in range(size):
            name = f"c{n}"
            received[name] = []
            await nursery.start(
                subscriber, gateways, name, ["r0"], received[name], clients
            )

        async def calls(name: str) -> None:
            answered[name] = 0
            for n in range(20):
                assert await clients[name].service(Echo).say(f"{name}/{n}") == (
                    f"{name}/{n}"
                )
                answered[name] += 1
                await trio.sleep(0.5)

        async def flood() -> None:
            client = clients["c0"]
            try:
                async with trio.open_nursery() as flooding:
                    for n in range(500):
                        flooding.start_soon(client.service(Echo).say, str(n))
            except* (GatewayDisconnectedError, GatewayCallError):
                pass  # closed for its rate (and refused beyond its concurrency)

        accepted: list[int] = []

        async def publish_all() -> None:
            accepted.extend(await publisher(cluster, 40, 0.25))

        async with trio.open_nursery() as load:
            load.start_soon(publish_all)
            for name in list(clients)[2:]:
                load.start_soon(calls, name)
            await trio.sleep(1.0)
            load.start_soon(flood)
            (stalled,) = [link for link in gateways.links() if link.client == "c1"]
            stalled.stall()  # c1 stops reading (and its link holds everything)
        with trio.fail_after(60):
            while any(  # noqa: ASYNC110
                not got or got[-1].data != accepted[-1] for got in received.values()
            ):
                await trio.sleep(0.1)
        reconnects = {n: c.state.reconnect_count for n, c in clients.items()}
        closed = gateways.server("r0").statistics().closed
        nursery.cancel_scope.cancel()
    return accepted, received, reconnects, {**closed, **answered}


def test_a_flooding_and_a_stalled_client_affect_no_one_else() -> None:
    size = 50
    accepted, received, reconnects, counts = run_simulation(
        crowd_with_a_flooder_and_a_stall, size
    )
    assert len(accepted) == 40
    assert counts["rate_limited"] == 1  # the flooder, closed 4008
    assert counts["slow_consumer"] == 1  # the stalled one, closed 4001
    for n in range(size):
        name = f"c{n}"
        # The two lost their sockets and resumed: nothing lost either.
        assert [p.data for p in received[name]] == accepted, name
        if n >= 2:
            assert reconnects[name] == 0, name
            assert counts[name] == 20, name
    assert reconnects["c0"] >= 1
    assert reconnects["c1"] >= 1
