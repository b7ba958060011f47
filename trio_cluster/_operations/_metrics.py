"""Metrics and health endpoints over HTTP (Trio driver).

`serve_metrics` answers three GET paths on a TCP port, for Prometheus and
Kubernetes probes:

* ``/metrics``: Prometheus text format (entities per type, shards, runners,
  mailbox depth, handled messages, persisted traffic, storage claims,
  failovers, a histogram of call latencies, the transport's traffic and
  refused peers, and the event bus's lag per subscription and partition,
  read from storage at each scrape);
* ``/healthz``: 200 while the runner's tasks run (liveness);
* ``/readyz``: 200 while the runner is ready (its storage session and
  transport are up and it serves every shard assigned to it; a client-only
  runner has none to wait for), 503 otherwise (readiness).

It is deliberately tiny: one request per connection, a bounded request head,
no keep-alive, GET only. A malformed request is answered 400, an oversized
head 431, an incomplete one 408 once the request timeout is over.
"""

from __future__ import annotations

import inspect
import logging
from functools import partial
from typing import TYPE_CHECKING, Final, TypeAlias

import trio

from .._errors import EventsUnsupportedError, PersistenceError

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Sequence

    from .._runner import Runner
    from ._statistics import RunnerStatistics

__all__ = ["ExtraMetrics", "render_metrics", "serve_metrics"]

log = logging.getLogger("trio_cluster.metrics")

MAX_HEAD: Final = 8192
"""Bytes of a request head read at most; a longer one is answered 431."""
ExtraMetrics: TypeAlias = "Callable[[], str] | Callable[[], Awaitable[str]]"
"""What ``serve_metrics(extra_metrics=...)`` takes: renders more metrics,
synchronously or not."""

REQUEST_TIMEOUT: Final = 5.0
"""Seconds `serve_metrics` waits for a request, and then for the client to
take its answer, by default."""


def _line(name: str, value: float, labels: dict[str, str] | None = None) -> str:
    if labels:
        inner = ",".join(
            f'{key}="{_escape(label)}"' for key, label in sorted(labels.items())
        )
        return f"{name}{{{inner}}} {value}"
    return f"{name} {value}"


def _escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


_GAUGES: Final = {
    "shards": ("trio_cluster_shards", "Shards served by this runner."),
    "shards_assigned": (
        "trio_cluster_shards_assigned",
        "Shards assigned to this runner.",
    ),
    "runners": (
        "trio_cluster_runners",
        "Live runners in the cluster, as this runner sees it.",
    ),
    "entities": ("trio_cluster_entities", "Entities in memory."),
    "idle_entities": (
        "trio_cluster_idle_entities",
        "Entities in memory with nothing to do.",
    ),
    "running_handlers": ("trio_cluster_running_handlers", "Handlers running now."),
    "queued_messages": (
        "trio_cluster_queued_messages",
        "Messages waiting in mailboxes.",
    ),
    "max_mailbox_depth": (
        "trio_cluster_max_mailbox_depth",
        "Deepest mailbox (running and queued).",
    ),
    "persisted_in_flight": (
        "trio_cluster_persisted_in_flight",
        "Persisted requests held in memory.",
    ),
    "waiting_callers": (
        "trio_cluster_waiting_callers",
        "Callers waiting for persisted replies.",
    ),
    "singletons_running": (
        "trio_cluster_singletons_running",
        "Singletons running on this runner.",
    ),
    "runners_healthy": (
        "trio_cluster_runners_healthy",
        "Live runners this runner can reach now, itself included.",
    ),
}
_COUNTERS: Final = {
    "messages_handled": ("trio_cluster_messages_handled_total", "Handlers completed."),
    "entity_crashes": (
        "trio_cluster_entity_crashes_total",
        "Entity restarts after a crash.",
    ),
    "persisted_delivered": (
        "trio_cluster_persisted_delivered_total",
        "Persisted requests delivered.",
    ),
    "storage_claims": (
        "trio_cluster_storage_claims_total",
        "Claim statements to storage.",
    ),
    "save_batches": (
        "trio_cluster_save_batches_total",
        "Group-commit batches of saved requests.",
    ),
    "reply_batches": (
        "trio_cluster_reply_batches_total",
        "Group-commit batches of replies.",
    ),
    "failovers": (
        "trio_cluster_failovers_total",
        "Shards lost without a graceful release.",
    ),
    "remote_calls": (
        "trio_cluster_remote_calls_total",
        "Volatile calls sent to other runners.",
    ),
    "redeliveries": (
        "trio_cluster_redeliveries_total",
        "Persisted requests delivered again after an unfinished delivery.",
    ),
    "persisted_retries": (
        "trio_cluster_persisted_retries_total",
        "Persisted requests given back for a later attempt after a failure.",
    ),
}
_DEAD_LETTERS: Final = "trio_cluster_dead_letters_total"
_ERRORS: Final = "trio_cluster_errors_total"
_LATENCY: Final = "trio_cluster_call_latency_seconds"

_TRANSPORT: Final = {
    "frames_sent": "Frames written to other runners.",
    "envelopes_sent": "Envelopes written to other runners.",
    "bytes_sent": "Bytes of frames written to other runners.",
    "frames_received": "Frames read from other runners.",
    "envelopes_received": "Envelopes read from other runners.",
    "envelopes_dropped": "Queued envelopes dropped with a lost connection.",
    "connects": "Connections to other runners established.",
    "connect_failures": "Connection attempts to other runners that failed.",
    "bad_peers": "Connections closed because the peer sent bad input.",
    "connections_refused": "Accepted connections closed at once, over the limits.",
    "unauthenticated_peers": (
        "Connections refused because the peer did not prove the cluster secret."
    ),
}
"""Counters of the transport endpoint, exported as
``trio_cluster_transport_<field>_total`` (when the transport keeps them)."""


def _header(name: str, help_text: str, kind: str) -> list[str]:
    """The ``# HELP`` and ``# TYPE`` lines that open a metric family."""
    return [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]


def render_metrics(stats: RunnerStatistics) -> str:
    """Prometheus text exposition of a statistics snapshot: each family's
    ``# HELP`` and ``# TYPE`` lines, then its samples."""
    lines: list[str] = []
    runner = {"runner": stats.address}
    for field, (name, help_text) in _GAUGES.items():
        lines += _header(name, help_text, "gauge")
        lines.append(_line(name, getattr(stats, field), runner))
    name = "trio_cluster_entities_by_type"
    lines += _header(name, "Entities in memory, per type.", "gauge")
    for entity_type, count in sorted(stats.entities_by_type.items()):
        lines.append(_line(name, count, {**runner, "type": entity_type}))
    for field, (name, help_text) in _COUNTERS.items():
        lines += _header(name, help_text, "counter")
        lines.append(_line(name, getattr(stats, field), runner))
    lines += _header(
        _DEAD_LETTERS, "Persisted requests dead-lettered here, by kind.", "counter"
    )
    for kind, count in sorted(stats.dead_letters.items()):
        lines.append(_line(_DEAD_LETTERS, count, {**runner, "kind": kind}))
    lines += _header(
        _ERRORS, "Errors raised to callers on this runner, by type.", "counter"
    )
    for error_type, count in sorted(stats.errors_by_type.items()):
        lines.append(_line(_ERRORS, count, {**runner, "type": error_type}))
    transport = stats.transport
    if transport is not None:
        name = "trio_cluster_transport_connections"
        lines += _header(name, "Connections to other runners up now.", "gauge")
        lines.append(_line(name, transport.connections, runner))
        for field, help_text in _TRANSPORT.items():
            name = f"trio_cluster_transport_{field}_total"
            lines += _header(name, help_text, "counter")
            lines.append(_line(name, getattr(transport, field), runner))
    lines += _header(
        _LATENCY, "Caller-observed rpc latency, per delivery kind.", "histogram"
    )
    for kind, snapshot in sorted(stats.call_latency.items()):
        labels = {**runner, "kind": kind}
        for bound, count in snapshot.buckets:
            le = "+Inf" if bound == float("inf") else repr(bound)
            lines.append(_line(f"{_LATENCY}_bucket", count, {**labels, "le": le}))
        lines.append(_line(f"{_LATENCY}_sum", snapshot.total, labels))
        lines.append(_line(f"{_LATENCY}_count", snapshot.count, labels))
    return "\n".join(lines) + "\n"


async def serve_metrics(
    runner: Runner,
    host: str,
    port: int,
    *,
    request_timeout: float = REQUEST_TIMEOUT,
    extra_metrics: Sequence[ExtraMetrics] = (),
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the endpoints until cancelled; ``started`` gets the real port.

    ``extra_metrics`` render more metrics (Prometheus text, e.g.
    ``WebhookClient.metrics_text``), appended to ``/metrics`` in order. An
    async one (e.g. ``workflow_metrics(runner).render``, which reads
    storage) is awaited at each scrape for at most `LAG_TIMEOUT` seconds;
    if it takes longer or raises `PersistenceError`, its text is left out of
    that scrape (and logged).

    Each connection is on its own: whatever goes wrong with one (a reset, a
    malformed or oversized request, a client that says nothing or never
    reads the answer) ends that connection only, logged at debug or info
    level, and never the server. Reading the request and sending the answer
    are each bounded by ``request_timeout`` seconds.

    Raises:
        OSError: the port cannot be bound (before ``started``).

    Cancellation: stops listening and closes every open connection.
    """
    listeners = await trio.open_tcp_listeners(port, host=host)
    task_status.started(listeners[0].socket.getsockname()[1])
    await trio.serve_listeners(
        partial(_handle, runner, request_timeout, tuple(extra_metrics)), listeners
    )


_CONNECTION_ERRORS: Final = (
    trio.BrokenResourceError,
    trio.ClosedResourceError,
    OSError,
)
"""What a connection raises because of the network or the client."""


async def _handle(
    runner: Runner,
    request_timeout: float,
    extra: Sequence[ExtraMetrics],
    stream: trio.SocketStream,
) -> None:
    """Answer one request on ``stream``; every failure of this connection
    is contained here (trio.Cancelled is not: it propagates)."""
    client = _client_name(stream)
    try:
        async with stream:
            await _exchange(runner, request_timeout, stream, client, extra)
    except _CONNECTION_ERRORS as exc:
        log.debug("metrics connection from %s failed: %r", client, exc)


async def _exchange(
    runner: Runner,
    request_timeout: float,
    stream: trio.SocketStream,
    client: str,
    extra: Sequence[ExtraMetrics] = (),
) -> None:
    head = bytearray()
    with trio.move_on_after(request_timeout) as reading:
        await _read_head(stream, head)
    if not head:  # a TCP probe, or a client that said nothing in time
        log.debug("metrics connection from %s sent no request", client)
        return
    status, body, content_type = await _answer(
        runner, bytes(head), timed_out=reading.cancelled_caught, extra=extra
    )
    if not status.startswith(("200", "503")):
        log.info("metrics request from %s: %s", client, status)
    response = (
        f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode() + body
    with trio.move_on_after(request_timeout) as writing:
        await stream.send_all(response)
    if writing.cancelled_caught:
        log.debug("metrics client %s did not read its answer in time", client)


async def _read_head(stream: trio.SocketStream, head: bytearray) -> None:
    """Read the request head into ``head``: up to its blank line, the end of
    the stream, or one byte past `MAX_HEAD` (never more than that is read).
    On cancellation ``head`` keeps what was read."""
    while b"\r\n\r\n" not in head and len(head) <= MAX_HEAD:
        chunk = await stream.receive_some(MAX_HEAD + 1 - len(head))
        if not chunk:
            break
        head += chunk


LAG_TIMEOUT: Final = 2.0
"""Seconds a scrape waits for the event bus's positions before leaving them out."""
_LAG = "trio_cluster_subscription_lag"
_SKIPPED = "trio_cluster_subscription_skipped_total"


async def _subscription_lag(runner: Runner) -> str:
    """The event bus's lag and skipped events per subscription and partition,
    read from storage (the whole cluster's: the same on every runner); empty
    without an event log, or if storage does not answer in `LAG_TIMEOUT`."""
    try:
        events = runner.event_storage
    except EventsUnsupportedError:
        return ""
    positions = None
    with trio.move_on_after(LAG_TIMEOUT):
        try:
            positions = await events.all_positions()
        except PersistenceError as exc:
            log.info("metrics: no subscription lag: %r", exc)
    if positions is None:
        return ""
    lines = _header(
        _LAG,
        "Events published and not yet consumed, per subscription and partition"
        " (cluster-wide: every runner reports the same).",
        "gauge",
    )
    skipped = _header(
        _SKIPPED,
        "Events a subscription gave up on (its handler kept failing).",
        "counter",
    )
    for p in positions:
        labels = {
            "subscription": p.subscription,
            "topic": p.topic,
            "partition": str(p.partition),
        }
        lines.append(_line(_LAG, p.lag, labels))
        skipped.append(_line(_SKIPPED, p.skipped, labels))
    return "\n".join(lines + skipped) + "\n"


def _client_name(stream: trio.SocketStream) -> str:
    try:
        host, port, *_ = stream.socket.getpeername()
    except OSError:
        return "an unknown client"
    return f"{host}:{port}"


_TEXT: Final = "text/plain; charset=utf-8"


async def _answer(
    runner: Runner,
    head: bytes,
    *,
    timed_out: bool,
    extra: Sequence[ExtraMetrics] = (),
) -> tuple[str, bytes, str]:
    """Status line, body and content type for a request ``head``."""
    if b"\r\n\r\n" not in head:
        if len(head) > MAX_HEAD:
            return "431 Request Header Fields Too Large", b"request too large\n", _TEXT
        if timed_out:
            return "408 Request Timeout", b"request incomplete\n", _TEXT
    request_line = head.split(b"\r\n", 1)[0].decode("latin-1").split()
    if not _is_request_line(request_line):
        return "400 Bad Request", b"malformed request line\n", _TEXT
    if request_line[0] != "GET":
        return "405 Method Not Allowed", b"GET only\n", _TEXT
    try:
        path = request_line[1].split("?", 1)[0]
        texts: list[str] = []
        if path == "/metrics":
            texts.append(await _subscription_lag(runner))
            texts += [await _render_extra(render) for render in extra]
        return _respond(runner, path, texts)
    except Exception:  # a bug: answer 500 rather than end the server
        log.exception("metrics: cannot answer %s", request_line[1])
        return "500 Internal Server Error", b"internal error\n", _TEXT


def _is_request_line(words: list[str]) -> bool:
    """``METHOD /path [HTTP/x.y]``, the method a token of letters."""
    if len(words) not in (2, 3) or not words[1].startswith("/"):
        return False
    if len(words) == 3 and not words[2].startswith("HTTP/"):
        return False
    return words[0].isascii() and words[0].isalpha()


async def _render_extra(render: ExtraMetrics) -> str:
    """The text of one extra renderer ("" if an async one failed or took
    longer than `LAG_TIMEOUT`)."""
    result = render()
    if not inspect.isawaitable(result):
        await trio.lowlevel.checkpoint()
        return result
    text = None
    with trio.move_on_after(LAG_TIMEOUT):
        try:
            text = await result
        except PersistenceError as exc:
            log.info("metrics: %r left out: %r", render, exc)
            return ""
    if text is None:
        log.info("metrics: %r left out: no answer in %s s", render, LAG_TIMEOUT)
        return ""
    return text


def _respond(
    runner: Runner, path: str, texts: Sequence[str] = ()
) -> tuple[str, bytes, str]:
    if path == "/metrics":
        text = render_metrics(runner.statistics())
        body = "".join([text, *texts]).encode()
        return "200 OK", body, "text/plain; version=0.0.4; charset=utf-8"
    if path == "/healthz":
        return "200 OK", b"ok\n", _TEXT
    if path == "/readyz":
        stats = runner.statistics()
        if stats.ready:
            return "200 OK", b"ready\n", _TEXT
        return (
            "503 Service Unavailable",
            f"{stats.not_ready_reason}\n".encode(),
            _TEXT,
        )
    return "404 Not Found", b"not found\n", _TEXT
