"""The event bus under the simulator: transactions publish while runners
hosting the subscription's consumers are killed and restarted (generated
schedules). Every event of a committed transaction is delivered at least
once, each key's events in order (a redelivery repeats a suffix, never
skips ahead), and no event of a rolled-back transaction ever is, with
consumers that never poll (only storage's wake-ups make them read)."""

from __future__ import annotations

import attrs
import pytest
import trio
from hypothesis import given, strategies as st

from trio_cluster.events import Event, Subscription, Topic, event_bus
from trio_cluster.testing import open_simulated_cluster, run_simulation

pytestmark = pytest.mark.simulation

KEYS = ("a", "b", "c")


@attrs.frozen
class Tick:
    key: str
    n: int
    """The key's committed count before it; -1 for an event rolled back."""
    id: int


TOPIC = Topic("sim.ticks", Tick, partitions=4)


class _RolledBack(Exception):
    pass


@attrs.frozen
class Publish:
    key: str
    commit: bool


@attrs.frozen
class Kill:
    runner: int
    """1 or 2: runner 0 publishes and is never killed."""
    down: float
    """Seconds it stays down before it is restarted."""


@attrs.frozen
class Pause:
    seconds: float


steps = st.lists(
    st.one_of(
        st.builds(Publish, st.sampled_from(KEYS), st.booleans()),
        st.builds(Kill, st.integers(1, 2), st.floats(0.0, 20.0, allow_subnormal=False)),
        st.builds(Pause, st.floats(0.0, 5.0, allow_subnormal=False)),
    ),
    max_size=25,
)


async def play(
    script: list[Publish | Kill | Pause],
) -> tuple[dict[str, int], set[int], list[Tick]]:
    """Play ``script``; return each key's committed count, the ids rolled
    back, and every delivery."""
    delivered: list[Tick] = []

    async def handle(event: Event[Tick]) -> None:
        delivered.append(event.value)

    # No poll: the consumers read only when storage wakes them.
    sub = Subscription(TOPIC, "sim", handle, start="earliest")
    committed = dict.fromkeys(KEYS, 0)
    rolled_back: set[int] = set()
    ids = iter(range(1_000_000))
    async with open_simulated_cluster(
        [], runners=3, singletons=sub.consumers
    ) as cluster:
        await cluster.wait_stable()
        publisher = cluster.runner(0).runner
        assert publisher is not None
        bus = event_bus(publisher)
        for step in script:
            if isinstance(step, Publish):
                tick = Tick(
                    step.key, committed[step.key] if step.commit else -1, next(ids)
                )
                try:
                    async with publisher.transaction():
                        await bus.publish(TOPIC, tick, key=step.key)
                        if not step.commit:
                            raise _RolledBack
                except _RolledBack:
                    rolled_back.add(tick.id)
                else:
                    committed[step.key] += 1
            elif isinstance(step, Kill):
                await cluster.kill(step.runner)
                await trio.sleep(step.down)
                await cluster.restart(step.runner)
            else:
                await trio.sleep(step.seconds)
        await cluster.wait_stable()
        with trio.fail_after(300):
            while not all(  # noqa: ASYNC110
                any(t.key == key and t.n == count - 1 for t in delivered)
                for key, count in committed.items()
                if count
            ):
                await trio.sleep(0.5)
        await trio.sleep(5)  # a phantom would arrive meanwhile
    return committed, rolled_back, delivered


@given(script=steps)
def test_committed_events_arrive_in_key_order_and_rolled_back_ones_never(script):
    committed, rolled_back, delivered = run_simulation(play, script)
    assert not {t.id for t in delivered} & rolled_back
    for key, count in committed.items():
        mine = [t.n for t in delivered if t.key == key]
        assert set(mine) == set(range(count)), (key, mine)
        highest = -1
        for n in mine:
            assert n <= highest + 1, (key, mine)  # never skips ahead
            highest = max(highest, n)
