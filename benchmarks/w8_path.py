"""W8's per-call path in one process, without sockets: load-independent
counts of what the server does for one gateway call.

``python -m benchmarks.w8_path [--count N] [--profile]`` runs a runner on
memory storage hosting ``Counter``, and one `ClientConnection` of W8's
gateway whose socket is a stand-in (its writes are counted, not sent).
Each call is a msgpack ``call`` frame to ``Counter.increment`` (100
entities in turn) handed to ``ClientConnection._deliver``, as the socket's
reader hands it: frame decoding, admission, the entity call
(`Router.call_nowait`), the reply's encoding and its write into the
outbox; not the socket's reads, the WebSocket framing of what is read, nor
the kernel. It prints the wall time per call (`--profile`: Python function
calls per call, from cProfile, and the top functions).

The calls run in ``all(map(deliver, chunk))`` (chunks of 100, with a
checkpoint between them so that the shard's lease is renewed), so that
valgrind counts the instructions of the calls alone::

    PYTHONHASHSEED=0 valgrind --tool=callgrind --collect-atstart=no \\
        --toggle-collect=builtin_all --callgrind-out-file=/dev/null \\
        python -m benchmarks.w8_path --count 2000

(the ``Collected`` line, divided by the count: instructions per call).
"""

from __future__ import annotations

import argparse
import cProfile
import logging
import pstats
import time
from functools import partial

import msgpack
import trio

import trio_cluster as tc
from trio_cluster._core._heartbeat import Heartbeats
from trio_cluster._log_limit import LogLimiter
from trio_cluster.gateway._client_info import ClientInfo
from trio_cluster.gateway._connection import ClientConnection
from trio_cluster.gateway._definition import resolve_routes
from trio_cluster.gateway._protocol import MSGPACK
from trio_cluster.gateway._statistics import GatewayCounters

from ._common import Counter
from .w8_gateway import GATEWAY


class _Socket:
    """The `ServerSocket` part a direct write reads: open."""

    closed = None


class _Outbox:
    """The `Outbox` part a direct write uses: counts the frames."""

    backlog = 0

    def __init__(self) -> None:
        self.frames = 0

    def write_nowait(self, data: bytes) -> None:
        self.frames += 1


async def run(count: int, *, profile: bool) -> None:
    async with tc.open_runner(entities=[Counter]) as runner:
        heartbeats = Heartbeats(interval=25.0, timeout=10.0)
        heartbeats.add(1, trio.current_time())
        connection = ClientConnection(
            _Socket(),  # type: ignore[arg-type]
            ClientInfo("w8-path", None, "127.0.0.1:1", MSGPACK),
            number=1,
            routes=resolve_routes(runner, GATEWAY),
            config=GATEWAY.config,
            authorize=None,
            counters=GatewayCounters(),
            warnings=LogLimiter(logger=logging.getLogger("benchmarks.w8_path")),
            seen=heartbeats.seen,
        )
        outbox = _Outbox()
        connection._direct = (_Socket(), outbox)  # type: ignore[assignment]
        frames = [
            msgpack.packb(
                {
                    "t": "call",
                    "id": i,
                    "op": "Counter.increment",
                    "key": f"counter-{i}",
                    "msg": {"amount": 1},
                }
            )
            for i in range(100)
        ]
        deliver = connection._deliver
        for frame in frames * 10:  # warm-up: the entities exist, handles kept
            deliver(frame)
        chunks = [frames] * max(1, count // len(frames))
        calls = len(chunks) * len(frames)
        profiler = cProfile.Profile() if profile else None
        started = time.perf_counter()
        for chunk in chunks:
            if profiler is not None:
                profiler.enable()
            if not all(map(deliver, chunk)):
                raise RuntimeError("the connection ended")
            if profiler is not None:
                profiler.disable()
            await trio.lowlevel.checkpoint()
        elapsed = time.perf_counter() - started
        if outbox.frames != calls + 1000:
            raise RuntimeError(f"{outbox.frames} replies for {calls + 1000} calls")
        print(f"{calls} calls: {elapsed / calls * 1e6:.2f} us per call (wall)")
        if profiler is not None:
            stats = pstats.Stats(profiler)
            total = sum(entry[1] for entry in stats.stats.values())  # type: ignore[attr-defined]
            print(f"Python function calls per call: {total / calls:.1f}")
            stats.sort_stats("tottime").print_stats(25)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.w8_path")
    parser.add_argument("--count", type=int, default=20_000)
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    trio.run(partial(run, args.count, profile=args.profile))


if __name__ == "__main__":
    main()
