"""Entities that report the call metadata they see, and a tracer that
records its spans (shared by the call metadata and tracing tests)."""

from __future__ import annotations

import contextvars
import itertools
from collections.abc import AsyncIterator, Iterator, Mapping, MutableMapping
from contextlib import asynccontextmanager, contextmanager
from typing import ClassVar

import attrs
import trio

import trio_cluster as tc
from trio_cluster.abc import TracedCall, Tracer
from trio_cluster.storage import MemoryStorage
from trio_cluster.transport import MemoryNetwork, MemoryTransport

from .helpers import config


@attrs.frozen
class Hop:
    path: list[str] = attrs.Factory(list)
    """The ids of the probes to call onward, in order (one per hop)."""


@attrs.frozen
class Seen:
    hops: list[dict[str, str]]
    """The metadata each handler saw, this one first."""
    runners: list[str]


def _here() -> Seen:
    return Seen([dict(tc.current_metadata())], [str(tc.current_runner().address)])


@attrs.define(eq=False, kw_only=True)
class Refused(Exception):
    reason: str


class MetaProbe(tc.Entity):
    type_name = "meta.Probe"
    noted: ClassVar[list[dict[str, str]]] = []
    """What `note` (discarded) saw."""
    held: ClassVar[list[dict[str, str]]] = []
    """What `hold` saw, per run."""

    @tc.rpc
    async def look(self, msg: Hop) -> Seen:
        """Suspends (a call onward, or a checkpoint): the task path."""
        here = _here()
        if not msg.path:
            await trio.lowlevel.checkpoint()
            return here
        probes = tc.current_runner().client(MetaProbe)
        rest: Seen = await probes(msg.path[0]).look(Hop(msg.path[1:]))
        return Seen(here.hops + rest.hops, here.runners + rest.runners)

    @tc.rpc
    async def look_now(self, msg: Hop) -> Seen:
        """Cannot suspend: the one-step fast path."""
        return _here()

    @tc.rpc(persisted=True)
    async def look_persisted(self, msg: Hop) -> Seen:
        here = _here()
        if not msg.path:
            return here
        probes = tc.current_runner().client(MetaProbe)
        rest: Seen = await probes(msg.path[0]).look_persisted(Hop(msg.path[1:]))
        return Seen(here.hops + rest.hops, here.runners + rest.runners)

    @tc.rpc
    async def note(self, msg: Hop) -> None:
        MetaProbe.noted.append(dict(tc.current_metadata()))

    @tc.rpc(persisted=True)
    async def note_persisted(self, msg: Hop) -> None:
        MetaProbe.noted.append(dict(tc.current_metadata()))

    @tc.stream
    async def look_stream(self, msg: Hop) -> AsyncIterator[dict[str, str]]:
        for _ in range(2):
            yield dict(tc.current_metadata())

    @tc.rpc(persisted=True)
    async def hold(self, msg: Hop) -> Seen:
        """Blocks on its first run (for crash tests), answers after."""
        MetaProbe.held.append(dict(tc.current_metadata()))
        if len(MetaProbe.held) == 1:
            await trio.sleep_forever()
        return _here()

    @tc.rpc(errors=[Refused])
    async def refuse(self, msg: Hop) -> None:
        raise Refused(reason="no")

    @tc.rpc
    async def crash(self, msg: Hop) -> None:
        raise KeyError("crashed")


def reset_probes() -> None:
    MetaProbe.noted = []
    MetaProbe.held = []


def trace_id(metadata: Mapping[str, str]) -> str:
    """The trace id of a ``traceparent`` (``00-<trace>-<span>-01``)."""
    return metadata["traceparent"].split("-")[1]


@attrs.define(eq=False)
class RecordedSpan:
    side: str
    """``caller`` or ``owner``."""
    call: TracedCall
    trace: str
    span: str
    parent: str | None
    """The span id of its parent, None for a root."""
    errors: list[BaseException] = attrs.Factory(list)
    ended: bool = False

    def record_error(self, error: BaseException) -> None:
        self.errors.append(error)


@attrs.define(eq=False)
class RecordingTracer:
    """A `trio_cluster.abc.Tracer` that records its spans, with W3C-shaped
    ``traceparent`` values (counters for ids), and the current span in a
    context variable as a real tracer has it."""

    spans: list[RecordedSpan] = attrs.Factory(list)
    _ids: Iterator[int] = attrs.Factory(lambda: itertools.count(1))
    _current: contextvars.ContextVar[RecordedSpan | None] = attrs.Factory(
        lambda: contextvars.ContextVar("recording", default=None)
    )

    def _open(
        self, side: str, call: TracedCall, parent: tuple[str, str] | None
    ) -> RecordedSpan:
        number = next(self._ids)
        trace = parent[0] if parent is not None else f"{number:032x}"
        span = RecordedSpan(
            side, call, trace, f"{number:016x}", None if parent is None else parent[1]
        )
        self.spans.append(span)
        return span

    @contextmanager
    def _entered(self, span: RecordedSpan) -> Iterator[RecordedSpan]:
        token = self._current.set(span)
        try:
            yield span
        except BaseException as exc:
            span.errors.append(exc)
            raise
        finally:
            span.ended = True
            self._current.reset(token)

    @contextmanager
    def caller_span(
        self, call: TracedCall, carrier: MutableMapping[str, str]
    ) -> Iterator[RecordedSpan]:
        current = self._current.get()
        parent = None if current is None else (current.trace, current.span)
        span = self._open("caller", call, parent)
        carrier["traceparent"] = f"00-{span.trace}-{span.span}-01"
        with self._entered(span):
            yield span

    @contextmanager
    def owner_span(
        self, call: TracedCall, carrier: Mapping[str, str]
    ) -> Iterator[RecordedSpan]:
        parent = None
        if "traceparent" in carrier:
            _, trace, span_id, _ = carrier["traceparent"].split("-")
            parent = (trace, span_id)
        span = self._open("owner", call, parent)
        with self._entered(span):
            yield span

    def named(self, side: str, name: str) -> list[RecordedSpan]:
        return [s for s in self.spans if s.side == side and s.call.name == name]


@attrs.define(eq=False)
class ProbeCluster:
    """Runners hosting `MetaProbe` on one memory storage and network."""

    nursery: trio.Nursery
    tracers: dict[int, Tracer | None]
    storage: MemoryStorage = attrs.Factory(MemoryStorage)
    network: MemoryNetwork = attrs.Factory(MemoryNetwork)
    runners: dict[int, tc.Runner] = attrs.Factory(dict)

    async def start(self, port: int) -> tc.Runner:
        runner: tc.Runner = await self.nursery.start(self._serve, port)
        self.runners[port] = runner
        return runner

    async def _serve(
        self, port: int, *, task_status: trio.TaskStatus[tc.Runner]
    ) -> None:
        async with tc.open_runner(
            entities=[MetaProbe],
            config=config(runner_address=tc.RunnerAddress("127.0.0.1", port)),
            storage=self.storage,
            transport=MemoryTransport(self.network),
            tracer=self.tracers.get(port),
        ) as runner:
            task_status.started(runner)
            await trio.sleep_forever()

    async def settled(self) -> None:
        with trio.fail_after(30):
            while not self._settled():  # noqa: ASYNC110
                await trio.sleep(0.01)

    def _settled(self) -> bool:
        live = list(self.runners.values())
        total = 0
        for runner in live:
            stats = runner.statistics()
            if stats.runners != len(live) or stats.shards != stats.shards_assigned:
                return False
            total += stats.shards
        return total == 8

    def owner(self, entity: str) -> tc.Runner:
        for runner in self.runners.values():
            shard = runner.client(MetaProbe).address_of(entity).shard
            if shard in runner.served_shards():
                return runner
        raise AssertionError(f"nobody serves {entity}")

    def ids_on(self, runner: tc.Runner, count: int = 1) -> list[str]:
        """``count`` probe ids ``runner`` serves."""
        found = [f"p{i}" for i in range(1000) if self.owner(f"p{i}") is runner]
        assert len(found) >= count
        return found[:count]


@asynccontextmanager
async def open_probe_cluster(
    ports: list[int], tracers: Mapping[int, Tracer | None] = {}
) -> AsyncIterator[ProbeCluster]:
    reset_probes()
    async with trio.open_nursery() as nursery:
        cluster = ProbeCluster(nursery, dict(tracers))
        for port in ports:
            await cluster.start(port)
        await cluster.settled()
        yield cluster
        nursery.cancel_scope.cancel()
