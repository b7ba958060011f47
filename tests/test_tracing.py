"""The tracer hook: a span per call on each side, joined by the trace context
carried in the call metadata, across runners, through storage and after a
redelivery (a recording tracer; memory storage and network, virtual time)."""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Mapping, MutableMapping
from contextlib import contextmanager

import pytest
import trio
from trio.testing import MockClock

import trio_cluster as tc
from trio_cluster.abc import TracedCall

from .helpers import config
from .metadata_helpers import (
    Hop,
    MetaProbe,
    RecordedSpan,
    RecordingTracer,
    Refused,
    open_probe_cluster,
    trace_id,
)

PORTS = [7201, 7202, 7203]
LOOK = "call meta.Probe.look"


def tracers(count: int = 3) -> dict[int, RecordingTracer | None]:
    return {port: RecordingTracer() for port in PORTS[:count]}


def only(spans: list[RecordedSpan]) -> RecordedSpan:
    assert len(spans) == 1, spans
    return spans[0]


async def test_a_call_makes_a_client_and_a_server_span_joined_across_runners(
    autojump_clock: MockClock,
) -> None:
    chosen = tracers(2)
    async with open_probe_cluster(PORTS[:2], chosen) as cluster:
        a, b = (cluster.runners[port] for port in PORTS[:2])
        [on_b] = cluster.ids_on(b)
        with tc.with_metadata(tenant="acme"):
            seen = await a.client(MetaProbe)(on_b).look(Hop())
    a_tracer, b_tracer = chosen[PORTS[0]], chosen[PORTS[1]]
    assert a_tracer is not None
    assert b_tracer is not None
    caller = only(a_tracer.spans)
    owner = only(b_tracer.spans)
    assert caller.side == "caller"
    assert caller.call == TracedCall(
        kind="call",
        entity_type="meta.Probe",
        entity_id=on_b,
        handler="look",
        persisted=False,
        runner=str(a.address),
    )
    assert caller.call.name == LOOK
    assert owner.side == "owner"
    assert owner.call.runner == str(b.address)
    assert (owner.trace, owner.parent) == (caller.trace, caller.span)
    assert caller.ended
    assert owner.ended
    assert not caller.errors
    assert not owner.errors
    # The handler sees the trace context beside the caller's metadata.
    [metadata] = seen.hops
    assert metadata["tenant"] == "acme"
    assert trace_id(metadata) == caller.trace


async def test_nested_hops_make_one_trace(autojump_clock: MockClock) -> None:
    shared = RecordingTracer()
    async with open_probe_cluster(PORTS, dict.fromkeys(PORTS, shared)) as cluster:
        a, b, c = (cluster.runners[port] for port in PORTS)
        [on_b] = cluster.ids_on(b)
        [on_c] = cluster.ids_on(c)
        await a.client(MetaProbe)(on_b).look(Hop([on_c]))
    spans = shared.spans
    assert [(s.side, s.call.runner) for s in spans] == [
        ("caller", str(a.address)),
        ("owner", str(b.address)),
        ("caller", str(b.address)),
        ("owner", str(c.address)),
    ]
    assert len({s.trace for s in spans}) == 1
    assert spans[0].parent is None
    # Each span is the child of the one before it.
    for parent, child in itertools.pairwise(spans):
        assert child.parent == parent.span


async def test_local_calls_streams_and_discards_are_traced(
    autojump_clock: MockClock,
) -> None:
    tracer = RecordingTracer()
    async with tc.open_runner(
        entities=[MetaProbe], config=config(), tracer=tracer
    ) as runner:
        probe = runner.client(MetaProbe)
        await probe("a").look_now(Hop())
        await probe("a").look(Hop())
        async with probe("a").look_stream(Hop()) as items:
            assert len([item async for item in items]) == 2
        await probe("a").note.discard(Hop())
        # A discarded message runs later, in a task of its own.
        await trio.testing.wait_all_tasks_blocked()
        await probe("a").look_persisted(Hop())
        await trio.testing.wait_all_tasks_blocked()
    names = [(s.side, s.call.name) for s in tracer.spans]
    assert names == [
        ("caller", "call meta.Probe.look_now"),
        ("owner", "call meta.Probe.look_now"),
        ("caller", LOOK),
        ("owner", LOOK),
        ("caller", "stream meta.Probe.look_stream"),
        ("owner", "stream meta.Probe.look_stream"),
        ("caller", "discard meta.Probe.note"),
        ("owner", "call meta.Probe.note"),
        ("caller", "call meta.Probe.look_persisted"),
        ("owner", "call meta.Probe.look_persisted"),
    ]
    for caller, owner in zip(tracer.spans[::2], tracer.spans[1::2], strict=True):
        assert (owner.trace, owner.parent) == (caller.trace, caller.span)
        assert caller.ended
        assert owner.ended
    assert tracer.spans[-1].call.persisted


async def test_errors_are_recorded_on_both_sides(autojump_clock: MockClock) -> None:
    tracer = RecordingTracer()
    async with tc.open_runner(
        entities=[MetaProbe], config=config(), tracer=tracer
    ) as runner:
        with pytest.raises(Refused):
            await runner.client(MetaProbe)("a").refuse(Hop())
        with pytest.raises(tc.RemoteError):
            await runner.client(MetaProbe)("b").crash(Hop())
    refused_caller, refused_owner, crash_caller, crash_owner = tracer.spans
    assert [type(e) for e in refused_caller.errors] == [Refused]
    assert [type(e) for e in refused_owner.errors] == [Refused]
    assert [type(e) for e in crash_caller.errors] == [tc.RemoteError]
    [crashed] = crash_owner.errors
    assert isinstance(crashed, tc.RemoteError)
    assert crashed.type_name == "KeyError"


async def test_a_redelivered_request_is_traced_under_its_callers_span(
    autojump_clock: MockClock,
) -> None:
    chosen = tracers(2)
    async with open_probe_cluster(PORTS[:2], chosen) as cluster:
        a, b = (cluster.runners[port] for port in PORTS[:2])
        [on_b] = cluster.ids_on(b)
        result: list[object] = []

        async def call() -> None:
            result.append(await a.client(MetaProbe)(on_b).hold(Hop()))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(call)
            with trio.fail_after(5):
                while not MetaProbe.held:  # noqa: ASYNC110
                    await trio.sleep(0.01)
            b.abort()
            del cluster.runners[PORTS[1]]
            cluster.storage.kill_session(str(b.address))
            cluster.network.kill(b.address)
            with trio.fail_after(60):
                while not result:  # noqa: ASYNC110
                    await trio.sleep(0.1)
    a_tracer, b_tracer = chosen[PORTS[0]], chosen[PORTS[1]]
    assert a_tracer is not None
    assert b_tracer is not None
    caller, redelivered = a_tracer.spans
    [first] = b_tracer.spans
    assert caller.side == "caller"
    assert caller.call.persisted
    # Both runs (the one cut by the crash, and the one after the failover
    # on the other runner) are children of the caller's span.
    for run in (first, redelivered):
        assert run.side == "owner"
        assert (run.trace, run.parent) == (caller.trace, caller.span)
    assert redelivered.call.runner == str(a.address)
    assert [trace_id(held) for held in MetaProbe.held] == [caller.trace] * 2


class _Chatty:
    """A tracer that writes what cannot travel."""

    @contextmanager
    def caller_span(
        self, call: TracedCall, carrier: MutableMapping[str, str]
    ) -> Iterator[RecordedSpan]:
        carrier["tracestate"] = "x" * 5000
        yield RecordedSpan("caller", call, "t", "s", None)

    @contextmanager
    def owner_span(
        self, call: TracedCall, carrier: Mapping[str, str]
    ) -> Iterator[RecordedSpan]:
        yield RecordedSpan("owner", call, "t", "s", None)


async def test_a_tracer_writing_what_cannot_travel_fails_the_call(
    autojump_clock: MockClock,
) -> None:
    async with tc.open_runner(
        entities=[MetaProbe], config=config(), tracer=_Chatty()
    ) as runner:
        with pytest.raises(tc.InvalidMetadataError, match="the tracer wrote"):
            await runner.client(MetaProbe)("a").look(Hop())
