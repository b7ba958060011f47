"""Lean clients that lose their runner and resume elsewhere, for the mass
reconnect benchmark (`benchmarks.gateway_reconnect`).

``python -m benchmarks._storm_client`` is a `benchmarks._lean_client`
process (one ``select.epoll`` loop, hand-written frames, the msgpack
subprotocol, JSON commands on stdin) whose sockets behave like the Trio
client: each subscribes to one topic, keeps the publications it got (and
counts the ones it got twice), and when its socket ends it reconnects,
after a random delay of up to 100 ms (doubling after each attempt that got
no subscribe answer), to one of the other gateways (``others[i % 2]``) and
resubscribes from the last position it saw. A subscribe answered with an
error is sent again after 0.5 s.

Commands (besides the lean client's ``stats`` and ``close``):

* ``storm``: open ``n`` sockets to ``url`` from source address ``src``
  (at most ``concurrency`` handshakes at once), each subscribing to
  ``topic``; answer when every one is subscribed. Later losses reconnect
  to ``others``.
* ``waiting``: how many clients have not yet resubscribed after a loss or
  lack one of the publications ``wanted`` (their ``data``).
* ``report``: per client figures of the resume, times in CLOCK_MONOTONIC
  seconds (``time.monotonic()``, the same clock in every process): the
  second upgrade and subscribe answer, the last arrival among ``wanted``;
  and totals (publications missing from ``wanted``, duplicates, failed
  attempts, refused subscribes, resubscribes answered ``recovered:
  false``, epochs seen).
"""

from __future__ import annotations

import heapq
import random
import resource
import socket
import time
from typing import Any
from urllib.parse import urlsplit

from ._lean_client import Conn, LeanClient


class Light:
    """What one client keeps across its sockets."""

    __slots__ = (
        "data",
        "duplicates",
        "failed",
        "failures",
        "index",
        "not_recovered",
        "position",
        "refused",
        "seen",
        "sockets",
        "subscribed_at",
        "welcomes",
    )

    def __init__(self, index: int) -> None:
        self.index = index
        self.position: tuple[str, int] | None = None
        self.seen: set[tuple[str, int]] = set()
        self.data: dict[Any, float] = {}
        """Publications' data, and when each arrived."""
        self.duplicates = 0
        self.sockets = 0
        self.subscribed_at: list[float] = []
        self.welcomes: list[float] = []
        self.failed = 0
        self.failures = 0
        self.refused = 0
        self.not_recovered = 0

    def subscribe_frame(self) -> dict[str, Any]:
        frame: dict[str, Any] = {"t": "subscribe", "id": self.sockets, "topic": ""}
        if self.position is not None:
            frame["since"] = {"epoch": self.position[0], "offset": self.position[1]}
        return frame


class StormConn(Conn):
    __slots__ = ("answered", "light")

    def __init__(
        self, sock: socket.socket, light: Light, topic: str, server: int
    ) -> None:
        super().__init__(sock, light.index, topic, server)
        self.light = light
        self.answered = len(light.subscribed_at)


class StormClient(LeanClient):
    """The epoll loop of `LeanClient`, with reconnecting sockets."""

    def __init__(self) -> None:
        super().__init__()
        self.lights: list[Light] = []
        self.timers: list[tuple[float, int, Any]] = []
        self.timer_seq = 0
        self.job: dict[str, Any] = {}
        self.first_up = 0
        self.queue: list[Light] = []
        self.handshakes = 0

    # -- sockets ---------------------------------------------------------

    def open_light(
        self, light: Light, server: tuple[str, int, str], which: int
    ) -> None:
        topic = self.job["topic"]
        self.dial(
            self.job["src"],
            server,
            lambda sock: StormConn(sock, light, topic, which),
        )
        self.handshakes += 1

    def start_next(self) -> None:
        """Open the first sockets, ``concurrency`` handshakes at once."""
        while self.queue and self.handshakes < self.job["concurrency"]:
            light = self.queue.pop()
            self.open_light(light, self.job["url"], 0)

    def later(self, delay: float, light: Light) -> None:
        self.timer_seq += 1
        heapq.heappush(self.timers, (time.monotonic() + delay, self.timer_seq, light))

    def lost(self, conn: Conn, reason: str) -> None:
        if conn.state == "closed":
            return
        if conn.state in ("handshake", "welcome"):
            self.handshakes -= 1
        self.close(conn)
        if not self.running:
            return
        self.disconnects += 1
        self.reasons[reason] += 1
        assert isinstance(conn, StormConn)
        light = conn.light
        if len(light.subscribed_at) == conn.answered:  # no subscribe answered
            light.failures += 1
            light.failed += 1
        else:
            light.failures = 0
        self.later(random.random() * 0.1 * 2 ** min(light.failures, 6), light)
        self.start_next()

    def reconnect(self, light: Light) -> None:
        others = self.job["others"]
        which = light.index % len(others)
        try:
            self.open_light(light, others[which], which + 1)
        except OSError:
            light.failures += 1
            light.failed += 1
            self.later(random.random() * 0.1 * 2 ** min(light.failures, 6), light)

    # -- frames ----------------------------------------------------------

    def frame(self, conn: Conn, frame: dict[str, Any], now: float) -> None:
        assert isinstance(conn, StormConn)
        light = conn.light
        kind = frame["t"]
        if kind == "pub":
            key = (frame["epoch"], frame["offset"])
            if key in light.seen:
                light.duplicates += 1
                return
            light.seen.add(key)
            light.data[frame["data"]] = now
            light.position = key
        elif kind == "welcome":
            if conn.state == "welcome":
                self.handshakes -= 1
                self.start_next()
            conn.state = "subscribing"
            light.sockets += 1
            light.welcomes.append(now)
            self.send_subscribe(conn)
        elif kind == "reply" and frame.get("id") == light.sockets:
            value = frame["v"]
            if light.subscribed_at and not value.get("recovered"):
                light.not_recovered += 1
            if light.position is None:
                light.position = (value["epoch"], value["offset"])
            light.subscribed_at.append(now)
            if conn.state == "subscribing" and len(light.subscribed_at) == 1:
                self.first_up += 1
                if self.first_up == len(self.lights):
                    self.reply(self.job["re"], seconds=now - self.job["started"])
            conn.state = "up"
        elif kind == "ping":
            self.pings += 1
            self.send(conn, {"t": "pong"})
        elif kind == "error" and frame.get("id") == light.sockets:
            light.refused += 1  # the topic unavailable a moment: again
            self.timer_seq += 1
            heapq.heappush(
                self.timers, (now + 0.5, self.timer_seq, (conn, light.sockets))
            )

    def send_subscribe(self, conn: StormConn) -> None:
        frame = conn.light.subscribe_frame()
        frame["topic"] = conn.topic
        self.send(conn, frame)

    # -- commands --------------------------------------------------------

    def op_storm(
        self,
        re: int,
        *,
        url: str,
        others: list[str],
        n: int,
        src: str,
        topic: str,
        index_base: int = 0,
        concurrency: int = 100,
    ) -> None:
        def server(each: str) -> tuple[str, int, str]:
            parts = urlsplit(each)
            assert parts.hostname is not None
            assert parts.port is not None
            return (parts.hostname, parts.port, parts.path or "/")

        self.job = {
            "re": re,
            "url": server(url),
            "others": [server(each) for each in others],
            "src": src,
            "topic": topic,
            "concurrency": concurrency,
            "started": time.monotonic(),
        }
        self.lights = [Light(index_base + i) for i in range(n)]
        self.queue = list(reversed(self.lights))
        self.start_next()

    def _missing(self, light: Light, wanted: list[Any]) -> int:
        data = light.data
        return sum(1 for value in wanted if value not in data)

    def op_waiting(self, re: int, *, wanted: list[Any]) -> None:
        waiting = sum(
            1
            for light in self.lights
            if len(light.subscribed_at) < 2 or self._missing(light, wanted)
        )
        self.reply(re, waiting=waiting)

    def op_report(self, re: int, *, wanted: list[Any]) -> None:
        now = time.monotonic()
        lights = self.lights
        usage = resource.getrusage(resource.RUSAGE_SELF)
        self.reply(
            re,
            upgraded=[light.welcomes[1] for light in lights if len(light.welcomes) > 1],
            resubscribed=[
                light.subscribed_at[1]
                for light in lights
                if len(light.subscribed_at) > 1
            ],
            recovered=max(
                (max((light.data.get(v, now) for v in wanted), default=0.0))
                for light in lights
            ),
            lost=sum(self._missing(light, wanted) for light in lights),
            duplicated=sum(light.duplicates for light in lights),
            failed=sum(light.failed for light in lights),
            refused=sum(light.refused for light in lights),
            not_recovered=sum(light.not_recovered for light in lights),
            epochs=sorted({epoch for light in lights for epoch, _ in light.seen}),
            cpu_s=usage.ru_utime + usage.ru_stime,
        )

    # -- the loop --------------------------------------------------------

    def fire(self, now: float) -> None:
        timers = self.timers
        while timers and timers[0][0] <= now:
            _, _, what = heapq.heappop(timers)
            if isinstance(what, Light):
                self.reconnect(what)
            else:
                conn, sockets = what
                if conn.state != "closed" and conn.light.sockets == sockets:
                    self.send_subscribe(conn)

    def tick(self) -> float:
        """Fire the timers that are due; seconds until the next (at most 1)."""
        now = time.monotonic()
        self.fire(now)
        if self.timers:
            return max(0.0, min(1.0, self.timers[0][0] - now))
        return 1.0


def main() -> None:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    StormClient().run()


if __name__ == "__main__":
    main()
