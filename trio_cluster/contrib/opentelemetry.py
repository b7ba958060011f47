"""OpenTelemetry spans of calls: a `trio_cluster.abc.Tracer` (adapter).

Install the extra (``pip install 'trio-cluster[opentelemetry]'``, which
needs only ``opentelemetry-api``), configure OpenTelemetry as usual (an SDK
``TracerProvider`` with your exporter), and give the tracer to each runner::

    from trio_cluster.contrib.opentelemetry import OpenTelemetryTracer

    async with trio_cluster.open_runner(..., tracer=OpenTelemetryTracer()):
        ...

Each call makes a client span on the caller (``"call Account.deposit"``)
and a server span on the owner, its child, joined across runners and
through storage by the W3C trace context (``traceparent``/``tracestate``)
carried in the call metadata. Spans carry the attributes ``rpc.system``
(``"trio_cluster"``), ``rpc.service`` (the entity type), ``rpc.method`` (the
handler) and ``trio_cluster.*`` (entity id, persisted, call kind, runner); a
failed call's span records the error and has an error status.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import TYPE_CHECKING, Final

from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import (
    TraceContextTextMapPropagator,
)

from .._version import __version__

if TYPE_CHECKING:
    from collections.abc import Iterator, Mapping, MutableMapping

    from opentelemetry.trace import Span, TracerProvider
    from opentelemetry.util.types import AttributeValue

    from .._tracing import TracedCall

__all__ = ["OpenTelemetryTracer"]

_CARRIED: Final = ("traceparent", "tracestate")
_MAX_TRACESTATE: Final = 512
"""Longest ``tracestate`` carried (W3C: 32 entries, 512 characters are
what a vendor may rely on); a longer one is left out."""


class OpenTelemetryTracer:
    """A `trio_cluster.abc.Tracer` that makes OpenTelemetry spans.

    Args:
        tracer_provider: where spans go; the global provider
            (``opentelemetry.trace.set_tracer_provider``) by default.
    """

    def __init__(self, *, tracer_provider: TracerProvider | None = None) -> None:
        self._tracer = trace.get_tracer(
            "trio_cluster", __version__, tracer_provider=tracer_provider
        )
        self._propagator = TraceContextTextMapPropagator()

    @contextmanager
    def caller_span(
        self, call: TracedCall, carrier: MutableMapping[str, str]
    ) -> Iterator[_Span]:
        """The client span of a call; writes its context into ``carrier``."""
        with self._tracer.start_as_current_span(
            call.name,
            kind=SpanKind.CLIENT,
            attributes=_attributes(call),
            record_exception=True,
            set_status_on_exception=True,
        ) as span:
            written: dict[str, str] = {}
            self._propagator.inject(written)
            for key in _CARRIED:
                value = written.get(key)
                if value is None or (
                    key == "tracestate" and len(value) > _MAX_TRACESTATE
                ):
                    carrier.pop(key, None)  # not the parent's: it is stale
                else:
                    carrier[key] = value
            yield _Span(span)

    @contextmanager
    def owner_span(
        self, call: TracedCall, carrier: Mapping[str, str]
    ) -> Iterator[_Span]:
        """The server span of a handler run, child of the caller's span."""
        parent = self._propagator.extract(
            {key: carrier[key] for key in _CARRIED if key in carrier}
        )
        with self._tracer.start_as_current_span(
            call.name,
            context=parent,
            kind=SpanKind.SERVER,
            attributes=_attributes(call),
            record_exception=True,
            set_status_on_exception=True,
        ) as span:
            yield _Span(span)


class _Span:
    """A `trio_cluster.abc.TraceSpan` over an OpenTelemetry span."""

    __slots__ = ("_span",)

    def __init__(self, span: Span) -> None:
        self._span = span

    def record_error(self, error: BaseException) -> None:
        self._span.record_exception(error)
        self._span.set_status(
            Status(StatusCode.ERROR, f"{type(error).__name__}: {error}")
        )


def _attributes(call: TracedCall) -> dict[str, AttributeValue]:
    return {
        "rpc.system": "trio_cluster",
        "rpc.service": call.entity_type,
        "rpc.method": call.handler,
        "trio_cluster.entity_type": call.entity_type,
        "trio_cluster.entity_id": call.entity_id,
        "trio_cluster.handler": call.handler,
        "trio_cluster.persisted": call.persisted,
        "trio_cluster.call_kind": call.kind,
        "trio_cluster.runner": call.runner,
    }
