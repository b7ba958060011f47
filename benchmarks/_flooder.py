"""A flooding gateway client for the flood benchmark (`benchmarks.gateway_flood`).

``python -m benchmarks._flooder JSON`` (``{"host", "port", "path", "src",
"duration_s", "frames_per_s", "operation", "msg", "reconnect_after_s"}``)
opens a WebSocket from ``src`` and writes call frames at ``frames_per_s`` (in
batches every 10 ms, far over any message rate limit), without reading the
answers but for the close; when the gateway closes or refuses the socket,
it connects again after ``reconnect_after_s`` (as a client library would;
0: at once, a connect flood), for ``duration_s``. It prints one JSON line: connects accepted,
refusals by HTTP status, closes by code, frames written. Blocking sockets,
no Trio: it must cost little CPU at that rate, so that on a 2-core machine
what the others see is the server's doing.
"""

from __future__ import annotations

import base64
import json
import os
import select
import socket
import sys
import time
from collections import Counter
from typing import Any

from ._lean_client import MSGPACK, _pack, client_frame, parse_frames

_BATCH_EVERY = 0.01


def _upgrade(args: dict[str, Any]) -> tuple[socket.socket | None, str]:
    """A socket upgraded to a WebSocket, or None and why not."""
    try:
        sock = socket.create_connection(
            (args["host"], args["port"]), timeout=2.0, source_address=(args["src"], 0)
        )
    except OSError as exc:
        return None, f"connect: {exc.__class__.__name__}"
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall(
        (
            f"GET {args['path']} HTTP/1.1\r\nHost: {args['host']}:{args['port']}\r\n"
            "Upgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
            f"Sec-WebSocket-Protocol: {MSGPACK}\r\n\r\n"
        ).encode()
    )
    head = b""
    try:
        while b"\r\n\r\n" not in head:
            chunk = sock.recv(4096)
            if not chunk:
                break
            head += chunk
    except OSError as exc:
        sock.close()
        return None, f"read: {exc.__class__.__name__}"
    status = head.split(b"\r\n", 1)[0].decode(errors="replace")
    if " 101 " not in status + " ":
        sock.close()
        return None, status.split(" ", 2)[1] if " " in status else "no answer"
    sock.setblocking(False)
    return sock, ""


def flood(args: dict[str, Any]) -> dict[str, Any]:
    per_batch = max(1, int(args["frames_per_s"] * _BATCH_EVERY))
    frames = b"".join(
        client_frame(
            _pack(
                {
                    "t": "call",
                    "id": n + 1,
                    "op": args["operation"],
                    "key": "flood",
                    "msg": args["msg"],
                }
            )
        )
        for n in range(per_batch)
    )
    end = time.monotonic() + args["duration_s"]
    refusals: Counter[str] = Counter()
    closes: Counter[str] = Counter()
    connects = written = 0
    events: list[float] = []
    while time.monotonic() < end:
        if connects or refusals:
            select.select([], [], [], args["reconnect_after_s"])
        events.append(round(time.monotonic(), 4))
        sock, refused = _upgrade(args)
        if sock is None:
            refusals[refused] += 1
            continue
        connects += 1
        buffer = bytearray()
        pending = b""
        closed = ""
        while not closed and time.monotonic() < end:
            pending += frames
            try:
                sent = sock.send(pending)
            except BlockingIOError:
                sent = 0  # the server does not read us: keep trying
            except OSError as exc:
                closed = f"send: {exc.__class__.__name__}"
                break
            written += sent
            pending = pending[sent:][-len(frames) :]  # bounded backlog
            try:
                data = sock.recv(65536)
                if not data:
                    closed = "eof"
                buffer += data
            except BlockingIOError:
                pass
            except OSError as exc:
                closed = f"recv: {exc.__class__.__name__}"
            for opcode, payload in parse_frames(buffer):
                if opcode == 0x8:
                    code = int.from_bytes(payload[:2], "big") if payload else 0
                    closed = f"close {code}"
            select.select([], [], [], _BATCH_EVERY)  # the pace (a sleep)
        closes[closed or "ended"] += 1
        sock.close()
    return {
        "connects": connects,
        "refusals": dict(refusals),
        "closes": dict(closes),
        "bytes_written": written,
        "frame_bytes": len(frames) // per_batch,
        "cpu_s": time.process_time(),
        "attempts_at": events[:100],
    }


def main() -> None:
    print(json.dumps(flood(json.loads(sys.argv[1]))), flush=True)


if __name__ == "__main__":
    main()
