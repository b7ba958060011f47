"""Runners on one memory storage and one memory network, on virtual time
(shared by the multi-runner tests)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from typing import Any

import attrs
import trio

import trio_cluster as tc
from trio_cluster.storage import MemoryStorage
from trio_cluster.transport import MemoryNetwork, MemoryTransport

from .helpers import Add, Count, config


@attrs.frozen
class Nap:
    seconds: float


@attrs.frozen
class Where:
    runner: str
    total: int


@attrs.define(eq=False, kw_only=True)
class Refused(Exception):
    after: int


class Tally(tc.Entity):
    type_name = "cluster.Tally"
    naps_finished = 0
    produced = 0
    """Items `numbers` has made, over all its streams (reset it in a test)."""
    numbers_closed = 0
    """`numbers` streams whose generator ended or was interrupted."""

    def __init__(self) -> None:
        self.total = 0

    @tc.rpc
    async def add(self, msg: Add) -> Where:
        self.total += msg.amount
        return Where(str(tc.current_runner().address), self.total)

    @tc.rpc
    async def nap(self, msg: Nap) -> None:
        await trio.sleep(msg.seconds)
        Tally.naps_finished += 1

    @tc.rpc(persisted=True)
    async def add_persisted(self, msg: Add) -> Where:
        self.total += msg.amount
        return Where(str(tc.current_runner().address), self.total)

    @tc.stream
    async def count(self, msg: Count) -> AsyncIterator[int]:
        for n in range(msg.upto):
            yield n

    @tc.stream
    async def slow_count(self, msg: Count) -> AsyncIterator[int]:
        """One item every ``msg.upto`` seconds, forever."""
        n = 0
        while True:
            yield n
            n += 1
            await trio.sleep(msg.upto)

    @tc.stream
    async def numbers(self, msg: Count) -> AsyncIterator[int]:
        """0, 1, 2, ... forever, counted in `Tally.produced`; ``msg.upto`` is
        ignored."""
        n = 0
        try:
            while True:
                Tally.produced += 1
                yield n
                n += 1
        finally:
            Tally.numbers_closed += 1

    @tc.stream
    async def unsendable(self, msg: Count) -> AsyncIterator[int]:
        """``msg.upto`` items, then one no codec can encode (it reaches the
        wire only without ``serialize_local_calls``)."""
        for n in range(msg.upto):
            yield n
        yield object()  # type: ignore[misc]

    @tc.stream
    async def mistyped(self, msg: Count) -> AsyncIterator[int]:
        """``msg.upto`` items, then text forever (the caller cannot decode
        it; it reaches the wire only without ``serialize_local_calls``);
        counts its end in `Tally.numbers_closed`."""
        try:
            for n in range(msg.upto):
                yield n
            while True:
                yield "text"  # type: ignore[misc]
        finally:
            Tally.numbers_closed += 1

    @tc.stream(errors=[Refused])
    async def count_then_refuse(self, msg: Count) -> AsyncIterator[int]:
        """0 .. ``msg.upto - 1``, then the declared error `Refused`."""
        for n in range(msg.upto):
            yield n
        raise Refused(after=msg.upto)

    @tc.stream
    async def tallies(self, msg: Count) -> AsyncIterator[Where]:
        """A stream of attrs items (their codec cannot encode None)."""
        for n in range(msg.upto):
            yield Where("here", n)


class Cluster:
    """Runners on one memory storage and one memory network."""

    def __init__(self, stack: AsyncExitStack, **overrides: Any) -> None:
        self.stack = stack
        self.singleton_runs: list[str] = []
        self.singleton_active: list[str] = []
        self.storage = MemoryStorage()
        self.network = MemoryNetwork()
        self.overrides = overrides
        self.runners: dict[int, tc.Runner] = {}
        self.scopes: dict[int, trio.CancelScope] = {}
        self.received: list[tuple[str, int]] = []

    async def start(self, port: int) -> tc.Runner:
        nursery = await self.stack.enter_async_context(trio.open_nursery())
        # Stop the runner when the stack unwinds (callbacks run first).
        self.stack.callback(nursery.cancel_scope.cancel)
        runner: tc.Runner = await nursery.start(self._serve, port)

        self.runners[port] = runner
        return runner

    async def _serve(
        self, port: int, *, task_status: trio.TaskStatus[tc.Runner]
    ) -> None:
        async def note(msg: Add) -> None:
            self.received.append((str(tc.current_runner().address), msg.amount))

        with trio.CancelScope() as scope:
            self.scopes[port] = scope
            async with tc.open_runner(
                entities=[Tally],
                config=config(
                    runner_address=tc.RunnerAddress("127.0.0.1", port),
                    **self.overrides,
                ),
                storage=self.storage,
                transport=MemoryTransport(self.network),
                broadcasts=[tc.Broadcast("note", note)],
                singletons=[tc.Singleton("watchdog", self._watchdog)],
            ) as runner:
                task_status.started(runner)
                await trio.sleep_forever()

    async def _watchdog(self) -> None:
        here = str(tc.current_runner().address)
        self.singleton_runs.append(here)
        self.singleton_active.append(here)
        assert len(self.singleton_active) == 1, self.singleton_active
        try:
            await trio.sleep_forever()
        finally:
            self.singleton_active.remove(here)

    def kill(self, port: int) -> None:
        """As a SIGKILL: connections and lock session gone, tasks stopped."""
        runner = self.runners.pop(port)
        self.network.kill(runner.address)
        self.storage.kill_session(str(runner.address))
        self.scopes[port].cancel()

    def stop(self, port: int) -> None:
        """A graceful shutdown (cancelling the runner's scope)."""
        del self.runners[port]
        self.scopes[port].cancel()

    async def settled(self) -> None:
        """Wait until every runner sees all the others and serves its share."""
        with trio.fail_after(30):
            while not self.is_settled():  # noqa: ASYNC110
                await trio.sleep(0.01)

    def is_settled(self) -> bool:
        total = 0
        for runner in self.runners.values():
            stats = runner.statistics()
            if (
                stats.runners != len(self.runners)
                or stats.shards != stats.shards_assigned
            ):
                return False
            total += stats.shards
        return total == 8

    def owner(self, entity: str) -> tc.Runner:
        for runner in self.runners.values():
            if runner.client(Tally).address_of(entity).shard in runner.served_shards():
                return runner
        raise AssertionError(f"nobody serves {entity}")

    def remote_id(self, sender: tc.Runner) -> str:
        for i in range(1000):
            if self.owner(f"e{i}") is not sender:
                return f"e{i}"
        raise AssertionError("no remote entity")


async def open_cluster(
    stack: AsyncExitStack, ports: list[int], **overrides: Any
) -> Cluster:
    cluster = Cluster(stack, **overrides)
    for port in ports:
        await cluster.start(port)
    await cluster.settled()
    return cluster
