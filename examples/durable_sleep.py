"""A long sleep that survives a runner kill: a durable workflow timer.

``remind`` notes a reminder, sleeps durably, then sends it. A sleep longer
than the workflow's ``in_memory_sleep`` does not hold a task: the
execution's journal is committed with a persisted ``deliver_at`` wake
message, and the execution waits with nothing in memory. So when the
runner that ran it is killed in its sleep, the runner that takes over its
shard sets the timer again from storage, and the reminder is sent there,
on time (or as soon as the takeover happened, if that was later). The
noting step is not run again: its result is in the journal.

``python examples/durable_sleep.py`` runs it in one process (a few seconds
of real time): a first runner starts the reminder and is killed
(`Runner.abort`, as a crash: no lock released) while it sleeps; a second
runner on the same storage takes over when the first one's lease lapses,
and sends it. In a cluster, ``trio-cluster run examples.durable_sleep:RUNNER
--dsn ...`` hosts the workflow; the test suite kills such runner processes
with SIGKILL mid-sleep (``tests/multiprocess/test_workflow_failover.py``).
"""

from __future__ import annotations

import attrs
import trio

import trio_cluster as tc
from trio_cluster.abc import Storage
from trio_cluster.storage import MemoryStorage
from trio_cluster.workflows import Status, WorkflowContext, workflow


@attrs.frozen
class Reminder:
    id: str
    text: str
    delay: float
    """Seconds to sleep between noting and sending it."""


@attrs.frozen
class Sent:
    id: str
    noted_by: str
    """The runner that ran the noting step."""
    sent_by: str
    """The runner that ran the sending step."""
    due: float
    """When the sleep ended (Unix seconds, recorded by the workflow)."""
    sent_at: float
    """When it was sent (the sending runner's clock)."""


@attrs.frozen
class Noted:
    by: str
    due: float


async def note(reminder: Reminder) -> str:
    # A step: its result is recorded once, and replayed after a failover.
    return str(tc.current_runner().address)


async def send(reminder: Reminder) -> tuple[str, float]:
    runner = tc.current_runner()
    print(f"reminder {reminder.id}: {reminder.text!r} (sent by {runner.address})")
    return str(runner.address), runner.clock.now()


@workflow(name="remind", idempotency_key=lambda reminder: reminder.id)
async def remind(ctx: WorkflowContext, reminder: Reminder) -> Sent:
    noted_by = await ctx.step(note, reminder)
    due = ctx.now().timestamp() + reminder.delay
    await ctx.sleep(reminder.delay)
    sent_by, sent_at = await ctx.step(send, reminder)
    return Sent(reminder.id, noted_by, sent_by, due, sent_at)


RUNNER = {"entities": [remind.entity]}
"""For ``trio-cluster run examples.durable_sleep:RUNNER``."""

LEASE = 2.0
"""Seconds a killed runner keeps its shards (a short lease, for the demo)."""


def _config(port: int, lease: float) -> tc.ShardingConfig:
    # The runners' periodic work (lease refreshes, membership and storage
    # polls) scales with the lease.
    return tc.ShardingConfig(
        runner_address=tc.RunnerAddress("127.0.0.1", port),
        lease_duration=lease,
        lease_refresh_interval=lease / 4,
        membership_poll_interval=lease / 8,
        storage_poll_interval=lease,
        retention_interval=max(60.0, lease),
        shards_per_group=8,
    )


async def main(
    storage: Storage | None = None, *, delay: float = 5.0, lease: float = LEASE
) -> Sent:
    """Start a reminder due in ``delay`` seconds on a first runner, kill it
    while it sleeps, and let a second runner send it; return what was sent.
    ``lease``: how long the killed runner keeps its shards."""
    storage = storage if storage is not None else MemoryStorage()
    reminder = Reminder("r1", "water the plants", delay)
    async with tc.open_runner(
        entities=[remind.entity], storage=storage, config=_config(1, lease)
    ) as first:
        handle = await remind.client(first).start(reminder)
        info = await handle.poll()
        while info.status is not Status.WAITING:  # the noting step ran
            await trio.sleep(0.1)
            info = await handle.poll()
        print(f"{first.address} sleeps until {info.waiting_until}: killed now")
        first.abort()  # as if the process were killed: no lock released
    async with tc.open_runner(
        entities=[remind.entity], storage=storage, config=_config(2, lease)
    ) as second:
        sent = await remind.client(second).get(reminder.id).result()
    late = sent.sent_at - sent.due
    print(f"noted by {sent.noted_by}, sent by {sent.sent_by}, {late:.3f} s late")
    return sent


if __name__ == "__main__":
    trio.run(main)
