"""W6-W8 side by side with the Socket.IO 4 peer, in one session.

``python -m benchmarks.gateway_peer --peer DIR [--runs 3] [--only w6 w7 w8]
[--out FILE]`` runs, for each run and workload, the peer's script (``node
w6.mjs`` ..., in ``DIR``: a writable copy of
``../shared/peer-bench/gateway-socketio`` with ``npm install`` done) and then
ours (``python -m benchmarks w6`` ...), one after the other, records every
JSON figure of both with the run number and side (``--out``, JSON lines),
and prints a table of the medians of the figures that compare, with their
ratio. W7 runs the peer once per rate (``--rate 1``, ``10``, ``100``; its
default is 100/s) and ours once with all three rates.

The figures that do not depend on the clients are the server's costs:
RSS per socket, CPU per connect, idle CPU, CPU per delivery and per call.
The rates depend on the clients too: the peer's are the real
``socket.io-client``, ours the lean epoll client, which costs less CPU
(see `benchmarks._lean_client`); on a 2-core machine that leaves our
server more of the machine. Say so next to any throughput ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from ._common import REPO, progress

RATES = (1, 10, 100)

# (label, peer figure and its filter, our figure and its filter, better)
Compared = tuple[str, str, dict[str, Any], str, dict[str, Any], str]
COMPARED: dict[str, list[Compared]] = {
    "w6": [
        ("sockets", "rss_per_socket", {}, "rss_per_socket", {}, "n"),
        ("RSS per socket (B)", "rss_per_socket", {}, "rss_per_socket", {}, "lower"),
        (
            "CPU per connect (us)",
            "server_cpu_per_connect",
            {},
            "server_cpu_per_connect",
            {},
            "lower",
        ),
        ("idle CPU (% of a core)", "idle_cpu", {}, "idle_cpu", {}, "lower"),
        (
            "idle CPU per 10k sockets",
            "idle_cpu_per_10k_sockets",
            {},
            "idle_cpu_per_10k_sockets",
            {},
            "lower",
        ),
        ("connect rate (/s)", "connect_rate", {}, "connect_rate", {}, "higher"),
        ("other load (% of a core)", "machine_load", {}, "machine_load", {}, "info"),
    ],
    "w7": [
        item
        for rate in RATES
        for item in (
            (
                f"{rate}/s last delivery p50 (ms)",
                "last_delivery_p50",
                {"rate": rate},
                "last_delivery_p50",
                {"rate": float(rate)},
                "lower",
            ),
            (
                f"{rate}/s last delivery p99 (ms)",
                "last_delivery_p99",
                {"rate": rate},
                "last_delivery_p99",
                {"rate": float(rate)},
                "lower",
            ),
            (
                f"{rate}/s deliveries/s per server",
                "deliveries_per_s_per_server",
                {"rate": rate},
                "deliveries_per_s_per_runner",
                {"rate": float(rate)},
                "higher",
            ),
            (
                f"{rate}/s CPU per delivery (us)",
                "server_cpu_us_per_delivery",
                {"rate": rate},
                "server_cpu_us_per_delivery",
                {"rate": float(rate)},
                "lower",
            ),
            (
                f"{rate}/s envelopes per server per publication",
                "envelopes_per_server_per_publication",
                {"rate": rate},
                "envelopes_per_runner_per_publication",
                {"rate": float(rate)},
                "info",
            ),
            (
                f"{rate}/s delivered fraction",
                "delivered_fraction",
                {"rate": rate},
                "delivered_fraction",
                {"rate": float(rate)},
                "higher",
            ),
            (
                f"{rate}/s other load (% of a core)",
                "machine_load",
                {"rate": rate},
                "machine_load",
                {"rate": float(rate)},
                "info",
            ),
        )
    ],
    "w8": [
        ("100 clients req/s", "rpc_req_per_s", {}, "rpc_req_per_s", {}, "higher"),
        ("100 clients p50 (us)", "rpc_p50", {}, "rpc_p50", {}, "lower"),
        (
            "CPU per call (us)",
            "server_cpu_us_per_call",
            {},
            "rpc_server_cpu_per_call",
            {},
            "lower",
        ),
        ("sequential p50 (us)", "seq_p50", {}, "lean_seq_p50", {}, "lower"),
        (
            "GatewayClient sequential p50 ÷ trio-websocket echo p50",
            "",
            {},
            "sequential_p50_over_floor",
            {},
            "info",
        ),
        (
            "other load (% of a core)",
            "machine_load",
            {},
            "rpc_server_cpu_per_call",
            {},
            "info",
        ),
    ],
}


def _run(command: list[str], cwd: Path, log: Any) -> list[dict[str, Any]]:
    """Run ``command``; its JSON figures (stdout lines that are objects)."""
    progress(f"$ {' '.join(command)}  (in {cwd})")
    done = subprocess.run(
        command, cwd=cwd, stdout=subprocess.PIPE, stderr=log, text=True, check=False
    )
    if done.returncode:
        progress(f"  exit status {done.returncode} (see the log)")
    found = []
    for line in done.stdout.splitlines():
        if line.startswith("{"):
            try:
                found.append(json.loads(line))
            except ValueError:
                continue
    return found


def _peer(workload: str, peer: Path, log: Any) -> list[dict[str, Any]]:
    if workload != "w7":
        return _run(["node", f"{workload}.mjs"], peer, log)
    figures = []
    for rate in RATES:
        figures += _run(["node", "w7.mjs", "--rate", str(rate)], peer, log)
    return figures


def _ours(workload: str, log: Any) -> list[dict[str, Any]]:
    return _run([sys.executable, "-m", "benchmarks", workload], REPO, log)


_TO_UNIT: dict[tuple[object, object], float] = {
    ("ms", "us"): 1000.0,
    ("us", "ms"): 0.001,
}
"""Factors from a figure's unit to the table's (the peer gives some
latencies in ms, ours in µs)."""


def _pick(
    figures: list[dict[str, Any]],
    name: str,
    where: dict[str, Any],
    field: str,
    unit: str | None = None,
) -> float | None:
    for figure in figures:
        if figure.get("figure") != name:
            continue
        if all(figure.get(key) == value for key, value in where.items()):
            value: float | None
            if field == "n":
                value = figure.get("n")
            elif name == "rpc_server_cpu_per_call" and field == "info":
                value = figure.get("cpu", {}).get("other_cpu_pct")
            else:
                value = figure.get("value")
                scale = _TO_UNIT.get((figure.get("unit"), unit))
                if value is not None and scale is not None:
                    value *= scale
            return value
    return None


def summarize(records: list[dict[str, Any]]) -> str:
    """A table of medians per compared figure (markdown)."""
    runs: dict[tuple[str, str], list[list[dict[str, Any]]]] = defaultdict(list)
    for record in records:
        runs[(record["workload_name"], record["side"])].append(record["figures"])
    lines = [
        "| workload | figure | Socket.IO (median) | ours (median) | ours ÷ peer | values (peer / ours) |",
        "|---|---|---|---|---|---|",
    ]
    for workload, compared in COMPARED.items():
        for label, peer_name, peer_where, our_name, our_where, better in compared:
            unit = "us" if "(us)" in label else "ms" if "(ms)" in label else None
            peer_values = [
                v
                for figures in runs.get((workload, "peer"), [])
                if (v := _pick(figures, peer_name, peer_where, better, unit))
                is not None
            ]
            our_values = [
                v
                for figures in runs.get((workload, "ours"), [])
                if (v := _pick(figures, our_name, our_where, better, unit)) is not None
            ]
            if not peer_values and not our_values:
                continue
            peer_median = statistics.median(peer_values) if peer_values else None
            our_median = statistics.median(our_values) if our_values else None
            ratio = (
                f"{our_median / peer_median:.2f}"
                if peer_median and our_median is not None
                else ""
            )
            lines.append(
                f"| {workload.upper()} | {label} | {_fmt(peer_median)} | "
                f"{_fmt(our_median)} | {ratio} | "
                f"{', '.join(_fmt(v) for v in peer_values)} / "
                f"{', '.join(_fmt(v) for v in our_values)} |"
            )
    return "\n".join(lines)


def _fmt(value: float | None) -> str:
    if value is None:
        return "-"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    return f"{value:.3g}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gateway_peer")
    parser.add_argument("--peer", type=Path, required=True)
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--only", nargs="*", default=["w6", "w7", "w8"])
    parser.add_argument("--out", type=Path, default=Path("gateway_peer.jsonl"))
    parser.add_argument("--log", type=Path, default=Path("gateway_peer.log"))
    parser.add_argument(
        "--summarize", action="store_true", help="only print the table of --out"
    )
    args = parser.parse_args(argv)
    if args.summarize:
        records = [json.loads(line) for line in args.out.read_text().splitlines()]
        print(summarize(records))
        return
    if not (args.peer / "node_modules").is_dir():
        parser.error(f"{args.peer}: run `npm install --no-audit --no-fund` there first")
    records = []
    with args.out.open("a") as out, args.log.open("a") as log:
        for run in range(1, args.runs + 1):
            for workload in args.only:
                for side in ("peer", "ours"):
                    started = time.time()  # noqa: TID251 - a wall-clock stamp for the log
                    with open("/proc/loadavg") as loadavg:
                        load = loadavg.read().split()[0]
                    figures = (
                        _peer(workload, args.peer, log)
                        if side == "peer"
                        else _ours(workload, log)
                    )
                    record = {
                        "run": run,
                        "workload_name": workload,
                        "side": side,
                        "started": started,
                        "load_before": float(load),
                        "commit": _commit(),
                        "figures": figures,
                    }
                    records.append(record)
                    out.write(json.dumps(record) + "\n")
                    out.flush()
    print(summarize(records))


def _commit() -> str:
    done = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
        check=False,
    )
    dirty = subprocess.run(
        ["git", "status", "--porcelain", "trio_cluster"],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
        check=False,
    ).stdout.strip()
    return done.stdout.strip() + ("+dirty" if dirty else "")


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
