"""Gateway topics under the simulator: runner kills, freezes, partitions and
faults of the clients' own links (resets, stalls) never make a subscriber
lose or repeat a publication silently.

Every runner serves a gateway (`MemoryGateways`, over memory streams); a
few clients connect through a load balancer (any gateway up, in turn) and
stay subscribed to one topic for the whole run, resuming after every
reconnect. Publications are made from the runners while the faults play;
after them, everything heals and a last few are published. Then, for every
client:

* **exactly once**: no publication (epoch, offset) is handed out twice, and
  each carries the data published at its position;
* **in order**: a client's publications come epoch by epoch (it never goes
  back to an epoch it left), offsets increasing within each;
* **no gap**: within an epoch, a client got the offsets 1, 2, ... k with
  none missing (the epoch started after it subscribed);
* **nothing lost**: in the topic's last epoch (the one that survived), a
  client got every publication the topic accepted (``publish`` returned its
  position). An earlier epoch ended with the topic's entity (a failover or
  a move of its shard): its history was in memory, so the end of it may be
  missing, never a publication in the middle.
"""

from __future__ import annotations

import random
from typing import Any

import attrs
import pytest
import trio
from hypothesis import HealthCheck, Phase, find, given, settings, strategies as st

import trio_cluster as tc
from trio_cluster.gateway import (
    ClientConfig,
    Gateway,
    GatewayConfig,
    Position,
    Publication,
    Topic,
    open_gateway_client,
    publish,
)
from trio_cluster.testing import (
    FaultSchedule,
    FreezeRunner,
    KillRunner,
    MemoryGateways,
    PartitionRunners,
    SimulatedCluster,
    SimulatedRunner,
    fault_schedules,
    open_simulated_cluster,
    run_simulation,
)

pytestmark = pytest.mark.simulation

TOPIC = "room:sim"
CLIENTS = 4
"""Clients subscribed (more than runners: a client that reconnects may
join a gateway that already follows the topic for another)."""
DURATION = 20.0
GATEWAY = Gateway(
    topics=lambda name: name.startswith("room:"),
    config=GatewayConfig(connect_rate=None, ping_interval=3.0, ping_timeout=2.0),
)
CLIENT = ClientConfig(open_timeout=5.0, reconnect=tc.Backoff(0.1, 2.0, jitter=0.5))


@attrs.frozen
class LinkFault:
    """A fault of a client's own link to its gateway."""

    at: float
    client: int
    kind: str
    """``drop`` (a reset) or ``stall`` (bytes held both ways)."""
    lasting: float
    """Seconds a stall lasts."""


link_faults = st.lists(
    st.builds(
        LinkFault,
        at=st.integers(0, int(DURATION * 10)).map(lambda t: t / 10),
        client=st.integers(0, CLIENTS - 1),
        kind=st.sampled_from(["drop", "stall"]),
        lasting=st.sampled_from([1.0, 4.0, 8.0]),
    ),
    max_size=4,
)
publication_times = st.lists(
    st.integers(0, int(DURATION * 10)).map(lambda t: t / 10), min_size=1, max_size=12
).map(sorted)


@attrs.define
class Run:
    """What a run saw."""

    clients: int = CLIENTS
    accepted: dict[int, Position] = attrs.Factory(dict)
    """Publication id -> the position ``publish`` returned."""
    received: list[list[Publication]] = attrs.Factory(
        lambda run: [[] for _ in range(run.clients)], takes_self=True
    )
    final: list[int] = attrs.Factory(list)
    """Ids published once everything healed."""
    reconnects: list[int] = attrs.Factory(
        lambda run: [0] * run.clients, takes_self=True
    )
    """Sockets each client opened after its first."""


async def serve_gateway_on(
    gateways: MemoryGateways, handle: SimulatedRunner, runner: tc.Runner
) -> None:
    await gateways.serve(handle.name, runner, GATEWAY)


async def publish_via(cluster: SimulatedCluster, run: Run, ident: int) -> bool:
    """Publish ``ident`` through a runner that is up; whether it was
    accepted (False: it failed, or may have been made without an answer)."""
    runners = cluster.up()
    if not runners:
        return False
    runner = runners[ident % len(runners)].runner
    assert runner is not None
    with trio.move_on_after(10.0):
        try:
            run.accepted[ident] = await publish(runner, TOPIC, ident)
        except tc.ClusterError:
            return False
        return True
    return False


async def subscriber(
    gateways: MemoryGateways,
    run: Run,
    index: int,
    seed: int,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    async with (
        open_gateway_client(
            "ws://gateway/ws",
            config=CLIENT,
            connect=gateways.connector(f"c{index}", balance=True),
            rng=random.Random(seed * run.clients + index),
        ) as client,
        client.subscribe(TOPIC) as subscription,
    ):
        task_status.started()
        async for publication in subscription:
            run.received[index].append(publication)
            run.reconnects[index] = client.state.reconnect_count


async def play_link_fault(gateways: MemoryGateways, fault: LinkFault) -> None:
    await trio.sleep(fault.at)
    links = [link for link in gateways.links() if link.client == f"c{fault.client}"]
    for link in links:
        if fault.kind == "drop":
            link.drop()
        else:
            link.stall()
    if fault.kind == "stall":
        await trio.sleep(fault.lasting)
        for link in links:
            link.resume()


async def topic_under_faults(
    faults: FaultSchedule,
    links: list[LinkFault],
    times: list[float],
    seed: int,
    latency: tuple[float, float] | None = None,
    clients: int = CLIENTS,
) -> Run:
    run = Run(clients)
    gateways = MemoryGateways()

    async def serve(handle: SimulatedRunner, runner: tc.Runner) -> None:
        await serve_gateway_on(gateways, handle, runner)

    async def publish_at(at: float, ident: int) -> None:
        await trio.sleep(at)
        await publish_via(cluster, run, ident)

    async with (
        open_simulated_cluster(
            [Topic], runners=3, seed=seed, runner_tasks=[serve]
        ) as cluster,
        trio.open_nursery() as crowd,
    ):
        if latency is not None:
            # Frames between runners delayed (in order): the races of a
            # real network (a publication during a resubscribe's history).
            cluster.frame_faults(delay=latency[0], max_delay=latency[1])
        for index in range(run.clients):
            await crowd.start(subscriber, gateways, run, index, seed)
        with trio.fail_after(max(faults.end, DURATION) + 60):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(cluster.run_schedule, faults)
                for fault in links:
                    nursery.start_soon(play_link_fault, gateways, fault)
                for ident, at in enumerate(times):
                    nursery.start_soon(publish_at, at, ident)
        await cluster.heal_all()
        await cluster.wait_stable()
        ident = len(times)
        with trio.fail_after(120):
            while len(run.final) < 3:
                if await publish_via(cluster, run, ident):
                    run.final.append(ident)
                ident += 1
                await trio.sleep(0.5)
        with trio.move_on_after(120):
            while not all(  # noqa: ASYNC110
                set(run.final) <= {p.data for p in got} for got in run.received
            ):
                await trio.sleep(0.5)
        crowd.cancel_scope.cancel()
    return run


def check(run: Run) -> None:
    final_epoch = run.accepted[run.final[-1]].epoch
    published = {(p.epoch, p.offset): ident for ident, p in run.accepted.items()}
    in_final = sorted(p.offset for p in run.accepted.values() if p.epoch == final_epoch)
    for index, got in enumerate(run.received):
        where = f"client {index} got {[(p.epoch[:4], p.offset, p.data) for p in got]}"
        positions = [(p.epoch, p.offset) for p in got]
        assert len(set(positions)) == len(positions), f"exactly once: {where}"
        assert len({p.data for p in got}) == len(got), f"exactly once: {where}"
        for p in got:
            expected = published.get((p.epoch, p.offset))
            assert expected in (None, p.data), f"data of {p}: {where}"
        epochs = list(dict.fromkeys(p.epoch for p in got))
        blocks = [
            p.epoch for i, p in enumerate(got) if i == 0 or got[i - 1].epoch != p.epoch
        ]
        assert blocks == epochs, f"in order (epoch by epoch): {where}"
        for epoch in epochs:
            offsets = [p.offset for p in got if p.epoch == epoch]
            assert offsets == list(range(1, len(offsets) + 1)), (
                f"no gap in {epoch}: {where}"
            )
        mine = sorted(p.offset for p in got if p.epoch == final_epoch)
        missing = sorted(set(in_final) - set(mine))
        assert not missing, (
            f"nothing lost: offsets {missing} of the last epoch, {where}"
        )


@given(
    faults=fault_schedules(
        runners=3, duration=DURATION, kinds={"kill", "stop", "freeze", "partition"}
    ),
    links=link_faults,
    times=publication_times,
    seed=st.integers(0, 2**16),
    latency=st.sampled_from([None, (0.5, 0.3), (1.0, 0.05)]),
)
def test_every_accepted_publication_reaches_every_subscriber_once(
    faults: FaultSchedule,
    links: list[LinkFault],
    times: list[float],
    seed: int,
    latency: tuple[float, float] | None,
) -> None:
    run = run_simulation(topic_under_faults, faults, links, times, seed, latency)
    check(run)


# Failing examples the property found, pinned (each failed before its fix).

PINNED = {
    # A client that had not received a publication yet resubscribed "from
    # now", not from its first answer's position: it missed what was
    # published while it reconnected.
    "resubscribe_before_any_publication": (
        FaultSchedule(()),
        [LinkFault(at=0.0, client=0, kind="drop", lasting=1.0)],
        [0.0],
        0,
    ),
    # A resubscribe from a position of an older epoch (the topic failed
    # over meanwhile) skipped the new epoch's history.
    "resubscribe_into_a_new_epoch": (
        FaultSchedule((FreezeRunner(at=0.0, runner=2, duration=8.0),)),
        [
            LinkFault(at=0.0, client=2, kind="drop", lasting=1.0),
            LinkFault(at=13.8, client=0, kind="drop", lasting=1.0),
        ],
        [0.0, 10.7, 15.4],
        0,
    ),
    # A socket reset during a gateway's fan-out raised from its send queue
    # (its writer had gone): the fan-out stopped, and the other sockets of
    # that gateway never got the publication.
    "socket_gone_during_fan_out": (
        FaultSchedule((KillRunner(at=0.0, runner=0, down_for=1.0),)),
        [LinkFault(at=0.1, client=0, kind="drop", lasting=1.0)],
        [0.0, 0.1],
        0,
    ),
    # A stream opened towards a partitioned runner while its own runner was
    # frozen never ended: the simulator dropped the envelope held during
    # the freeze without telling the runner (a real transport reports the
    # lost peer), so the gateway never followed the topic again. Found with
    # four clients.
    "follow_opened_while_frozen": (
        FaultSchedule(
            (
                PartitionRunners(at=0.0, a=0, b=2, duration=3.0),
                FreezeRunner(at=0.1, runner=0, duration=1.0),
            )
        ),
        [],
        [0.0],
        0,
    ),
    # After the topic moved (a runner frozen, then back), a client
    # resubscribed through a gateway whose stream still brought the old
    # epoch's end: the gateway sent it after the new epoch's history, and
    # the new epoch again after it (the client took both: epochs were not
    # ordered). A gateway now numbers the epochs its stream brings and
    # sends no socket an epoch older than the one it is in. Found with four
    # clients by the `ci` profile.
    "old_epoch_after_the_new_history": (
        FaultSchedule((FreezeRunner(at=11.0, runner=2, duration=12.0),)),
        [
            LinkFault(at=0.0, client=0, kind="drop", lasting=1.0),
            LinkFault(at=16.0, client=0, kind="drop", lasting=1.0),
        ],
        [0.0, 0.0, 12.0, 15.0, 16.7],
        0,
    ),
    # Found against a first version of that fix, which ordered epochs by
    # what the gateway's stream had brought and took an epoch it had not
    # brought for the newest: a socket whose resubscribe got the history of
    # an incarnation the stream never reached skipped every later epoch
    # (epochs are now ordered where they are made: `new_epoch`).
    "an_epoch_the_stream_never_brought": (
        FaultSchedule(
            (
                KillRunner(at=0.0, runner=0, down_for=1.0),
                FreezeRunner(at=0.0, runner=0, duration=1.0),
                KillRunner(at=17.8, runner=2, down_for=1.0),
                FreezeRunner(at=20.0, runner=0, duration=1.0),
            )
        ),
        [],
        [0.0],
        0,
    ),
    # Found by the `ci` profile before the gateway kept its topics' last
    # publications and shared history reads (`HistoryReads`): client 0,
    # resuming after a stall while the topic moved twice (fencing epochs 3
    # then 4), missed the first publication of the last epoch. It passes
    # since; how those changes closed it was not established.
    "first_of_the_last_epoch_missed": (
        FaultSchedule(
            (
                FreezeRunner(at=11.4, runner=1, duration=6.0),
                KillRunner(at=14.1, runner=2, down_for=3.0),
            )
        ),
        [
            LinkFault(at=0.0, client=2, kind="drop", lasting=1.0),
            LinkFault(at=13.0, client=0, kind="stall", lasting=4.0),
        ],
        [17.4],
        0,
    ),
    # Found by the `ci` profile: after runner 0's freeze, two clients
    # resumed through its gateway, which no longer followed the topic. The
    # first one's subscribe made the follower and read the history, which
    # failed (the topic's runner, 2, was unreachable); the second had
    # joined the follower meanwhile. Only the subscribe that made a
    # follower started its stream: none did, and no socket of that gateway
    # got a publication again (client 1 missed the whole last epoch). The
    # first subscribe whose read succeeds starts it now.
    "subscribed_while_the_first_read_failed": (
        FaultSchedule(
            (
                FreezeRunner(at=4.3, runner=0, duration=1.0),
                KillRunner(at=5.2, runner=2, down_for=1.0),
            )
        ),
        [
            LinkFault(at=0.0, client=0, kind="drop", lasting=1.0),
            LinkFault(at=5.2, client=2, kind="drop", lasting=1.0),
        ],
        [0.0],
        0,
    ),
}
PINNED_CLIENTS = {
    "subscribed_while_the_first_read_failed": 4,
    "first_of_the_last_epoch_missed": 4,
    "follow_opened_while_frozen": 4,
    "old_epoch_after_the_new_history": 4,
    "an_epoch_the_stream_never_brought": 4,
}
"""The others were found with three clients."""


@pytest.mark.parametrize("name", sorted(PINNED))
def test_pinned_examples(name: str) -> None:
    faults, links, times, seed = PINNED[name]
    clients = PINNED_CLIENTS.get(name, 3)
    check(run_simulation(topic_under_faults, faults, links, times, seed, None, clients))


def test_the_property_finds_a_planted_bug(monkeypatch: pytest.MonkeyPatch) -> None:
    """With a resume that skips the first publication missed, the search
    finds a run breaking the property (it is wired up)."""
    original = Topic._since

    def skips_one(self: Topic, since: Position | None) -> tuple[bool, list[Any]]:
        recovered, items = original(self, since)
        return recovered, items[1:] if since is not None and recovered else items

    monkeypatch.setattr(Topic, "_since", skips_one)

    def breaks(example: tuple[list[LinkFault], list[float]]) -> bool:
        links, times = example
        run = run_simulation(topic_under_faults, FaultSchedule(()), links, times, 0)
        try:
            check(run)
        except AssertionError:
            return True
        return False

    found = find(
        st.tuples(link_faults, publication_times),
        breaks,
        settings=settings(
            max_examples=50,
            derandomize=True,
            database=None,
            deadline=None,
            phases=[Phase.generate],
            suppress_health_check=[HealthCheck.too_slow],
        ),
    )
    assert breaks(found)  # the same run fails the same way
