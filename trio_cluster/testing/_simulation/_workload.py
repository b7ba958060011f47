"""Workloads for `Probe` entities, and whole scenarios (test support).

A `Workload` is a list of client operations: at a virtual time, on a runner,
a client sends a few messages to one probe entity, one after the other:
persisted calls (retried with the same primary key until answered), persisted
discards (retried until stored) or volatile calls (tried once, with a
deadline). A client runs in its runner's process, so it dies if that runner is
killed; otherwise it must finish once the faults stop.

A `Scenario` is a seed, a number of runners, a `FaultSchedule` and a
`Workload`. `check_scenario` plays one on a simulated cluster of `Probe`
entities, heals everything, and then checks liveness: every client finishes,
every stored request is answered and every entity answers a volatile call,
within the cluster's ``settle_time``. `run_scenario` does that in its own
``trio.run`` (one per Hypothesis example). Every other invariant is checked
continuously while it runs.
"""

from __future__ import annotations

import enum
from typing import TYPE_CHECKING

import attrs
import trio

from trio_cluster import (
    ClusterError,
    DeadLetteredError,
    RequestInterruptedError,
    ShardingConfig,
)

from ._faults import FaultSchedule
from ._probe import Probe, ProbeTouch, ProbeWrite, write_key
from ._run import default_settle_time, open_simulated_cluster, run_simulation

if TYPE_CHECKING:
    from collections.abc import Iterable

    from ._cluster import SimulatedCluster

__all__ = [
    "ClientOp",
    "OpKind",
    "Scenario",
    "ScenarioReport",
    "Workload",
    "check_scenario",
    "run_scenario",
    "run_workload",
]

RETRY_DELAY = 0.25
"""Virtual seconds a client waits before sending again after an error."""

VOLATILE_DEADLINE = 5.0
"""Virtual seconds a client gives each volatile call."""

BACKGROUND_ENTITY = 100
"""Number of the first background probe entity."""
BACKGROUND_PAUSE = 0.5
BACKGROUND_WORK = 0.4


class OpKind(enum.Enum):
    CALL = "call"
    """Persisted calls, each retried (same key) until it gets its reply."""
    DISCARD = "discard"
    """Persisted fire-and-forget, each retried until stored."""
    VOLATILE = "volatile"
    """Volatile calls, each tried once (at most once), with a deadline."""
    ABANDON = "abandon"
    """Persisted calls whose client gives up on each after `ABANDON_AFTER`
    (cancelled: while its request is written, waits, or runs in its task),
    then sends it again (same key) until answered: with its reply, or
    interrupted. Not in the default workloads (`workloads` ``kinds``)."""


DEFAULT_KINDS = (OpKind.CALL, OpKind.DISCARD, OpKind.VOLATILE)
"""The kinds of client operations of the default workloads."""

ABANDON_AFTER = (0.0, 0.001, 0.1, 0.5)
"""Virtual seconds an `OpKind.ABANDON` client gives its ``n``-th message:
``ABANDON_AFTER[n % 4]``."""


@attrs.frozen
class ClientOp:
    """One client: ``count`` messages of ``kind`` to probe ``p<entity>``,
    sent one after the other from runner ``via``, starting at ``at``."""

    at: float
    via: int
    entity: int
    kind: OpKind
    count: int = 1
    work: float = 0.0
    """Seconds each handler works."""
    resend: bool = False
    """Persisted calls: send each again after its reply; the stored reply
    must come back (dedup by primary key)."""
    pause: float = 0.0
    """Seconds the client waits between two messages."""


def _ops(ops: Iterable[ClientOp]) -> tuple[ClientOp, ...]:
    return tuple(ops)


@attrs.frozen
class Workload:
    """Clients of `Probe` entities (see the module docstring)."""

    ops: tuple[ClientOp, ...] = attrs.field(default=(), converter=_ops)
    background: int = 0
    """Entities (``p100``, ``p101``, ...) that get a steady stream of
    persisted writes (one every `BACKGROUND_PAUSE` s, each working
    `BACKGROUND_WORK` s) while the faults last, so that every runner has
    work in flight when a fault strikes."""

    def background_ops(self, runners: int, until: float) -> list[ClientOp]:
        """The background clients, as client operations."""
        count = int(until / BACKGROUND_PAUSE) + 1
        return [
            ClientOp(
                at=0.0,
                via=index % runners,
                entity=BACKGROUND_ENTITY + index,
                kind=OpKind.DISCARD,
                count=count,
                work=BACKGROUND_WORK,
                pause=BACKGROUND_PAUSE,
            )
            for index in range(self.background)
        ]

    @property
    def end(self) -> float:
        return max((op.at for op in self.ops), default=0.0)

    def busiest(self) -> float:
        """Seconds of handler work queued for the busiest entity (its
        messages run one at a time): the liveness bound grows with it."""
        work: dict[int, float] = {}
        for op in self.ops:
            if op.kind is OpKind.ABANDON:  # sent, then twice until answered
                sends = 3 * op.count
            else:
                sends = op.count * (2 if op.resend and op.kind is OpKind.CALL else 1)
            work[op.entity] = work.get(op.entity, 0.0) + sends * op.work
        return max(work.values(), default=0.0)


@attrs.frozen
class Scenario:
    """Everything one simulated run depends on."""

    seed: int
    runners: int
    faults: FaultSchedule = attrs.field(factory=FaultSchedule)
    workload: Workload = attrs.field(factory=Workload)


@attrs.frozen
class ScenarioReport:
    """What a scenario did (for tests and benchmarks)."""

    virtual_time: float
    executions: int
    stored: int
    replies: int
    stale_replies_refused: int
    clients_finished: int
    clients_died: int
    trace_digest: str


class _Clients:
    def __init__(self, cluster: SimulatedCluster) -> None:
        self.cluster = cluster
        self.running: dict[int, ClientOp] = {}
        self.finished = 0
        self.died = 0
        self.all_done = trio.Event()
        self.all_done.set()


async def run_workload(
    cluster: SimulatedCluster, workload: Workload, *, until: float = 0.0
) -> _Clients:
    """Start each client of ``workload`` at its time (from now), on its
    runner or, if that one is down, the next one up, and its background
    clients for ``until`` seconds; return once all are started (see
    `wait_clients`)."""
    clients = _Clients(cluster)
    start = trio.current_time()
    ops = [*workload.ops, *workload.background_ops(len(cluster.runners), until)]
    order = sorted(range(len(ops)), key=lambda i: (ops[i].at, i))
    for stream in order:
        op = ops[stream]
        await trio.sleep_until(start + op.at)
        count = len(cluster.runners)
        for step in range(count):
            handle = cluster.runners[(op.via + step) % count]
            if handle.up:
                clients.running[stream] = op
                clients.all_done = trio.Event()
                handle.start_soon(_client, clients, handle.index, stream, op)
                break
        else:
            cluster.trace.record("check", "client %d not started: no runner up", stream)
    return clients


async def wait_clients(clients: _Clients) -> None:
    """Wait until every client finished or died with its runner; fail the
    simulation if that takes longer than the cluster's ``settle_time``."""
    with trio.move_on_after(clients.cluster.settle_time):
        await clients.all_done.wait()
        return
    stuck = ", ".join(
        f"client {stream} ({op.kind.value} to p{op.entity})"
        for stream, op in sorted(clients.running.items())
    )
    clients.cluster.fail(f"liveness: clients still not done after healing: {stuck}")
    await trio.lowlevel.checkpoint()


async def _client(clients: _Clients, via: int, stream: int, op: ClientOp) -> None:
    cluster = clients.cluster
    try:
        client = cluster.client(Probe, via=via)(f"p{op.entity}")
        for seq in range(op.count):
            if seq and op.pause:
                await trio.sleep(op.pause)
            if op.kind is OpKind.VOLATILE:
                touch = ProbeTouch(op=cluster.probes.next_op(), work=op.work)
                with trio.move_on_after(VOLATILE_DEADLINE):
                    try:
                        await client.touch(touch)
                    except ClusterError as exc:
                        cluster.trace.record("volatile", "touch %d: %r", touch.op, exc)
                continue
            message = ProbeWrite(stream=stream, seq=seq, work=op.work)
            if op.kind is OpKind.ABANDON:
                await _abandon(cluster, client.write, message, seq)
                continue
            if op.kind is OpKind.DISCARD:
                await _retry(cluster, client.write.discard, message)
                continue
            reply = await _retry(cluster, client.write, message)
            if op.resend:
                again = await _retry(cluster, client.write, message)
                if again != reply:
                    cluster.fail(
                        f"dedup: re-sending write {write_key(message)} to p{op.entity}"
                        f" returned {again!r}, the first reply was {reply!r}"
                    )
    except trio.Cancelled:
        clients.died += 1
        raise
    else:
        clients.finished += 1
    finally:
        del clients.running[stream]
        if not clients.running:
            clients.all_done.set()


async def _abandon(
    cluster: SimulatedCluster, send: object, message: ProbeWrite, seq: int
) -> None:
    """Send ``message``, give up on it after a deadline, then send it again
    until answered (see `OpKind.ABANDON`); a second answer must be the
    first (dedup)."""
    with trio.move_on_after(ABANDON_AFTER[seq % len(ABANDON_AFTER)]):
        try:
            await send(message)  # type: ignore[operator]
        except ClusterError as exc:
            cluster.trace.record(
                "persisted", "client: write %s failed: %r", write_key(message), exc
            )
    first = await _retry(cluster, send, message, interrupted=True)
    again = await _retry(cluster, send, message, interrupted=True)
    if again != first:
        cluster.fail(
            f"dedup: re-sending abandoned write {write_key(message)} returned"
            f" {again!r}, the first answer was {first!r}"
        )


async def _retry(
    cluster: SimulatedCluster,
    send: object,
    message: ProbeWrite,
    *,
    interrupted: bool = False,
) -> object:
    while True:
        try:
            return await send(message)  # type: ignore[operator]
        except DeadLetteredError as exc:
            # Its attempts ran out (its runners kept dying): a final reply,
            # the same for every re-send of the write.
            return f"dead-lettered after {exc.attempts} attempt(s): {exc.error}"
        except RequestInterruptedError:
            if interrupted:  # its final reply (an abandoned write's)
                return "interrupted"
            raise
        except ClusterError as exc:
            cluster.trace.record(
                "persisted", "client: write %s failed: %r", write_key(message), exc
            )
        await trio.sleep(RETRY_DELAY)


async def check_scenario(
    scenario: Scenario, *, config: ShardingConfig | None = None
) -> ScenarioReport:
    """Play ``scenario`` on a simulated cluster of `Probe` entities and check
    every invariant, then liveness after healing (see the module docstring).

    Raises:
        InvariantViolation: with the seed and the trace.
    """
    base = config if config is not None else ShardingConfig(shards_per_group=16)
    async with open_simulated_cluster(
        [Probe],
        runners=scenario.runners,
        seed=scenario.seed,
        config=base,
        settle_time=default_settle_time(base) + 2 * scenario.workload.busiest(),
    ) as cluster:
        start = trio.current_time()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(cluster.run_schedule, scenario.faults)
            clients = await run_workload(
                cluster, scenario.workload, until=scenario.faults.end
            )
        await cluster.heal_all()
        await wait_clients(clients)
        await cluster.wait_quiescent()
        entities = sorted({op.entity for op in scenario.workload.ops})
        entities += [BACKGROUND_ENTITY + i for i in range(scenario.workload.background)]
        await _everyone_answers(cluster, entities)
        report = ScenarioReport(
            virtual_time=trio.current_time() - start,
            executions=cluster.probes.executions,
            stored=len(cluster.checker.accepted),
            replies=cluster.checker.finals,
            stale_replies_refused=cluster.checker.stale_refused,
            clients_finished=clients.finished,
            clients_died=clients.died,
            trace_digest=cluster.trace.digest(),
        )
    return report


async def _everyone_answers(cluster: SimulatedCluster, entities: list[int]) -> None:
    """Liveness of routing: after healing, every entity answers a volatile
    call from every runner within ``settle_time``."""
    with trio.move_on_after(cluster.settle_time):
        for entity in entities:
            for handle in cluster.runners:
                assert handle.runner is not None
                client = handle.runner.client(Probe)(f"p{entity}")
                while True:
                    try:
                        await client.touch(ProbeTouch(op=cluster.probes.next_op()))
                    except ClusterError as exc:
                        cluster.trace.record("check", "final touch failed: %r", exc)
                        await trio.sleep(RETRY_DELAY)
                    else:
                        break
        return
    cluster.fail(
        f"liveness: some entity did not answer within {cluster.settle_time}s"
        " after healing"
    )
    await trio.lowlevel.checkpoint()


def run_scenario(
    scenario: Scenario, *, config: ShardingConfig | None = None
) -> ScenarioReport:
    """`check_scenario` in its own ``trio.run`` on an autojump `MockClock`."""
    return run_simulation(_check, scenario, config)


async def _check(scenario: Scenario, config: ShardingConfig | None) -> ScenarioReport:
    return await check_scenario(scenario, config=config)
