"""STATE: the cost of durable entity state on PostgreSQL (fsync on).

Same run, same runner, two entity types whose transactional handler does the
same work: ``Plain`` keeps its count in an attribute, ``Durable`` in durable
state (`trio_cluster.durable`), so each of its calls also saves the state in
the handler's transaction.

1. sequential calls round robin over ``ENTITIES`` warm entities of each type,
   alternating the types in rounds -> ``<kind>_msgs_per_s``, p50, p99;
2. activation: the first call to ``COLD`` new entities of each type (a
   durable one reads its state first) -> ``<kind>_first_call_p50``;
3. ``durable_over_plain``: the ratio of the sequential rates.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Awaitable, Callable
from functools import partial

import attrs
import trio

import trio_cluster as tc
from trio_cluster.storage import PostgresStorage

from ._common import (
    Increment,
    bench_dsn,
    drop_tables,
    emit,
    emit_phase,
    percentile,
    progress,
    sequential,
)

ENTITIES = 20


@attrs.frozen
class Count:
    value: int = 0


class Plain(tc.Entity):
    type_name = "bench.Plain"

    def __init__(self) -> None:
        self.value = 0

    @tc.rpc(persisted=True, transactional=True)
    async def increment(self, msg: Increment) -> int:
        self.value += msg.amount
        return self.value


class Durable(tc.Entity):
    type_name = "bench.Durable"
    state = tc.durable(Count)

    @tc.rpc(persisted=True, transactional=True)
    async def increment(self, msg: Increment) -> int:
        self.state = Count(self.state.value + msg.amount)
        return self.state.value


def increment(runner: tc.Runner, kind: str, name: str) -> Callable[[], Awaitable[int]]:
    """``increment(1)`` on entity ``name`` of the ``kind`` type."""
    one = Increment(1)
    if kind == "plain":
        return partial(runner.client(Plain)(name).increment, one)
    return partial(runner.client(Durable)(name).increment, one)


async def run(dsn: str, prefix: str, *, quick: bool) -> None:
    rounds = 2 if quick else 5
    per_round = 40 if quick else 200
    cold = 20 if quick else 100
    storage = PostgresStorage(dsn, table_prefix=prefix)
    config = tc.ShardingConfig(shards_per_group=16)
    async with tc.open_runner(
        entities=[Plain, Durable], storage=storage, config=config
    ) as runner:
        calls = {}
        for kind in ("plain", "durable"):
            refs = [increment(runner, kind, f"e{i}") for i in range(ENTITIES)]
            for ref in refs:  # warm: activated, state loaded
                await ref()

            async def call(
                i: int, refs: list[Callable[[], Awaitable[int]]] = refs
            ) -> int:
                return await refs[i % len(refs)]()

            calls[kind] = call
        results: dict[str, tuple[float, list[float]]] = {
            kind: (0.0, []) for kind in calls
        }
        elapsed = dict.fromkeys(calls, 0.0)
        for r in range(rounds):
            progress(f"state: round {r + 1}/{rounds}")
            for kind, call in calls.items():
                rate, latencies = await sequential(call, per_round)
                results[kind][1].extend(latencies)
                elapsed[kind] += per_round / rate
        common = {"calls": per_round * rounds, "entities": ENTITIES}
        rates = {}
        for kind, (_, latencies) in results.items():
            rates[kind] = len(latencies) / elapsed[kind]
            emit_phase("state", kind, rates[kind], latencies, common)
        emit("state", "durable_over_plain", rates["durable"] / rates["plain"], "ratio")
        for kind in calls:
            firsts: list[float] = []
            for i in range(cold):
                first = increment(runner, kind, f"cold{i}")
                t0 = time.perf_counter()
                await first()
                firsts.append(time.perf_counter() - t0)
            emit(
                "state",
                f"{kind}_first_call_p50",
                percentile(firsts, 50) * 1e6,
                "us",
                entities=cold,
            )


def main(*, quick: bool = False) -> None:
    dsn = bench_dsn()
    prefix = f"bench_state_{uuid.uuid4().hex[:8]}"
    try:
        trio.run(lambda: run(dsn, prefix, quick=quick))
    finally:
        drop_tables(dsn, prefix)


if __name__ == "__main__":
    main()
