"""A health checker: a cluster singleton probes TCP endpoints and publishes
their status on a gateway topic.

``python examples/health_checker.py`` serves the gateway on 127.0.0.1:8765
with a checker probing two endpoints every second: a server it starts (up,
then stopped) and a port nobody listens on. A client follows the topic
``health``; clients arriving between rounds read the last statuses with
``HealthBoard.current``.

* **One checker in the cluster**: `health_checker` is a `tc.Singleton`: it
  runs on exactly one runner, and on another one if that runner dies (it
  then goes on from the last statuses the board kept).
* **A round** (every ``interval``; 30 s in the seed) probes every endpoint
  at once, each within its own ``timeout`` (a TCP connect), counts
  consecutive failures, and logs each change (``api: UNHEALTHY``).
* **Publishing**: each round's statuses go to the `HealthBoard` entity and
  to the topic ``health``, so dashboards get them as they come.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import attrs
import trio

import trio_cluster as tc
from trio_cluster.gateway import (
    Gateway,
    GatewayServer,
    Topic,
    expose,
    open_gateway_client,
    publish,
    serve_gateway,
)

log = logging.getLogger("examples.health_checker")


@attrs.frozen
class Endpoint:
    name: str
    host: str
    port: int
    timeout: float = 5.0
    """Seconds the connect may take."""


@attrs.frozen
class Status:
    endpoint: str
    healthy: bool
    checked_at: float
    """Unix seconds."""
    response_time: float | None
    """Seconds the connect took (None: it failed)."""
    consecutive_failures: int


@attrs.frozen
class Statuses:
    statuses: list[Status]


class HealthBoard(tc.Entity):
    """The last round's statuses."""

    type_name = "HealthBoard"

    def __init__(self) -> None:
        self.statuses: list[Status] = []

    @tc.rpc
    async def record(self, msg: Statuses) -> None:
        self.statuses = msg.statuses

    @tc.rpc
    async def current(self, msg: None) -> list[Status]:
        return self.statuses


async def probe(endpoint: Endpoint) -> float | None:
    """Seconds a TCP connect took, or None if it failed or took too long."""
    started = trio.current_time()
    with trio.move_on_after(endpoint.timeout):
        try:
            stream = await trio.open_tcp_stream(endpoint.host, endpoint.port)
        except OSError:
            return None
        await trio.aclose_forcefully(stream)
        return trio.current_time() - started
    return None


async def check(endpoint: Endpoint, previous: Status | None) -> Status:
    response_time = await probe(endpoint)
    failures = 0 if previous is None else previous.consecutive_failures
    status = Status(
        endpoint.name,
        healthy=response_time is not None,
        checked_at=tc.current_runner().clock.now(),
        response_time=response_time,
        consecutive_failures=0 if response_time is not None else failures + 1,
    )
    if previous is None or previous.healthy != status.healthy:
        state = "HEALTHY" if status.healthy else "UNHEALTHY"
        log.info("%s: %s", endpoint.name, state)
    return status


async def check_all(
    endpoints: Sequence[Endpoint], last: dict[str, Status]
) -> list[Status]:
    """One round: every endpoint at once."""
    statuses: list[Status] = []

    async def one(endpoint: Endpoint) -> None:
        statuses.append(await check(endpoint, last.get(endpoint.name)))

    async with trio.open_nursery() as nursery:
        for endpoint in endpoints:
            nursery.start_soon(one, endpoint)
    return sorted(statuses, key=lambda status: status.endpoint)


def health_checker(
    endpoints: Sequence[Endpoint], *, interval: float = 30.0
) -> tc.Singleton:
    """The singleton that checks ``endpoints`` every ``interval`` seconds."""

    async def run() -> None:
        runner = tc.current_runner()
        board = runner.client(HealthBoard)("board")
        last = {status.endpoint: status for status in await board.current(None)}
        while True:
            statuses = await check_all(endpoints, last)
            last = {status.endpoint: status for status in statuses}
            await board.record(Statuses(statuses))
            await publish(runner, "health", [attrs.asdict(s) for s in statuses])
            await trio.sleep(interval)

    return tc.Singleton("health-checker", run)


ENDPOINTS = (
    Endpoint("api", "127.0.0.1", 8000),
    Endpoint("database", "127.0.0.1", 5432, timeout=3.0),
    Endpoint("redis", "127.0.0.1", 6379, timeout=2.0),
)
GATEWAY = Gateway(
    entities=[expose(HealthBoard, "current")], topics=lambda name: name == "health"
)
APP = {
    "entities": [HealthBoard],
    "singletons": [health_checker(ENDPOINTS)],
    "gateway": GATEWAY,
}
"""For ``trio-cluster run examples.health_checker:APP --gateway HOST:PORT``
(the seed's endpoints, every 30 s)."""


async def main(port: int = 0, *, interval: float = 1.0) -> list[str]:
    """Watch an endpoint go down."""
    lines: list[str] = []
    async with trio.open_nursery() as nursery:
        api = trio.CancelScope()

        async def hang_up(stream: trio.SocketStream) -> None:
            await stream.aclose()

        async def serve_api(
            *, task_status: trio.TaskStatus[list[trio.SocketListener]]
        ) -> None:
            with api:
                await trio.serve_tcp(
                    hang_up, 0, host="127.0.0.1", task_status=task_status
                )

        listeners = await nursery.start(serve_api)
        api_port = listeners[0].socket.getsockname()[1]
        with trio.socket.socket() as unused:  # a port nobody listens on
            await unused.bind(("127.0.0.1", 0))
            dead_port = unused.getsockname()[1]
        endpoints = [
            Endpoint("api", "127.0.0.1", api_port, timeout=1.0),
            Endpoint("cache", "127.0.0.1", dead_port, timeout=1.0),
        ]
        async with tc.open_runner(
            entities=[HealthBoard, Topic],
            singletons=[health_checker(endpoints, interval=interval)],
        ) as runner:
            server: GatewayServer = await nursery.start(
                serve_gateway, runner, GATEWAY, "127.0.0.1", port
            )
            async with (
                open_gateway_client(server.url) as client,
                client.subscribe("health") as health,
            ):
                async for publication in health:
                    api_status, cache = publication.data
                    line = (
                        f"api {'up' if api_status['healthy'] else 'DOWN'}"
                        f" ({api_status['consecutive_failures']} failures),"
                        f" cache {'up' if cache['healthy'] else 'DOWN'}"
                    )
                    if line not in lines:
                        lines.append(line)
                    if api_status["healthy"]:
                        api.cancel()  # the api goes down
                    else:
                        break
                board = client.entities(HealthBoard)("board")
                current = await board.current(None)
                lines.append(f"the board: {[(s.endpoint, s.healthy) for s in current]}")
        nursery.cancel_scope.cancel()
    print(*lines, sep="\n")
    return lines


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    trio.run(main, 8765)
