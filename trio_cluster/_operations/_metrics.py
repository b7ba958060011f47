"""Metrics and health endpoints over HTTP (Trio driver).

`serve_metrics` answers three GET paths on a TCP port, for Prometheus and
Kubernetes probes:

* ``/metrics``: Prometheus text format (entities per type, shards, runners,
  mailbox depth, handled messages, persisted traffic, storage claims,
  failovers, and a histogram of call latencies);
* ``/healthz``: 200 while the runner's tasks run (liveness);
* ``/readyz``: 200 once the runner serves every shard assigned to it, 503
  before (readiness).

It is deliberately tiny: one request per connection, a bounded request head,
no keep-alive, GET only.
"""

from __future__ import annotations

import contextlib
import logging
from functools import partial
from typing import TYPE_CHECKING, Final

import trio

if TYPE_CHECKING:
    from .._runner import Runner
    from ._statistics import RunnerStatistics

__all__ = ["render_metrics", "serve_metrics"]

log = logging.getLogger("trio_cluster.metrics")

_MAX_HEAD: Final = 8192
_READ_TIMEOUT: Final = 5.0


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
}
_LATENCY: Final = "trio_cluster_call_latency_seconds"


def render_metrics(stats: RunnerStatistics) -> str:
    """Prometheus text exposition of a statistics snapshot."""
    lines: list[str] = []
    runner = {"runner": stats.address}
    for field, (name, help_text) in _GAUGES.items():
        lines += [f"# HELP {name} {help_text}", f"# TYPE {name} gauge"]
        lines.append(_line(name, getattr(stats, field), runner))
    name = "trio_cluster_entities_by_type"
    lines += [f"# HELP {name} Entities in memory, per type.", f"# TYPE {name} gauge"]
    for entity_type, count in sorted(stats.entities_by_type.items()):
        lines.append(_line(name, count, {**runner, "type": entity_type}))
    for field, (name, help_text) in _COUNTERS.items():
        lines += [f"# HELP {name} {help_text}", f"# TYPE {name} counter"]
        lines.append(_line(name, getattr(stats, field), runner))
    lines += [
        f"# HELP {_LATENCY} Caller-observed rpc latency, per delivery kind.",
        f"# TYPE {_LATENCY} histogram",
    ]
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
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the endpoints until cancelled; ``started`` gets the real port.

    Raises:
        OSError: the port cannot be bound (before ``started``).
    """
    listeners = await trio.open_tcp_listeners(port, host=host)
    task_status.started(listeners[0].socket.getsockname()[1])
    await trio.serve_listeners(partial(_handle, runner), listeners)


async def _handle(runner: Runner, stream: trio.SocketStream) -> None:
    async with stream:
        head = b""
        with trio.move_on_after(_READ_TIMEOUT):
            while b"\r\n\r\n" not in head and len(head) < _MAX_HEAD:
                chunk = await stream.receive_some(_MAX_HEAD)
                if not chunk:
                    break
                head += chunk
        status, body, content_type = _respond(runner, head)
        response = (
            f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        ).encode() + body
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            await stream.send_all(response)


def _respond(runner: Runner, head: bytes) -> tuple[str, bytes, str]:
    text = "text/plain; charset=utf-8"
    request_line = head.split(b"\r\n", 1)[0].decode("latin-1", "replace").split()
    if len(request_line) < 2 or request_line[0] != "GET":
        return "405 Method Not Allowed", b"GET only\n", text
    path = request_line[1].split("?", 1)[0]
    if path == "/metrics":
        body = render_metrics(runner.statistics()).encode()
        return "200 OK", body, "text/plain; version=0.0.4; charset=utf-8"
    if path == "/healthz":
        return "200 OK", b"ok\n", text
    if path == "/readyz":
        stats = runner.statistics()
        if stats.shards_assigned and stats.shards == stats.shards_assigned:
            return "200 OK", b"ready\n", text
        return (
            "503 Service Unavailable",
            f"serving {stats.shards} of {stats.shards_assigned} shards\n".encode(),
            text,
        )
    return "404 Not Found", b"not found\n", text
