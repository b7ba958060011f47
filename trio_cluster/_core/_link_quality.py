"""The quality of one client's link, from its ping round trips (sans-IO).

Theory of operation. Each answered ping gives a round-trip time; the link
keeps their exponentially weighted moving average (the last one counts for
``weight``, the past for the rest, so one slow answer moves it without
taking it over) and judges it against two thresholds: ``good`` below
``fair_above``, ``fair`` up to ``poor_above``, ``poor`` beyond (the seeds'
connection metrics warn at one second), ``unknown`` before any answer.
A ping that was never answered is not judged here: the heartbeats close
that socket.
"""

from __future__ import annotations

from typing import Final, Literal

from .._errors import ConfigError

__all__ = ["POOR_ABOVE", "LinkQuality", "Quality"]

Quality = Literal["unknown", "good", "fair", "poor"]

FAIR_ABOVE: Final = 0.3
"""Seconds of average round trip above which a link is only ``fair``."""
POOR_ABOVE: Final = 1.0
"""Seconds of average round trip above which a link is ``poor``."""


class LinkQuality:
    """Round trips of one link and their verdict (see the module docstring)."""

    __slots__ = ("_fair", "_poor", "_weight", "average", "last", "samples")

    def __init__(
        self,
        *,
        weight: float = 0.2,
        fair_above: float = FAIR_ABOVE,
        poor_above: float = POOR_ABOVE,
    ) -> None:
        if not 0 < weight <= 1:
            raise ConfigError(f"weight must be in (0, 1], got {weight!r}")
        if not 0 < fair_above <= poor_above:
            raise ConfigError(
                "thresholds must be 0 < fair_above <= poor_above, got"
                f" {fair_above!r} and {poor_above!r}"
            )
        self._weight = weight
        self._fair = fair_above
        self._poor = poor_above
        self.average: float | None = None
        """The moving average of the round trips, in seconds."""
        self.last: float | None = None
        """The last round trip, in seconds."""
        self.samples = 0

    def observe(self, rtt: float) -> Quality:
        """Count one round trip (seconds; a negative one counts as 0);
        the verdict after it."""
        rtt = max(rtt, 0.0)
        self.last = rtt
        self.samples += 1
        average = self.average
        self.average = (
            rtt if average is None else average + self._weight * (rtt - average)
        )
        return self.quality

    @property
    def quality(self) -> Quality:
        average = self.average
        if average is None:
            return "unknown"
        if average > self._poor:
            return "poor"
        if average > self._fair:
            return "fair"
        return "good"
