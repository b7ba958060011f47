"""``trio-cluster demo --runners N``: a live cluster in one process.

N runners share one memory storage and talk over a memory network (the same
sharding, routing and failover code as runners in separate processes over
WebSocket and PostgreSQL). The demo sends calls from the first runner to
entities spread over all of them, kills the last runner abruptly (its
connections drop and its storage session ends, as when a process is
SIGKILLed), and measures how long until every entity it hosted answers again
on a survivor.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import attrs
import trio

from .._core._addresses import RunnerAddress
from .._core._config import ShardingConfig
from .._entity import Entity
from .._errors import ClusterError
from .._handlers import rpc
from .._runner import Runner, current_runner, open_runner
from ..storage._memory._storage import MemoryStorage
from ..transport import MemoryNetwork, MemoryTransport

if TYPE_CHECKING:
    from collections.abc import Callable

__all__ = ["ClusterDemoResult", "run_cluster_demo"]

ENTITY_COUNT = 12
FIRST_PORT = 7101


@attrs.frozen
class Hit:
    """Count one visit."""


@attrs.frozen
class Answer:
    count: int
    runner: str


class Visits(Entity):
    """A volatile counter that says which runner hosts it."""

    type_name = "demo.Visits"

    def __init__(self) -> None:
        self.count = 0

    @rpc
    async def hit(self, msg: Hit) -> Answer:
        self.count += 1
        return Answer(self.count, str(current_runner().address))


@attrs.frozen
class ClusterDemoResult:
    """What the demo measured."""

    killed: str
    """The address of the runner that was killed."""
    moved: int
    """Entities that lived on it and answered again elsewhere."""
    failover_seconds: float
    """From the kill until the last of those entities answered."""


@attrs.define
class _Member:
    runner: Runner
    scope: trio.CancelScope


async def _serve_member(
    address: RunnerAddress,
    storage: MemoryStorage,
    network: MemoryNetwork,
    config: ShardingConfig,
    *,
    task_status: trio.TaskStatus[_Member],
) -> None:
    with trio.CancelScope() as scope:
        async with open_runner(
            entities=[Visits],
            config=attrs.evolve(config, runner_address=address),
            storage=storage,
            transport=MemoryTransport(network),
        ) as runner:
            task_status.started(_Member(runner, scope))
            await trio.sleep_forever()


async def _until_answered(
    caller: Runner, entity_id: str, hosts: dict[str, str]
) -> None:
    """Call until the entity answers (retrying while its shard moves)."""
    visits = caller.client(Visits)
    for _ in range(1000):
        try:
            hosts[entity_id] = (await visits(entity_id).hit(Hit())).runner
            return
        except ClusterError:
            await trio.sleep(0.01)
    raise RuntimeError(f"{entity_id} never answered again")


async def run_cluster_demo(
    runners: int = 3, out: Callable[[str], None] = print
) -> ClusterDemoResult:
    """Run the demo with ``runners`` runners (at least 2), writing readable
    lines with ``out``; returns the measured failover.

    On cancellation every runner is shut down (the nursery cancels them).
    """
    if runners < 2:
        raise ValueError("a cluster demo needs at least 2 runners")
    storage = MemoryStorage()
    network = MemoryNetwork()
    config = ShardingConfig()
    start = trio.current_time()

    def say(text: str) -> None:
        out(f"[{trio.current_time() - start:6.3f}s] {text}")

    out(f"trio_cluster demo: {runners} runners, memory storage, memory network\n")
    async with trio.open_nursery() as nursery:
        members: list[_Member] = []
        for index in range(runners):
            address = RunnerAddress("127.0.0.1", FIRST_PORT + index)
            members.append(
                await nursery.start(_serve_member, address, storage, network, config)
            )
        for member in members:
            await member.runner.wait_shards_acquired()
        with trio.fail_after(30):
            # Wait until every runner sees the whole cluster and serves its share.
            while any(  # noqa: ASYNC110 - watching from outside the runners
                m.runner.statistics().runners != runners
                or m.runner.statistics().shards != m.runner.statistics().shards_assigned
                for m in members
            ):
                await trio.sleep(0.05)
        for member in members:
            stats = member.runner.statistics()
            say(f"runner {stats.address} serves {stats.shards} shards")

        caller = members[0].runner
        victim = members[-1]
        out(f"\n1. Calls from {caller.address} to {ENTITY_COUNT} entities, by id")
        hosts: dict[str, str] = {}
        ids = [f"visitor-{n}" for n in range(ENTITY_COUNT)]
        for entity_id in ids:
            await _until_answered(caller, entity_id, hosts)
        for entity_id in ids:
            say(f"{entity_id:11} lives on {hosts[entity_id]}")

        doomed = [e for e in ids if hosts[e] == str(victim.runner.address)]
        out(
            f"\n2. Kill {victim.runner.address} (no goodbye: connections and lock session gone)"
        )
        killed_at = trio.current_time()
        network.kill(victim.runner.address)
        storage.kill_session(str(victim.runner.address))
        victim.scope.cancel()
        say(f"killed; {len(doomed)} of its entities must answer elsewhere")

        out("\n3. Its entities answer again on the survivors")
        async with trio.open_nursery() as calls:
            for entity_id in doomed:
                calls.start_soon(_until_answered, caller, entity_id, hosts)
        failover = trio.current_time() - killed_at
        for entity_id in doomed:
            say(f"{entity_id:11} now lives on {hosts[entity_id]}")
        say(f"failover: every moved entity answered within {failover * 1000:.0f} ms")
        nursery.cancel_scope.cancel()
    out(
        "\nIn-memory entity state restarts with the entity; use persisted"
        " messages and your own storage for state that must survive.\ndone."
    )
    return ClusterDemoResult(str(victim.runner.address), len(doomed), failover)
