"""SIM: how fast the simulator runs a busy, failing cluster.

A simulated cluster of 10 runners (`ShardingConfig` defaults: 5 s leases
refreshed every second, membership polled every 0.25 s per runner; 16 shards
per group as the simulator uses by default, and the production 300)
hosts 1,000 `Probe` entities. Every entity is activated first; then, for the
measured span, clients send a steady load (``--rates``: messages per virtual
second, half persisted writes, half volatile calls, from every runner) while a
fault strikes every virtual second (kills with restarts, freezes,
partitions, storage outages, lost lock sessions, frame faults, drawn from a
seeded schedule). Every invariant is checked as it runs.

Figure: virtual seconds simulated per wall-clock second (target >= 100).

``python -m benchmarks.sim_speed [--quick] [--virtual 100] [--rates 0 5 20]
[--shards 16 300]`` prints one JSON object per figure on stdout: for each
shard count and load, virtual seconds per wall second (and per CPU second of
this process, steadier on a shared machine).
"""

from __future__ import annotations

import argparse
import logging
import random
import time

import trio

import trio_cluster as tc
from trio_cluster.testing import (
    Fault,
    FaultSchedule,
    FrameFaults,
    FreezeRunner,
    KillRunner,
    LoseLockSession,
    PartitionRunners,
    Probe,
    ProbeTouch,
    ProbeWrite,
    SimulatedCluster,
    StorageOutage,
    open_simulated_cluster,
    run_simulation,
)

from ._common import emit, progress

RUNNERS = 10
ENTITIES = 1_000


def schedule(seconds: int, seed: int) -> FaultSchedule:
    """One fault per virtual second, each lasting 1-6 s."""
    rng = random.Random(seed)
    faults: list[Fault] = []
    for second in range(seconds):
        at = float(second)
        runner = rng.randrange(RUNNERS)
        lasting = float(rng.choice((1, 2, 3, 6)))
        kind = rng.choice(
            ("kill", "freeze", "partition", "storage", "session", "frames")
        )
        if kind == "kill":
            faults.append(KillRunner(at=at, runner=runner, down_for=lasting))
        elif kind == "freeze":
            faults.append(FreezeRunner(at=at, runner=runner, duration=lasting))
        elif kind == "partition":
            other = (runner + 1 + rng.randrange(RUNNERS - 1)) % RUNNERS
            faults.append(PartitionRunners(at=at, a=runner, b=other, duration=lasting))
        elif kind == "storage":
            faults.append(
                StorageOutage(
                    at=at, runner=runner, duration=lasting, hang=rng.random() < 0.5
                )
            )
        elif kind == "session":
            faults.append(LoseLockSession(at=at, runner=runner))
        else:
            faults.append(FrameFaults(at=at, duration=lasting, drop=0.05, delay=0.2))
    return FaultSchedule(faults)


async def activate(cluster: SimulatedCluster) -> None:
    """One volatile call to each entity, from the runners in turn."""

    async def touch(first: int) -> None:
        for entity in range(first, ENTITIES, 50):
            client = cluster.client(Probe, via=entity % RUNNERS)
            await client(f"p{entity}").touch(ProbeTouch(op=cluster.probes.next_op()))

    async with trio.open_nursery() as nursery:
        for first in range(50):
            nursery.start_soon(touch, first)


async def load(
    cluster: SimulatedCluster, rate: float, seconds: float, seed: int
) -> int:
    """Send ``rate`` messages per virtual second for ``seconds``, each from
    a random runner that is up, without waiting for them (the clients die
    with their runner)."""
    rng = random.Random(seed)
    sent = 0

    async def send(entity: int, number: int) -> None:
        client = cluster.client(Probe)(f"p{entity}")
        try:
            if number % 2:
                await client.touch(ProbeTouch(op=cluster.probes.next_op()))
            else:
                # One stream per message: concurrent senders promise no order.
                await client.write.discard(ProbeWrite(stream=-number, seq=0))
        except tc.ClusterError:
            pass  # the runner died or the shard is moving: fine for a load

    deadline = trio.current_time() + seconds
    if not rate:
        await trio.sleep(seconds)
    while rate and trio.current_time() < deadline:
        await trio.sleep(rng.expovariate(rate))
        up = cluster.up()
        if up:
            handle = up[rng.randrange(len(up))]
            sent += 1
            handle.start_soon(send, rng.randrange(ENTITIES), sent)
    return sent


async def run(
    virtual: int, rate: float, seed: int, trace_frames: bool, shards: int
) -> dict[str, float]:
    async with open_simulated_cluster(
        [Probe],
        runners=RUNNERS,
        seed=seed,
        config=tc.ShardingConfig(shards_per_group=shards),
        trace_frames=trace_frames,
    ) as cluster:
        progress(f"SIM activating {ENTITIES} entities on {RUNNERS} runners")
        await activate(cluster)
        progress(f"SIM {virtual} virtual seconds, a fault each second, {rate} msg/s")
        start_virtual = trio.current_time()
        start_wall = time.perf_counter()
        start_cpu = time.process_time()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(cluster.run_schedule, schedule(virtual, seed))
            sent = await load(cluster, rate, virtual, seed)
        wall = time.perf_counter() - start_wall
        cpu = time.process_time() - start_cpu
        simulated = trio.current_time() - start_virtual
        executions = cluster.probes.executions
        await cluster.heal_all()
        await cluster.wait_quiescent()
    return {
        "virtual": simulated,
        "wall": wall,
        "cpu": cpu,
        "sent": sent,
        "executions": executions,
        "faults": len(cluster.trace.faults()),
    }


def main(
    quick: bool = False,
    virtual: int | None = None,
    rates: tuple[float, ...] = (0.0, 5.0, 20.0),
    shards: tuple[int, ...] = (16, 300),
) -> None:
    seconds = virtual if virtual is not None else (20 if quick else 100)
    logging.getLogger("trio_cluster").setLevel(logging.ERROR)
    for shards_per_group in shards:
        for rate in rates:
            result = run_simulation(run, seconds, rate, 1, True, shards_per_group)
            emit(
                "SIM",
                "virtual_s_per_wall_s",
                result["virtual"] / result["wall"],
                "x",
                runners=RUNNERS,
                entities=ENTITIES,
                shards_per_group=shards_per_group,
                rate=rate,
                virtual_s=round(result["virtual"], 1),
                wall_s=round(result["wall"], 2),
                virtual_s_per_cpu_s=round(result["virtual"] / result["cpu"], 1),
                messages=result["sent"],
                executions=result["executions"],
                fault_events=result["faults"],
            )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m benchmarks.sim_speed")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--virtual", type=int, default=None, help="virtual seconds")
    parser.add_argument(
        "--rates",
        type=float,
        nargs="+",
        default=[0.0, 5.0, 20.0],
        help="messages per virtual second",
    )
    parser.add_argument(
        "--shards", type=int, nargs="+", default=[16, 300], help="shards per group"
    )
    args = parser.parse_args()
    main(
        quick=args.quick,
        virtual=args.virtual,
        rates=tuple(args.rates),
        shards=tuple(args.shards),
    )
