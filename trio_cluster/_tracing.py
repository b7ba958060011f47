"""The tracer hook: a span per call on each side (interface).

A `Tracer` given to ``open_runner(tracer=...)`` is asked for two spans per
call:

* on the caller's side, `Tracer.caller_span` around the whole call (routing,
  retries, the wait for the reply; a stream's span lasts as long as its
  block). It writes the trace context into the call's *carrier*, the call
  metadata about to be sent (``traceparent``/``tracestate``, W3C trace
  context; see `trio_cluster.with_metadata`);
* on the owner's side, `Tracer.owner_span` around the handler's execution,
  its parent read from the carrier the call arrived with. For a persisted
  request that is when the claimed request runs, maybe after a failover on
  another runner: the carrier was stored with it.

The caller's span is entered in the caller's task, the owner's in the
handler's context, so calls the handler makes are children of its span.
An exception leaving a span's block is the span's to record; a handler's
failure, which the runtime turns into the caller's error, is given to
`TraceSpan.record_error` first.

With no tracer configured, each call site pays one ``is None`` check.
`trio_cluster.contrib.opentelemetry.OpenTelemetryTracer` is the ready
adapter.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal, Protocol

import attrs

if TYPE_CHECKING:
    from collections.abc import Mapping, MutableMapping
    from contextlib import AbstractContextManager

__all__ = ["TraceSpan", "TracedCall", "Tracer"]


@attrs.frozen
class TracedCall:
    """What a span is about: one call of one handler."""

    kind: Literal["call", "discard", "stream"]
    """How it is made: a call waiting for its reply, a discard (no reply
    awaited) or a stream."""
    entity_type: str
    entity_id: str
    handler: str
    """The handler's wire name."""
    persisted: bool
    """Delivered through storage (``@rpc(persisted=True)``)."""
    runner: str
    """The runner the span is made on (the caller's, or the owner's)."""

    @property
    def name(self) -> str:
        """The span's name: ``"call Account.deposit"``."""
        return f"{self.kind} {self.entity_type}.{self.handler}"


class TraceSpan(Protocol):
    """A span a `Tracer` opened."""

    def record_error(self, error: BaseException) -> None:
        """Record that the call failed with ``error`` (the handler raised,
        or the runtime stopped it). May be called once per span."""


class Tracer(Protocol):
    """Makes the spans of calls; see the module docstring.

    Both methods are called in the runner's own tasks and handlers: they
    must not block, and should not raise (an exception fails the call).
    """

    def caller_span(
        self, call: TracedCall, carrier: MutableMapping[str, str]
    ) -> AbstractContextManager[TraceSpan]:
        """A span around a call on the caller's side (kind client). Entering
        it writes the trace context into ``carrier``, the metadata the call
        will carry: only the keys ``traceparent`` and ``tracestate``."""
        ...

    def owner_span(
        self, call: TracedCall, carrier: Mapping[str, str]
    ) -> AbstractContextManager[TraceSpan]:
        """A span around the handler's execution on the owner (kind
        server), its parent read from ``carrier``, the metadata the call
        arrived with (a new trace if it holds none)."""
        ...
