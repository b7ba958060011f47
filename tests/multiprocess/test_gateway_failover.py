"""Gateway failover with real runner processes on PostgreSQL: a client
attached to one runner's gateway, subscribed to a topic that another
process publishes on, has its runner killed with SIGKILL; it reconnects to
another runner's gateway and resumes: it gets every publication the topic
accepted, once each, in order. The killed runner's entries leave the
topic's presence within the failover time (measured: logged)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pytest
import trio

from trio_cluster.gateway import (
    ClientConfig,
    Position,
    Publication,
    Topic,
    open_gateway_client,
    publish,
)

from .helpers import log

if TYPE_CHECKING:
    from collections.abc import Callable

    import trio_cluster as tc

    from .helpers import MultiCluster, RunnerProcess

pytestmark = [pytest.mark.postgres, pytest.mark.multiprocess, pytest.mark.slow]

TARGET = "tests.multiprocess.gateway_app:APP"
TOPIC = "room:failover"
PRESENCE_BOUND = 5.0
"""Seconds the killed runner's presence entries may take to leave (the
issue's target is 1 s; the machine is shared, so the bound is generous and
the figure is logged)."""


def gateway_port(process: RunnerProcess) -> int:
    ready = process.event("ready")
    assert ready is not None
    port = ready["gateway_port"]
    assert isinstance(port, int)
    return port


def failover_connect(ports: list[int]) -> Callable[[str, int], Any]:
    """A ``connect`` hook trying the gateways in order: the first that
    accepts the TCP connection is used (a client with a list of gateways)."""

    async def connect(host: str, port: int) -> trio.abc.Stream:
        failure: OSError | None = None
        for candidate in ports:
            try:
                return await trio.open_tcp_stream("127.0.0.1", candidate)
            except OSError as exc:
                failure = exc
        assert failure is not None
        raise failure

    return connect


async def publisher(
    runner: tc.Runner, accepted: dict[int, Position], count: int, stop: trio.Event
) -> None:
    """Publish ``0 .. count-1``, one every 20 ms; each accepted one is in
    ``accepted`` (a failed publish is retried with a new number)."""
    number = 0
    while len(accepted) < count:
        try:
            accepted[number] = await publish(runner, TOPIC, number)
        except Exception as exc:
            log.info("publication %d failed: %r", number, exc)
        number += 1
        await trio.sleep(0.02)
    stop.set()


async def test_a_client_resumes_on_another_runner_after_a_kill(
    cluster: MultiCluster,
) -> None:
    processes = await cluster.start(
        "a", "b", "c", args=["--gateway", "127.0.0.1:0"], target=TARGET
    )
    ports = {process.address: gateway_port(process) for process in processes}
    accepted: dict[int, Position] = {}
    received: list[Publication] = []
    async with cluster.client(entities=[Topic]) as runner:
        owner = runner.owner_of(runner.client(Topic)(TOPIC).address)
        assert owner is not None
        # The victim does not host the topic (its history would die with
        # it: a new epoch, documented as not recovered).
        victim = next(p for p in processes if p.address != str(owner))
        others = [p for p in processes if p is not victim]
        config = ClientConfig(open_timeout=5.0)
        with trio.fail_after(120):
            async with (
                open_gateway_client(
                    "ws://gateway/ws",
                    config=config,
                    connect=failover_connect(
                        [ports[victim.address], *(ports[p.address] for p in others)]
                    ),
                ) as client,
                client.subscribe(TOPIC) as subscription,
                open_gateway_client(
                    f"ws://127.0.0.1:{ports[others[0].address]}/ws", config=config
                ) as watcher,
                watcher.subscribe(TOPIC, presence=True) as watched,
            ):
                first_id = client.state.connection_id
                assert first_id is not None
                while first_id not in (watched.presence or {}):
                    await watched.presence_changed()
                stop = trio.Event()
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(publisher, runner, accepted, 300, stop)

                    async def take() -> None:
                        async for publication in subscription:
                            received.append(publication)  # noqa: PERF401 - read meanwhile

                    nursery.start_soon(take)
                    while len(received) < 50:  # noqa: ASYNC110
                        await trio.sleep(0.01)
                    killed_at = trio.current_time()
                    victim.kill()
                    while first_id in (watched.presence or {}):
                        await watched.presence_changed()
                    presence_gone = trio.current_time() - killed_at
                    while subscription.recovered is None:  # noqa: ASYNC110
                        await trio.sleep(0.005)
                    resumed = trio.current_time() - killed_at
                    await stop.wait()
                    last = max(accepted.values(), key=lambda p: p.offset)
                    while not received or received[-1].offset < last.offset:  # noqa: ASYNC110
                        await trio.sleep(0.01)
                    reconnected = trio.current_time() - killed_at
                    nursery.cancel_scope.cancel()
                assert client.state.reconnect_count >= 1
                assert client.state.connection_id != first_id
                assert subscription.recovered is True
    log.info(
        "gateway failover: presence of the killed runner gone after %.3f s,"
        " the client resumed on another runner after %.3f s and had every"
        " publication %.3f s after the kill (%d publications, one per 20 ms)",
        presence_gone,
        resumed,
        reconnected,
        len(accepted),
    )
    assert presence_gone < PRESENCE_BOUND
    epochs = {position.epoch for position in accepted.values()}
    assert len(epochs) == 1, epochs
    positions = [(p.epoch, p.offset) for p in received]
    assert len(set(positions)) == len(positions), "a publication came twice"
    offsets = [p.offset for p in received]
    assert offsets == sorted(offsets)
    expected = {position.offset: number for number, position in accepted.items()}
    got = {p.offset: p.data for p in received}
    # Every accepted publication, with its data (an unaccepted one, whose
    # publish failed, may have been made too: it is there at most once).
    assert {offset: got.get(offset) for offset in expected} == expected
