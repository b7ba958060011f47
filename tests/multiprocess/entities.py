"""The entities the multi-process tests run in real runner processes.

``python -m trio_cluster run tests.multiprocess.entities:ENTITIES`` loads
them; the test process uses the same classes in its client-only runner.

Every reply says which runner ran the handler and at which fencing epoch the
runner held the entity's shard, so a test can check that a shard is never
served by two runners at once (the epochs an entity is served at never go
down) and that a request re-run by a successor is recorded only once.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import attrs
import trio

import trio_cluster as tc
from trio_cluster.webhooks import BreakerPolicy, RetrySchedule, Webhooks


@attrs.frozen
class Ping:
    pass


@attrs.frozen
class Record:
    key: str
    """Primary key of the persisted request."""
    marker: str = ""
    """If set, a file the handler creates when it starts."""
    block: float = 0.0
    """Seconds the handler blocks its whole process (``time.sleep``), so that a
    test can freeze the runner with the handler in the middle of its work."""


@attrs.frozen
class Relay:
    to: str
    """The id of the `Probe` to call from this one (perhaps on another
    runner)."""


@attrs.frozen
class Served:
    runner: str
    epoch: int
    calls: int


def _served(entity: Probe) -> Served:
    runner = tc.current_runner()
    # Test introspection: the epoch at which this runner holds the shard.
    epoch = runner.served_shards().get(entity.address.shard, -1)
    entity.calls += 1
    return Served(str(runner.address), epoch, entity.calls)


class Probe(tc.Entity):
    type_name = "mp.Probe"

    def __init__(self) -> None:
        self.calls = 0

    @tc.rpc
    async def where(self, msg: Ping) -> Served:
        return _served(self)

    @tc.rpc(persisted=True, primary_key=lambda msg: msg.key)
    async def record(self, msg: Record) -> Served:
        # No await: the handler runs to its end in one step, even when the
        # process was frozen in the middle of it and its lease lapsed meanwhile.
        if msg.marker:
            Path(msg.marker).touch()  # noqa: ASYNC240
        if msg.block:
            time.sleep(msg.block)  # noqa: ASYNC251, TID251 - blocking on purpose
        return _served(self)

    @tc.rpc
    async def relay(self, msg: Relay) -> Served:
        """Where the `Probe` ``msg.to`` answered a call from this one."""
        served: Served = await tc.current_runner().client(Probe)(msg.to).where(Ping())
        return served


# Call metadata across a crash: `Holder.hold` blocks on its first run, so a
# test can kill its runner with the request in flight and see what the
# runner that takes the request over runs it with.


@attrs.frozen
class Hold:
    log: str
    """A file each run appends a JSON line to (its runner, its metadata)."""


@attrs.frozen
class Carried:
    runner: str
    metadata: dict[str, str]


class Holder(tc.Entity):
    type_name = "mp.Holder"

    @tc.rpc(persisted=True)
    async def hold(self, msg: Hold) -> Carried:
        """Logs its run; blocks forever on the first, answers after."""
        log = Path(msg.log)
        first = not log.exists()  # noqa: ASYNC240
        carried = Carried(str(tc.current_runner().address), dict(tc.current_metadata()))
        with log.open("a") as file:  # noqa: ASYNC230
            file.write(json.dumps(attrs.asdict(carried)) + "\n")
        if first:
            await trio.sleep_forever()
        return carried


# A message that kills every runner it reaches: its handler ends the
# process (as a segfault or the kernel's OOM killer would), so the test sees
# it dead-lettered after its attempts while the cluster serves the rest.


@attrs.frozen
class Explode:
    log: str
    """A file each attempt appends its runner's address to, before exiting."""


class Poison(tc.Entity):
    type_name = "mp.Poison"

    @tc.rpc(persisted=True, retry=tc.RetryPolicy(max_attempts=2))
    async def explode(self, msg: Explode) -> None:
        with Path(msg.log).open("a") as file:  # noqa: ASYNC230
            file.write(f"{tc.current_runner().address}\n")
        os._exit(3)


# Durable entity state: a tally kept in the runners' storage, which a test
# grows while it kills the runner serving it (`test_durable_state.py`).


@attrs.frozen
class Count:
    adds: int = 0
    """Acknowledged ``Add`` requests (each counted once: its primary key)."""
    total: int = 0


@attrs.frozen
class Add:
    key: str
    amount: int = 1


@attrs.frozen
class Counted:
    runner: str
    count: Count


class Tally(tc.Entity):
    type_name = "mp.Tally"
    state = tc.durable(Count)

    @tc.rpc(persisted=True, transactional=True, primary_key=lambda msg: msg.key)
    async def add(self, msg: Add) -> Counted:
        self.state = Count(self.state.adds + 1, self.state.total + msg.amount)
        return Counted(str(tc.current_runner().address), self.state)

    @tc.rpc
    async def read(self, msg: Ping) -> Counted:
        return Counted(str(tc.current_runner().address), self.state)


ENTITIES = [Probe, Holder, Poison, Tally]


# Webhooks on a compressed schedule (3 s between attempts), hosted by the
# runners of ``WEBHOOK_TARGET``; a breaker that never opens in these tests.
WEBHOOKS = Webhooks(
    name="mp",
    schedule=RetrySchedule((0, 3, 3, 3, 3), jitter=0),
    breaker=BreakerPolicy(threshold=1000),
    endpoint_refresh=0.5,
)
WEBHOOK_TARGET = {"entities": ENTITIES, "webhooks": [WEBHOOKS]}
