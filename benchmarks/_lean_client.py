"""A lean gateway client process for W6-W8: many sockets, one epoll loop.

``python -m benchmarks._lean_client`` reads JSON commands on stdin (one per
line, ``{"id": n, "op": ..., ...}``) and answers each on stdout
(``{"re": n, ...}``); it exits when stdin closes. It speaks the gateway's
msgpack subprotocol over hand-written WebSocket framing (masked client
frames, unmasked server frames, no fragments: the gateway sends none),
without Trio: one ``select.epoll`` loop serves every socket of the process,
so a delivery costs the client a few microseconds. That keeps the clients
from being what limits W6-W8 on a 2-core machine; the server's figures
(CPU per connect, per delivery, per call; RSS per socket) do not depend on
it. The peer's clients are the real ``socket.io-client``
(`../shared/peer-bench/gateway-socketio`), which cost about as much CPU as
its server: compare throughput with that in mind.

Commands:

* ``connect``: open ``n`` sockets to ``url`` (or to a list of urls, round
  robin: socket ``i`` to ``url[i % len(url)]``) from source address ``src``,
  at most ``concurrency`` handshakes at once; each subscribes to topic
  ``topic_prefix + str(i % topics)`` (``topics`` > 0) and waits for the
  answer. Answers ``ok``, ``failed`` and ``errors``.
* ``stats``: sockets up, disconnects (and their reasons), pings answered,
  this process's CPU seconds.
* ``fan_arm``: start recording ``pub`` frames (``maxseq`` publications).
* ``fan_progress`` / ``fan_report``: deliveries so far; per publication the
  count and the last arrival time (CLOCK_MONOTONIC, µs).
* ``publish``: ``count`` calls of ``operation`` with ``{seq, ts, pad}``
  (``ts``: CLOCK_MONOTONIC) at ``rate`` per second on one socket, not
  waiting for replies; answers the send times when every reply came.
* ``rpc``: every socket calls ``operation`` on entity ``key_prefix + i`` in a
  closed loop (one call in flight per socket) for ``warmup_s`` then
  ``duration_s``; answers the calls and latencies of the measured window.
* ``seq``: one socket makes ``count`` calls one after another.
* ``paced``: every socket calls ``operation`` ``rate`` times a second, the
  calls of all sockets evenly spread (an open loop: a socket whose last
  call is unanswered skips its turn, counted ``skipped``), for
  ``warmup_s`` then ``duration_s``; answers the latencies of the calls
  sent in the measured window, and (sent at, latency) of those over
  ``slow_s`` (10 ms unless told; the first 20,000).
* ``close``: close every socket.
"""

from __future__ import annotations

import base64
import contextlib
import errno
import json
import os
import resource
import select
import socket
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from typing import Any, Final
from urllib.parse import urlsplit

import msgpack

MSGPACK: Final = "trio_cluster.msgpack.v1"
_CLOSE_GRACE: Final = 2.0

_pack = msgpack.Packer().pack
_unpack = msgpack.unpackb


def client_frame(payload: bytes, opcode: int = 0x2) -> bytes:
    """One masked client frame (FIN set)."""
    n = len(payload)
    if n < 126:
        header = bytes((0x80 | opcode, 0x80 | n))
    elif n < 1 << 16:
        header = bytes((0x80 | opcode, 0x80 | 126)) + n.to_bytes(2, "big")
    else:
        header = bytes((0x80 | opcode, 0x80 | 127)) + n.to_bytes(8, "big")
    key = os.urandom(4)
    stream = (key * (n // 4 + 1))[:n]
    masked = (
        int.from_bytes(payload, "little") ^ int.from_bytes(stream, "little")
    ).to_bytes(n, "little")
    return header + key + masked


def parse_frames(buffer: bytearray) -> list[tuple[int, bytes]]:
    """Take the whole server frames off the front of ``buffer``."""
    frames = []
    pos, size = 0, len(buffer)
    while size - pos >= 2:
        b0, b1 = buffer[pos], buffer[pos + 1]
        n = b1 & 0x7F
        head = pos + 2
        if n == 126:
            if size - pos < 4:
                break
            n = int.from_bytes(buffer[pos + 2 : pos + 4], "big")
            head = pos + 4
        elif n == 127:
            if size - pos < 10:
                break
            n = int.from_bytes(buffer[pos + 2 : pos + 10], "big")
            head = pos + 10
        if size < head + n:
            break
        frames.append((b0 & 0x0F, bytes(buffer[head : head + n])))
        pos = head + n
    if pos:
        del buffer[:pos]
    return frames


class Conn:
    """One socket and its state (``handshake`` → ``welcome`` → ``subscribing``
    → ``up`` → ``closed``)."""

    __slots__ = (
        "buffer",
        "calls",
        "index",
        "key",
        "last_value",
        "next_id",
        "out",
        "sent_at",
        "server",
        "sock",
        "state",
        "topic",
    )

    def __init__(
        self, sock: socket.socket, index: int, topic: str | None, server: int = 0
    ) -> None:
        self.sock = sock
        self.index = index
        self.server = server
        self.topic = topic
        self.state = "connecting"
        self.buffer = bytearray()
        self.out = b""
        self.next_id = 1
        self.key = ""
        self.calls = 0
        self.sent_at = 0.0
        self.last_value: int | None = None


class _ConnectResult:
    """What a ``connect`` command achieved."""

    def __init__(self) -> None:
        self.ok = 0
        self.failed = 0
        self.errors: defaultdict[str, int] = defaultdict(int)


_SLOW_KEPT = 20_000
"""Slow calls listed at most (``paced``)."""


class LeanClient:
    """The epoll loop and the commands (see the module docstring)."""

    def __init__(self) -> None:
        self.epoll = select.epoll()
        self.conns: dict[int, Conn] = {}
        self.stdin_buffer = b""
        self.running = True
        self.disconnects = 0
        self.reasons: dict[str, int] = defaultdict(int)
        self.pings = 0
        # connect
        self.pending_count = 0
        self.connecting = 0
        self.connect_job: dict[str, Any] | None = None
        self.connect_result = _ConnectResult()
        # fan-out
        self.fan_max = 0
        self.fan_count: list[int] = []
        self.fan_last: list[float] = []
        self.fan_total = 0
        self.fan_ts: list[float] = []
        self.server_count: list[int] = []
        self.server_last: list[float] = []
        self.pub: dict[str, Any] | None = None
        # rpc
        self.rpc: dict[str, Any] | None = None
        self.latencies: list[float] = []
        self.paced: dict[str, Any] | None = None

    # ------------------------------------------------------------------
    # Output

    def reply(self, request: int, **value: Any) -> None:
        sys.stdout.write(json.dumps({"re": request, **value}) + "\n")
        sys.stdout.flush()

    # ------------------------------------------------------------------
    # Sockets

    def open_socket(self, conn_index: int, topic: str | None) -> None:
        job = self.connect_job
        assert job is not None
        server = conn_index % len(job["servers"])
        self.dial(
            job["src"],
            job["servers"][server],
            lambda sock: Conn(sock, conn_index, topic, server),
        )
        self.connecting += 1

    def dial(
        self,
        src: str,
        server: Sequence[Any],
        make: Callable[[socket.socket], Conn],
    ) -> Conn:
        """Open a socket from ``src`` to ``server`` (host, port, path) for
        the connection ``make`` builds, its upgrade request queued."""
        host, port, path = server
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.bind((src, 0))
        sock.setblocking(False)
        conn = make(sock)
        with contextlib.suppress(BlockingIOError):
            sock.connect((host, port))
        self.conns[sock.fileno()] = conn
        key = base64.b64encode(os.urandom(16)).decode()
        conn.out = (
            f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\n"
            "Upgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
            f"Sec-WebSocket-Protocol: {MSGPACK}\r\n\r\n"
        ).encode()
        conn.state = "handshake"
        self.epoll.register(sock.fileno(), select.EPOLLIN | select.EPOLLOUT)
        return conn

    def send(self, conn: Conn, frame: dict[str, Any]) -> None:
        data = client_frame(_pack(frame))
        if conn.out:
            conn.out += data
            return
        try:
            sent = conn.sock.send(data)
        except BlockingIOError:
            sent = 0
        except OSError as exc:
            self.lost(conn, f"send: {errno.errorcode.get(exc.errno or 0, exc)}")
            return
        if sent < len(data):
            conn.out = data[sent:]
            self.epoll.modify(conn.sock.fileno(), select.EPOLLIN | select.EPOLLOUT)

    def flush(self, conn: Conn) -> None:
        try:
            sent = conn.sock.send(conn.out)
        except BlockingIOError:
            return
        except OSError as exc:
            self.lost(conn, f"send: {errno.errorcode.get(exc.errno or 0, exc)}")
            return
        conn.out = conn.out[sent:]
        if not conn.out:
            self.epoll.modify(conn.sock.fileno(), select.EPOLLIN)

    def lost(self, conn: Conn, reason: str) -> None:
        if conn.state == "closed":
            return
        if conn.state in ("handshake", "welcome", "subscribing"):
            self.connect_failed(conn, reason)
        elif self.running:
            self.disconnects += 1
            self.reasons[reason] += 1
        self.close(conn)

    def close(self, conn: Conn) -> None:
        """Forget a connection and close its socket."""
        conn.state = "closed"
        fd = conn.sock.fileno()
        self.conns.pop(fd, None)
        with contextlib.suppress(OSError, ValueError):
            self.epoll.unregister(fd)
        conn.sock.close()

    def connect_failed(self, conn: Conn, reason: str) -> None:
        result = self.connect_result
        result.failed += 1
        result.errors[reason] += 1
        self.connecting -= 1
        self.next_connects()

    def connected(self, conn: Conn) -> None:
        conn.state = "up"
        self.connect_result.ok += 1
        self.connecting -= 1
        self.next_connects()

    def next_connects(self) -> None:
        job = self.connect_job
        if job is None:
            return
        while self.pending_count and self.connecting < job["concurrency"]:
            index = job["next"]
            job["next"] += 1
            self.pending_count -= 1
            topics = job["topics"]
            topic = f"{job['topic_prefix']}{index % topics}" if topics else None
            try:
                self.open_socket(index, topic)
            except OSError as exc:
                self.connect_result.failed += 1
                self.connect_result.errors[f"open: {exc}"] += 1
        if not self.pending_count and not self.connecting:
            result = self.connect_result
            self.reply(
                job["re"],
                ok=result.ok,
                failed=result.failed,
                errors=dict(result.errors),
                seconds=time.monotonic() - job["started"],
            )
            self.connect_job = None

    # ------------------------------------------------------------------
    # Events

    def readable(self, conn: Conn) -> None:
        try:
            data = conn.sock.recv(262144)
        except BlockingIOError:
            return
        except OSError as exc:
            self.lost(conn, f"recv: {errno.errorcode.get(exc.errno or 0, exc)}")
            return
        if not data:
            self.lost(conn, "eof")
            return
        buffer = conn.buffer
        buffer += data
        if conn.state == "handshake":
            end = buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            status = bytes(buffer[: buffer.find(b"\r\n")])
            if b" 101 " not in status:
                self.lost(conn, f"handshake: {status.decode(errors='replace')}")
                return
            del buffer[: end + 4]
            conn.state = "welcome"
        now = time.monotonic()
        for opcode, payload in parse_frames(buffer):
            if opcode == 0x8:
                code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else 0
                self.lost(conn, f"close {code}")
                return
            if opcode != 0x2:
                continue
            value = _unpack(payload)
            if isinstance(value, list):
                for frame in value:
                    self.frame(conn, frame, now)
            else:
                self.frame(conn, value, now)
            if conn.state == "closed":
                return

    def frame(self, conn: Conn, frame: dict[str, Any], now: float) -> None:
        kind = frame["t"]
        if kind == "pub":
            self.publication(conn, frame["data"], now)
        elif self.pub is not None and frame.get("id", 0) >= 1_000_000:
            self.pub_reply(frame)
        elif kind == "reply":
            if conn.state == "up" and self.paced is not None:
                self.paced_reply(conn, frame, now)
            elif conn.state == "up":
                self.rpc_reply(conn, frame, now)
            elif conn.state == "subscribing":
                self.connected(conn)
        elif kind == "ping":
            self.pings += 1
            self.send(conn, {"t": "pong"})
        elif kind == "welcome":
            if conn.topic is None:
                self.connected(conn)
            else:
                conn.state = "subscribing"
                self.send(conn, {"t": "subscribe", "id": 0, "topic": conn.topic})
        elif kind == "error" and conn.state != "up":
            self.lost(conn, f"error {frame.get('code')}")

    def publication(self, conn: Conn, data: dict[str, Any], now: float) -> None:
        seq = data["seq"]
        if seq < self.fan_max:
            self.fan_count[seq] += 1
            self.fan_total += 1
            if now > self.fan_last[seq]:
                self.fan_last[seq] = now
            server = conn.server
            self.server_count[server] += 1
            if now > self.server_last[server]:
                self.server_last[server] = now

    # ------------------------------------------------------------------
    # RPC

    def call(self, conn: Conn, now: float, job: dict[str, Any]) -> None:
        """Send ``conn``'s next call of ``job``'s operation and message."""
        request_id = conn.next_id
        conn.next_id += 1
        conn.sent_at = now
        self.send(
            conn,
            {
                "t": "call",
                "id": request_id,
                "op": job["op"],
                "key": conn.key,
                "msg": job["msg"],
            },
        )

    def rpc_reply(self, conn: Conn, frame: dict[str, Any], now: float) -> None:
        rpc = self.rpc
        if rpc is None:
            return
        value = frame.get("v")
        if isinstance(value, int):
            if conn.last_value is not None and value != conn.last_value + 1:
                rpc["wrong"] += 1
            conn.last_value = value
        else:
            rpc["errors"] += 1
        if rpc["measure_from"] <= conn.sent_at < rpc["measure_until"]:
            self.latencies.append(now - conn.sent_at)
            rpc["calls"] += 1
        if now < rpc["stop_at"] and (rpc["count"] is None or rpc["left"] > 0):
            if rpc["count"] is not None:
                rpc["left"] -= 1
            self.call(conn, now, rpc)
        else:
            rpc["active"] -= 1
            if rpc["active"] == 0:
                self.rpc_done()

    def rpc_done(self) -> None:
        rpc = self.rpc
        assert rpc is not None
        self.rpc = None
        self.reply(
            rpc["re"],
            calls=rpc["calls"],
            wrong=rpc["wrong"],
            errors=rpc["errors"],
            latencies=self.latencies,
            measured_s=rpc["measure_until"] - rpc["measure_from"],
        )
        self.latencies = []

    # ------------------------------------------------------------------
    # Commands

    def command(self, line: bytes) -> None:
        request = json.loads(line)
        op = request.pop("op")
        re = request.pop("id")
        getattr(self, f"op_{op}")(re, **request)

    def op_connect(
        self,
        re: int,
        *,
        url: str | list[str],
        n: int,
        src: str,
        index_base: int = 0,
        topics: int = 0,
        topic_prefix: str = "room-",
        concurrency: int = 100,
    ) -> None:
        urls = [url] if isinstance(url, str) else url
        servers = []
        for each in urls:
            parts = urlsplit(each)
            servers.append((parts.hostname, parts.port, parts.path or "/"))
        self.connect_job = {
            "re": re,
            "servers": servers,
            "src": src,
            "next": index_base,
            "topics": topics,
            "topic_prefix": topic_prefix,
            "concurrency": concurrency,
            "started": time.monotonic(),
        }
        self.connect_result = _ConnectResult()
        self.pending_count = n
        self.next_connects()

    def op_stats(self, re: int) -> None:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        self.reply(
            re,
            sockets=sum(1 for conn in self.conns.values() if conn.state == "up"),
            disconnects=self.disconnects,
            reasons=dict(self.reasons),
            pings=self.pings,
            cpu_s=usage.ru_utime + usage.ru_stime,
        )

    def op_fan_arm(self, re: int, *, maxseq: int, servers: int = 1) -> None:
        self.fan_max = maxseq
        self.fan_count = [0] * maxseq
        self.fan_last = [0.0] * maxseq
        self.fan_total = 0
        self.server_count = [0] * servers
        self.server_last = [0.0] * servers
        self.reply(re)

    def op_fan_progress(self, re: int) -> None:
        self.reply(re, delivered=self.fan_total)

    def op_fan_report(self, re: int) -> None:
        self.reply(
            re,
            count=self.fan_count,
            last=self.fan_last,
            server_count=self.server_count,
            server_last=self.server_last,
        )

    def op_publish(
        self,
        re: int,
        *,
        operation: str,
        rate: float,
        count: int,
        pad: int = 0,
        first_seq: int = 0,
    ) -> None:
        """Send ``count`` calls of ``operation`` (message ``{seq, ts, pad}``)
        at ``rate`` per second on the first socket, without waiting for
        the replies (they are counted); answer when all came."""
        conn = next(conn for conn in self.conns.values() if conn.state == "up")
        start = time.monotonic()
        self.pub = {
            "re": re,
            "conn": conn,
            "operation": operation,
            "interval": 1.0 / rate,
            "count": count,
            "sent": 0,
            "replies": 0,
            "errors": 0,
            "start": start,
            "pad": "x" * pad,
            "first_seq": first_seq,
            "ts": [],
        }
        self.pub_tick(start)

    def pub_tick(self, now: float) -> float | None:
        """Send the publications due by ``now``; the time of the next one
        (None: all sent)."""
        pub = self.pub
        if pub is None:
            return None
        while pub["sent"] < pub["count"]:
            due: float = pub["start"] + pub["sent"] * pub["interval"]
            if due > now:
                return due
            conn = pub["conn"]
            ts = time.monotonic()
            seq = pub["first_seq"] + pub["sent"]
            pub["ts"].append(ts)
            pub["sent"] += 1
            self.send(
                conn,
                {
                    "t": "call",
                    "id": 1_000_000 + seq,
                    "op": pub["operation"],
                    "msg": {"seq": seq, "ts": ts, "pad": pub["pad"]},
                },
            )
        return None

    def pub_reply(self, frame: dict[str, Any]) -> None:
        pub = self.pub
        assert pub is not None
        pub["replies"] += 1
        if frame["t"] == "error":
            pub["errors"] += 1
        if pub["replies"] == pub["count"]:
            self.pub = None
            self.reply(
                pub["re"],
                sent=pub["sent"],
                errors=pub["errors"],
                ts=pub["ts"],
                elapsed=time.monotonic() - pub["start"],
            )

    def op_rpc(
        self,
        re: int,
        *,
        operation: str,
        msg: Any,
        key_prefix: str,
        warmup_s: float,
        duration_s: float,
        sockets: int | None = None,
        count: int | None = None,
    ) -> None:
        now = time.monotonic()
        chosen = [conn for conn in self.conns.values() if conn.state == "up"]
        chosen = chosen[: sockets or len(chosen)]
        self.rpc = {
            "re": re,
            "op": operation,
            "msg": msg,
            "measure_from": now + warmup_s,
            "measure_until": now + warmup_s + duration_s,
            "stop_at": now + warmup_s + duration_s,
            "count": count,
            "left": count,
            "calls": 0,
            "wrong": 0,
            "errors": 0,
            "active": len(chosen),
        }
        if count is not None:  # sequential: measure every call after warm-up
            self.rpc["measure_until"] = self.rpc["stop_at"] = float("inf")
            self.rpc["left"] = count - len(chosen)
        self.latencies = []
        for conn in chosen:
            conn.key = f"{key_prefix}{conn.index}"
            conn.last_value = None
            self.call(conn, now, self.rpc)

    def op_paced(
        self,
        re: int,
        *,
        operation: str,
        msg: Any,
        key_prefix: str,
        rate: float,
        warmup_s: float,
        duration_s: float,
        slow_s: float = 0.01,
    ) -> None:
        now = time.monotonic()
        chosen = [conn for conn in self.conns.values() if conn.state == "up"]
        for conn in chosen:
            conn.key = f"{key_prefix}{conn.index}"
            conn.sent_at = 0.0
        self.paced = {
            "re": re,
            "op": operation,
            "msg": msg,
            "conns": chosen,
            "start": now,
            "interval": 1.0 / (rate * max(1, len(chosen))),
            "turns": 0,
            "measure_from": now + warmup_s,
            "until": now + warmup_s + duration_s,
            "in_flight": 0,
            "calls": 0,
            "skipped": 0,
            "errors": 0,
            "slow": [],
            "slow_s": slow_s,
        }
        self.latencies = []

    def paced_tick(self, now: float) -> float:
        """Send the paced calls due; seconds until the next one."""
        paced = self.paced
        assert paced is not None
        conns = paced["conns"]
        if now >= paced["until"] or not conns:
            if paced["in_flight"] == 0 or now >= paced["until"] + 5.0:
                self.paced_done()
            return 0.1
        due = int((now - paced["start"]) / paced["interval"])
        while paced["turns"] < due:
            conn = conns[paced["turns"] % len(conns)]
            paced["turns"] += 1
            if conn.state != "up":
                continue
            if conn.sent_at:
                if now >= paced["measure_from"]:
                    paced["skipped"] += 1
                continue
            paced["in_flight"] += 1
            self.call(conn, now, paced)
        next_at = float(paced["start"] + (paced["turns"] + 1) * paced["interval"])
        return max(0.0, next_at - now)

    def paced_reply(self, conn: Conn, frame: dict[str, Any], now: float) -> None:
        paced = self.paced
        assert paced is not None
        if not conn.sent_at:
            return
        if not isinstance(frame.get("v"), int):
            paced["errors"] += 1
        elif paced["measure_from"] <= conn.sent_at < paced["until"]:
            self.latencies.append(now - conn.sent_at)
            paced["calls"] += 1
            if now - conn.sent_at > paced["slow_s"] and len(paced["slow"]) < _SLOW_KEPT:
                paced["slow"].append(
                    (round(conn.sent_at, 4), round(now - conn.sent_at, 4))
                )
        conn.sent_at = 0.0
        paced["in_flight"] -= 1

    def paced_done(self) -> None:
        paced = self.paced
        assert paced is not None
        self.paced = None
        self.reply(
            paced["re"],
            calls=paced["calls"],
            skipped=paced["skipped"],
            errors=paced["errors"],
            unanswered=paced["in_flight"],
            latencies=self.latencies,
            sockets=sum(1 for conn in paced["conns"] if conn.state == "up"),
            slow=paced["slow"],
        )
        self.latencies = []

    def op_close(self, re: int) -> None:
        self.running = False
        for conn in list(self.conns.values()):
            with contextlib.suppress(OSError):
                conn.sock.send(client_frame((1000).to_bytes(2, "big"), 0x8))
            self.lost(conn, "closed")
        self.reply(re)

    # ------------------------------------------------------------------

    def run(self) -> None:
        stdin = sys.stdin.fileno()
        os.set_blocking(stdin, False)
        self.epoll.register(stdin, select.EPOLLIN)
        sys.stdout.write(json.dumps({"event": "ready", "pid": os.getpid()}) + "\n")
        sys.stdout.flush()
        conns = self.conns
        timeout = 1.0
        while True:
            for fd, mask in self.epoll.poll(timeout):
                if fd == stdin:
                    if not self.read_stdin(stdin):
                        return
                    continue
                conn = conns.get(fd)
                if conn is None:
                    continue
                if mask & select.EPOLLOUT and conn.out:
                    self.flush(conn)
                if mask & (select.EPOLLIN | select.EPOLLERR | select.EPOLLHUP):
                    self.readable(conn)
            timeout = self.tick()

    def tick(self) -> float:
        """Do what is due after a round of events; seconds until the next
        thing is due (at most 1)."""
        timeout = 1.0
        if self.pub is not None:
            now = time.monotonic()
            due = self.pub_tick(now)
            if due is not None:
                timeout = max(0.0, due - now)
        if self.paced is not None:
            timeout = min(timeout, self.paced_tick(time.monotonic()))
        return timeout

    def read_stdin(self, fd: int) -> bool:
        try:
            data = os.read(fd, 65536)
        except BlockingIOError:
            return True
        if not data:
            return False
        self.stdin_buffer += data
        *lines, self.stdin_buffer = self.stdin_buffer.split(b"\n")
        for line in lines:
            if line.strip():
                self.command(line)
        return True


def main() -> None:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    LeanClient().run()


if __name__ == "__main__":
    main()
