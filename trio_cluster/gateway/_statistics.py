"""A gateway's counters, their snapshot, and its ``/metrics`` lines (pure).

`GatewayCounters` is written by the server, its connections and its topic
hub as things happen; `GatewayCounters.snapshot` makes the frozen
`GatewayStatistics` that `GatewayServer.statistics` returns (with the
links' quality counted over the sockets up), and `render_gateway_metrics`
turns a snapshot into Prometheus text (``serve_metrics(...,
extra_metrics=[...])``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final

import attrs

from .. import LatencySnapshot
from .._core._histogram import Histogram
from .._core._link_quality import Quality
from ._protocol import CloseCode, ErrorCode

if TYPE_CHECKING:
    from collections.abc import Iterable

__all__ = [
    "ConnectionStatistics",
    "GatewayCounters",
    "GatewayStatistics",
    "render_gateway_metrics",
]


@attrs.frozen
class GatewayStatistics:
    """A snapshot of a gateway's traffic."""

    connections: int
    """Sockets up now."""
    connections_accepted: int
    """Sockets upgraded since the gateway started."""
    refused_rate_limited: int
    """Upgrades refused with HTTP 429 (connect rate per IP)."""
    refused_unauthorized: int
    """Upgrades refused by the authentication hook (HTTP 401/403)."""
    refused_other: int
    """Connections refused otherwise: over ``max_connections``, a bad
    request or path, no common subprotocol, no upgrade in time."""
    frames_received: int
    frames_sent: int
    requests: int
    """Calls and streams started."""
    requests_refused: int
    """Frames answered with an error before any work (bad frame, unknown
    operation, forbidden, too many requests, ...)."""
    requests_failed: int
    """Requests that ended with an error of their handler."""
    closed: dict[str, int]
    """Sockets the gateway closed, by reason (``rate_limited``,
    ``slow_consumer``, ``heartbeat_timeout``, ``bad_frame``,
    ``message_too_big``, ``going_away``...)."""
    refused: dict[str, int] = attrs.field(factory=dict)
    """Requests refused, by error code (``too_many_requests``,
    ``forbidden``, ``not_found``, ``bad_frame``...)."""
    publications: int = 0
    """Publications this gateway's topic streams brought (each once)."""
    publication_deliveries: int = 0
    """Publications queued to sockets (one per subscribed socket)."""
    dropped: dict[str, int] = attrs.field(factory=dict)
    """Frames meant for a socket that were not sent, by reason:
    ``send_queue_full`` (the frame that found it full: the socket is closed
    4001), ``socket_closed`` (queued for, or sent to, a socket that was
    ending), ``unencodable`` (a publication the socket's subprotocol cannot
    carry)."""
    fanout_latency: LatencySnapshot | None = None
    """Seconds from a publication's acceptance by its topic (the topic's
    runner's wall clock) to its last socket queued here (this runner's)."""
    ping_rtt: LatencySnapshot | None = None
    """Round trips of the pings the sockets answered, in seconds."""
    quality: dict[str, int] = attrs.field(factory=dict)
    """Sockets up now by link quality (``good``, ``fair``, ``poor``,
    ``unknown``: see `ConnectionStatistics.quality`)."""


@attrs.frozen
class ConnectionStatistics:
    """A snapshot of one socket (`ClientConnection.statistics`)."""

    id: str
    """The connection's id, unique in the cluster."""
    remote: str
    """The client's ``host:port``."""
    subprotocol: str
    frames_received: int
    frames_sent: int
    errors: int
    """Requests refused or failed."""
    requests_in_flight: int
    send_queue: int
    """Frames waiting to be written."""
    rtt: float | None
    """Seconds between the last ping and its pong (None: none answered)."""
    rtt_average: float | None = None
    """The moving average of the round trips (the last counts for 1/5)."""
    quality: Quality = "unknown"
    """``good`` (average round trip up to 0.3 s), ``fair`` (up to 1 s),
    ``poor`` (over 1 s), or ``unknown`` (no ping answered yet)."""


_REASONS: Final = {
    CloseCode.HEARTBEAT_TIMEOUT: "heartbeat_timeout",
    CloseCode.SLOW_CONSUMER: "slow_consumer",
    CloseCode.RATE_LIMITED: "rate_limited",
    CloseCode.MESSAGE_TOO_BIG: "message_too_big",
    CloseCode.GOING_AWAY: "going_away",
    CloseCode.UNSUPPORTED_DATA: "bad_frame",
    CloseCode.INVALID_PAYLOAD: "bad_frame",
}


@attrs.define
class GatewayCounters:
    """The running counts behind `GatewayStatistics`."""

    connections: int = 0
    connections_accepted: int = 0
    refused_rate_limited: int = 0
    refused_unauthorized: int = 0
    refused_other: int = 0
    frames_received: int = 0
    frames_sent: int = 0
    requests: int = 0
    requests_refused: int = 0
    requests_failed: int = 0
    closes: dict[str, int] = attrs.field(factory=dict)
    refusals: dict[str, int] = attrs.field(factory=dict)
    publications: int = 0
    publication_deliveries: int = 0
    drops: dict[str, int] = attrs.field(factory=dict)
    fanout: Histogram = attrs.field(factory=Histogram)
    """Seconds from acceptance to fan-out (see `GatewayStatistics`)."""
    rtt: Histogram = attrs.field(factory=Histogram)
    """Ping round trips."""

    def closed(self, code: int) -> None:
        """Count a socket closed by the gateway (or by trio-websocket for
        an oversized message) with ``code``."""
        reason = _REASONS.get(code, "other")  # type: ignore[call-overload]
        self.closes[reason] = self.closes.get(reason, 0) + 1

    def refused(self, code: ErrorCode) -> None:
        """Count a request refused with ``code``."""
        self.requests_refused += 1
        self.refusals[code.value] = self.refusals.get(code.value, 0) + 1

    def dropped(self, reason: str, count: int = 1) -> None:
        """Count frames not sent (see `GatewayStatistics.dropped`)."""
        self.drops[reason] = self.drops.get(reason, 0) + count

    def snapshot(self, qualities: Iterable[Quality] = ()) -> GatewayStatistics:
        """The counters now; ``qualities``: those of the sockets up."""
        by_quality: dict[str, int] = {}
        for quality in qualities:
            by_quality[quality] = by_quality.get(quality, 0) + 1
        return GatewayStatistics(
            connections=self.connections,
            connections_accepted=self.connections_accepted,
            refused_rate_limited=self.refused_rate_limited,
            refused_unauthorized=self.refused_unauthorized,
            refused_other=self.refused_other,
            frames_received=self.frames_received,
            frames_sent=self.frames_sent,
            requests=self.requests,
            requests_refused=self.requests_refused,
            requests_failed=self.requests_failed,
            closed=dict(self.closes),
            refused=dict(self.refusals),
            publications=self.publications,
            publication_deliveries=self.publication_deliveries,
            dropped=dict(self.drops),
            fanout_latency=LatencySnapshot.of(self.fanout),
            ping_rtt=LatencySnapshot.of(self.rtt),
            quality=by_quality,
        )


_COUNTERS: Final = {
    "connections_accepted": "Sockets upgraded.",
    "frames_received": "Frames received from clients.",
    "frames_sent": "Frames sent to clients.",
    "requests": "Calls and streams started.",
    "requests_refused": "Frames answered with an error before any work.",
    "requests_failed": "Requests that ended with a handler error.",
    "publications": "Publications the gateway's topic streams brought.",
    "publication_deliveries": "Publications queued to sockets.",
}


def _labels(labels: dict[str, str]) -> str:
    return ",".join(f'{key}="{value}"' for key, value in sorted(labels.items()))


def _line(name: str, value: int, labels: dict[str, str]) -> str:
    return f"{name}{{{_labels(labels)}}} {value}"


def render_gateway_metrics(stats: GatewayStatistics, labels: dict[str, str]) -> str:
    """Prometheus text for one gateway (``labels``: e.g. its runner)."""
    lines: list[str] = []
    name = "trio_cluster_gateway_connections"
    lines += [f"# HELP {name} Client sockets up now.", f"# TYPE {name} gauge"]
    lines.append(_line(name, stats.connections, labels))
    for field, help_text in _COUNTERS.items():
        name = f"trio_cluster_gateway_{field}_total"
        lines += [f"# HELP {name} {help_text}", f"# TYPE {name} counter"]
        lines.append(_line(name, getattr(stats, field), labels))
    name = "trio_cluster_gateway_refusals_total"
    lines += [
        f"# HELP {name} Connections refused before the upgrade, by reason.",
        f"# TYPE {name} counter",
    ]
    for reason, value in (
        ("rate_limited", stats.refused_rate_limited),
        ("unauthorized", stats.refused_unauthorized),
        ("other", stats.refused_other),
    ):
        lines.append(_line(name, value, {**labels, "reason": reason}))
    name = "trio_cluster_gateway_closed_total"
    lines += [
        f"# HELP {name} Sockets the gateway closed, by reason.",
        f"# TYPE {name} counter",
    ]
    for reason, value in sorted(stats.closed.items()):
        lines.append(_line(name, value, {**labels, "reason": reason}))
    lines += _rate_limited(stats, labels)
    for name, help_text, values, label in (
        (
            "trio_cluster_gateway_requests_refused_by_code_total",
            "Requests refused, by error code.",
            stats.refused,
            "code",
        ),
        (
            "trio_cluster_gateway_dropped_total",
            "Frames meant for a socket that were not sent, by reason.",
            stats.dropped,
            "reason",
        ),
    ):
        lines += [f"# HELP {name} {help_text}", f"# TYPE {name} counter"]
        for key, value in sorted(values.items()):
            lines.append(_line(name, value, {**labels, label: key}))
    name = "trio_cluster_gateway_connections_by_quality"
    lines += [
        f"# HELP {name} Sockets up now, by link quality (ping round trips).",
        f"# TYPE {name} gauge",
    ]
    for quality in ("good", "fair", "poor", "unknown"):
        value = stats.quality.get(quality, 0)
        lines.append(_line(name, value, {**labels, "quality": quality}))
    for name, help_text, snapshot in (
        (
            "trio_cluster_gateway_fanout_latency_seconds",
            "From a publication's acceptance by its topic to its last socket"
            " queued on this gateway.",
            stats.fanout_latency,
        ),
        (
            "trio_cluster_gateway_ping_rtt_seconds",
            "Round trips of the pings the sockets answered.",
            stats.ping_rtt,
        ),
    ):
        lines += _histogram(name, help_text, snapshot, labels)
    return "\n".join(lines) + "\n"


def _rate_limited(stats: GatewayStatistics, labels: dict[str, str]) -> list[str]:
    """Refusals for a rate or a limit, by limit: ``connect`` (HTTP 429),
    ``messages`` (close 4008), ``requests`` (``too_many_requests``)."""
    name = "trio_cluster_gateway_rate_limited_total"
    lines = [
        f"# HELP {name} Refusals for a rate or a limit, by limit.",
        f"# TYPE {name} counter",
    ]
    for limit, value in (
        ("connect", stats.refused_rate_limited),
        ("messages", stats.closed.get("rate_limited", 0)),
        ("requests", stats.refused.get(ErrorCode.TOO_MANY_REQUESTS.value, 0)),
    ):
        lines.append(_line(name, value, {**labels, "limit": limit}))
    return lines


def _histogram(
    name: str,
    help_text: str,
    snapshot: LatencySnapshot | None,
    labels: dict[str, str],
) -> list[str]:
    lines = [f"# HELP {name} {help_text}", f"# TYPE {name} histogram"]
    if snapshot is None:
        return lines
    for bound, count in snapshot.buckets:
        le = "+Inf" if bound == float("inf") else repr(bound)
        lines.append(_line(f"{name}_bucket", count, {**labels, "le": le}))
    lines.append(f"{name}_sum{{{_labels(labels)}}} {snapshot.total}")
    lines.append(_line(f"{name}_count", snapshot.count, labels))
    return lines
