"""Heartbeats of many connections from one timer structure (sans-IO).

Theory of operation. A server with tens of thousands of sockets cannot
afford a ping task (and its timer) per socket. `Heartbeats` keeps one heap
of due times for all of them and a record per connection:

* ``seen(key, now)`` is called for every frame received from the peer (any
  frame proves it alive, a pong too). It only writes the time: O(1), no
  heap work on the hot path.
* when a connection's due time comes (`due`), its record decides:

  ===================  ========================  ================================
  waiting for a pong?  heard since?              command, next due time
  ===================  ========================  ================================
  no                   within ``interval``       none, ``last_seen + interval``
  no                   not for ``interval``      `SendPing`, ``now + min(timeout,
                                                 interval)``
  yes                  yes (after the ping)      as "no" (the pong was heard)
  yes                  no, ``timeout`` is over   `Disconnect` (record dropped)
  yes                  no, ``timeout`` not over  none, ``min(ping_sent + timeout,
                                                 now + interval)``
  ===================  ========================  ================================

A peer that goes silent at ``t`` (dead, or a half-open TCP connection) is
pinged at the latest at ``t + interval`` and disconnected at the latest at
``t + interval + timeout``. The driver sleeps until `next_deadline`; it
reads no clock itself here: every call is given ``now``.

Pings may be sent a little early, so that one wake-up serves many
connections: `due` with ``early`` also takes the connections whose ping is
due before ``now + early`` and decides them as at their due time (a
disconnection is never early: a connection waiting for its pong is decided
at ``now``).
"""

from __future__ import annotations

import heapq
import math
from typing import Final

import attrs

from ._checks import positive_seconds

__all__ = ["Disconnect", "Heartbeats", "SendPing"]


@attrs.frozen
class SendPing:
    """Send the connection a ping: nothing heard from it for ``interval``."""

    key: int


@attrs.frozen
class Disconnect:
    """Close the connection: its ping went unanswered for ``timeout``."""

    key: int


@attrs.define
class _Beat:
    last_seen: float
    ping_sent: float | None
    generation: int


_NEVER: Final = math.inf


class Heartbeats:
    """The heartbeat state of a server's connections (see the module
    docstring).

    Raises:
        ConfigError: ``interval`` or ``timeout`` is not a positive, finite
            number.
    """

    def __init__(self, *, interval: float, timeout: float) -> None:
        self.interval = positive_seconds("ping_interval", interval)
        self.timeout = positive_seconds("ping_timeout", timeout)
        self._beats: dict[int, _Beat] = {}
        self._heap: list[tuple[float, int, int]] = []
        """(due, key, generation); stale entries are skipped when popped."""
        self._generation = 0

    def __len__(self) -> int:
        return len(self._beats)

    def add(self, key: int, now: float) -> float:
        """Watch a new connection (or restart watching ``key``); returns its
        first due time."""
        self._generation += 1
        self._beats[key] = _Beat(now, None, self._generation)
        due = now + self.interval
        heapq.heappush(self._heap, (due, key, self._generation))
        return due

    def remove(self, key: int) -> None:
        """Stop watching ``key`` (its heap entry is skipped later)."""
        self._beats.pop(key, None)

    def seen(self, key: int, now: float) -> None:
        """A frame arrived from ``key``'s peer at ``now``."""
        beat = self._beats.get(key)
        if beat is not None:
            beat.last_seen = now

    def next_deadline(self) -> float:
        """When `due` has work next (``inf``: nothing is watched)."""
        heap = self._heap
        while heap:
            _, key, generation = heap[0]
            beat = self._beats.get(key)
            if beat is not None and beat.generation == generation:
                return heap[0][0]
            heapq.heappop(heap)
        return _NEVER

    def due(self, now: float, early: float = 0.0) -> list[SendPing | Disconnect]:
        """The commands for every connection due at or before ``now``, and
        the pings due before ``now + early`` (see the module docstring)."""
        heap = self._heap
        commands: list[SendPing | Disconnect] = []
        later: list[tuple[float, int, int]] = []
        horizon = now + early
        while heap and heap[0][0] <= horizon:
            due, key, generation = heapq.heappop(heap)
            beat = self._beats.get(key)
            if beat is None or beat.generation != generation:
                continue
            if due > now and beat.ping_sent is not None:
                # Waiting for its pong: never decided early.
                later.append((due, key, generation))
                continue
            command, next_due = self._decide(beat, now, max(now, due))
            if command is not None:
                commands.append(command(key))
            if next_due is None:
                del self._beats[key]
            else:
                heapq.heappush(heap, (next_due, key, generation))
        for entry in later:
            heapq.heappush(heap, entry)
        return commands

    def _decide(
        self, beat: _Beat, now: float, at: float
    ) -> tuple[type[SendPing | Disconnect] | None, float | None]:
        """The command for ``beat`` at ``now``, deciding whether it is quiet
        as at ``at`` (``now``, or its due time when pinged early)."""
        ping_sent = beat.ping_sent
        if ping_sent is not None:
            if beat.last_seen < ping_sent:
                if now >= ping_sent + self.timeout:
                    return Disconnect, None
                return None, min(ping_sent + self.timeout, now + self.interval)
            beat.ping_sent = None
        quiet_until = beat.last_seen + self.interval
        if quiet_until > at:
            return None, quiet_until
        beat.ping_sent = now
        # While waiting, look at least every interval: a pong heard since is
        # then seen by ``last_seen + interval``, so the next ping is on time
        # even with a timeout longer than the interval.
        return SendPing, now + min(self.timeout, self.interval)
