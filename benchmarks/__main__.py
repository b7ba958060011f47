"""``python -m benchmarks <name>|all [--quick] [--under-load]``, or
``python -m benchmarks compare REV [--new REV] [--workload w1] [--runs 3]
[--under-load]`` (see `benchmarks.compare`)."""

from __future__ import annotations

import argparse
import importlib
import sys

WORKLOADS = {
    "w1": "benchmarks.w1_volatile",
    "w2": "benchmarks.w2_remote",
    "w3": "benchmarks.w3_persisted",
    "w4": "benchmarks.w4_failover",
    "w5": "benchmarks.w5_entities",
    "queue": "benchmarks.queue_jobs",
    "state": "benchmarks.durable_state",
    "events": "benchmarks.events_bus",
    "w10": "benchmarks.w10_webhooks",
    "w6": "benchmarks.w6_idle",
    "w7": "benchmarks.w7_fanout",
    "w8": "benchmarks.w8_gateway",
    "reconnect": "benchmarks.gateway_reconnect",
    "wf": "benchmarks.workflow_steps",
    "wfops": "benchmarks.workflow_listing",
    "w11": "benchmarks.w11",
    "w12": "benchmarks.w12",
}
LOADED = {"w4"}
"""Workloads with an ``--under-load`` variant."""


def main() -> None:
    if sys.argv[1:2] == ["compare"]:
        from .compare import main as compare

        compare(sys.argv[2:])
        return
    parser = argparse.ArgumentParser(prog="python -m benchmarks")
    parser.add_argument("name", choices=[*WORKLOADS, "all"])
    parser.add_argument(
        "--quick", action="store_true", help="smaller runs (smoke test)"
    )
    parser.add_argument(
        "--under-load",
        action="store_true",
        help="w4 only: keep one core busy with an unrelated CPU-bound process"
        " during each run",
    )
    args = parser.parse_args()
    if args.under_load and args.name not in LOADED:
        parser.error(f"--under-load is for {', '.join(sorted(LOADED))} only")
    names = list(WORKLOADS) if args.name == "all" else [args.name]
    for name in names:
        module = importlib.import_module(WORKLOADS[name])
        if name in LOADED:
            module.main(quick=args.quick, under_load=args.under_load)
        else:
            module.main(quick=args.quick)


if __name__ == "__main__":
    main()
