"""A gateway's counters, their snapshot, and its ``/metrics`` lines (pure).

`GatewayCounters` is written by the server and its connections as things
happen; `GatewayCounters.snapshot` makes the frozen `GatewayStatistics`
that `GatewayServer.statistics` returns, and `render_gateway_metrics` turns
a snapshot into Prometheus text (``serve_metrics(..., extra_metrics=[...])``).
"""

from __future__ import annotations

from typing import Final

import attrs

from ._protocol import CloseCode

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
    publications_received: int = 0
    """Publications that reached this gateway from the topics it follows:
    one per followed topic per publication, whatever the number of its
    subscribers here (the envelopes of a fan-out)."""


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
    publications_received: int = 0

    def closed(self, code: int) -> None:
        """Count a socket closed by the gateway (or by trio-websocket for
        an oversized message) with ``code``."""
        reason = _REASONS.get(code, "other")  # type: ignore[call-overload]
        self.closes[reason] = self.closes.get(reason, 0) + 1

    def snapshot(self) -> GatewayStatistics:
        fields = attrs.asdict(self, recurse=False)
        fields["closed"] = dict(fields.pop("closes"))
        return GatewayStatistics(**fields)


_COUNTERS: Final = {
    "connections_accepted": "Sockets upgraded.",
    "frames_received": "Frames received from clients.",
    "frames_sent": "Frames sent to clients.",
    "requests": "Calls and streams started.",
    "requests_refused": "Frames answered with an error before any work.",
    "requests_failed": "Requests that ended with a handler error.",
    "publications_received": "Publications received from followed topics.",
}


def _line(name: str, value: int, labels: dict[str, str]) -> str:
    inner = ",".join(f'{key}="{value}"' for key, value in sorted(labels.items()))
    return f"{name}{{{inner}}} {value}"


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
    return "\n".join(lines) + "\n"
