"""`OpenTelemetryTracer`: OpenTelemetry spans of calls, joined across
runners (the SDK's in-memory exporter; memory storage and network, virtual
time). Skipped only when OpenTelemetry is not installed (the ``test`` extra
installs it)."""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import pytest
import trio

pytest.importorskip("opentelemetry.sdk.trace")

from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import (
    InMemorySpanExporter,
)
from opentelemetry.trace import SpanKind, StatusCode
from trio.testing import MockClock

import trio_cluster as tc
from trio_cluster.contrib.opentelemetry import OpenTelemetryTracer

from ..helpers import config
from ..metadata_helpers import Hop, MetaProbe, Refused, open_probe_cluster, trace_id

PORTS = [7301, 7302]


@pytest.fixture
def exporter() -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    yield exporter
    exporter.shutdown()


@pytest.fixture
def provider(exporter: InMemorySpanExporter) -> Iterator[TracerProvider]:
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    yield provider
    provider.shutdown()


def by_start(exporter: InMemorySpanExporter) -> list[ReadableSpan]:
    return sorted(exporter.get_finished_spans(), key=lambda s: s.start_time or 0)


def ids(span: ReadableSpan) -> tuple[int, int, int | None]:
    assert span.context is not None
    return (
        span.context.trace_id,
        span.context.span_id,
        None if span.parent is None else span.parent.span_id,
    )


async def test_a_call_across_runners_is_one_trace_of_client_and_server_spans(
    autojump_clock: MockClock, provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    tracer = OpenTelemetryTracer(tracer_provider=provider)
    app = provider.get_tracer("app")
    async with open_probe_cluster(PORTS, dict.fromkeys(PORTS, tracer)) as cluster:
        a, b = (cluster.runners[port] for port in PORTS)
        [on_a] = cluster.ids_on(a)
        [on_b] = cluster.ids_on(b)
        with app.start_as_current_span("request"), tc.with_metadata(tenant="acme"):
            seen = await a.client(MetaProbe)(on_b).look(Hop([on_a]))
    request, *spans = by_start(exporter)
    assert request.name == "request"
    assert [(s.name, s.kind) for s in spans] == [
        ("call meta.Probe.look", SpanKind.CLIENT),
        ("call meta.Probe.look", SpanKind.SERVER),
        ("call meta.Probe.look", SpanKind.CLIENT),
        ("call meta.Probe.look", SpanKind.SERVER),
    ]
    # One trace: the application's span, then each span a child of the
    # one before it, across both runners.
    chain = [request, *spans]
    for parent, child in itertools.pairwise(chain):
        assert ids(child)[0] == ids(parent)[0]
        assert ids(child)[2] == ids(parent)[1]
    client = spans[0]
    assert client.attributes is not None
    assert dict(client.attributes) == {
        "rpc.system": "trio_cluster",
        "rpc.service": "meta.Probe",
        "rpc.method": "look",
        "trio_cluster.entity_type": "meta.Probe",
        "trio_cluster.entity_id": on_b,
        "trio_cluster.handler": "look",
        "trio_cluster.persisted": False,
        "trio_cluster.call_kind": "call",
        "trio_cluster.runner": str(a.address),
    }
    assert spans[1].attributes is not None
    assert spans[1].attributes["trio_cluster.runner"] == str(b.address)
    # The handlers saw the W3C trace context beside the caller's metadata.
    assert [hop["tenant"] for hop in seen.hops] == ["acme", "acme"]
    assert {int(trace_id(hop), 16) for hop in seen.hops} == {ids(request)[0]}


async def test_failed_calls_have_error_spans(
    autojump_clock: MockClock, provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    tracer = OpenTelemetryTracer(tracer_provider=provider)
    async with tc.open_runner(
        entities=[MetaProbe], config=config(), tracer=tracer
    ) as runner:
        with pytest.raises(Refused):
            await runner.client(MetaProbe)("a").refuse(Hop())
        with pytest.raises(tc.RemoteError):
            await runner.client(MetaProbe)("b").crash(Hop())
    spans = by_start(exporter)
    assert [(s.name, s.kind) for s in spans] == [
        ("call meta.Probe.refuse", SpanKind.CLIENT),
        ("call meta.Probe.refuse", SpanKind.SERVER),
        ("call meta.Probe.crash", SpanKind.CLIENT),
        ("call meta.Probe.crash", SpanKind.SERVER),
    ]
    for span in spans:
        assert span.status.status_code is StatusCode.ERROR
        [event] = [e for e in span.events if e.name == "exception"]
        assert event.attributes is not None
        assert event.attributes["exception.type"] in {
            "tests.metadata_helpers.Refused",
            "trio_cluster.RemoteError",
            "Refused",
            "RemoteError",
        }


async def test_persisted_calls_and_streams_are_traced(
    autojump_clock: MockClock, provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    tracer = OpenTelemetryTracer(tracer_provider=provider)
    async with tc.open_runner(
        entities=[MetaProbe], config=config(), tracer=tracer
    ) as runner:
        probe = runner.client(MetaProbe)
        await probe("a").look_persisted(Hop(["b"]))
        async with probe("a").look_stream(Hop()) as items:
            assert len([item async for item in items]) == 2
        await trio.testing.wait_all_tasks_blocked()
    spans = by_start(exporter)
    assert [(s.name, s.kind) for s in spans] == [
        ("call meta.Probe.look_persisted", SpanKind.CLIENT),
        ("call meta.Probe.look_persisted", SpanKind.SERVER),
        ("call meta.Probe.look_persisted", SpanKind.CLIENT),
        ("call meta.Probe.look_persisted", SpanKind.SERVER),
        ("stream meta.Probe.look_stream", SpanKind.CLIENT),
        ("stream meta.Probe.look_stream", SpanKind.SERVER),
    ]
    assert len({ids(span)[0] for span in spans[:4]}) == 1
    assert spans[0].attributes is not None
    assert spans[0].attributes["trio_cluster.persisted"] is True
    assert ids(spans[5])[2] == ids(spans[4])[1]
    assert all(s.status.status_code is StatusCode.UNSET for s in spans)
