"""``python -m benchmarks <name>|all [--quick]``, or
``python -m benchmarks compare REV [--new REV] [--workload w1] [--runs 3]``
(see `benchmarks.compare`)."""

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
}


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
    args = parser.parse_args()
    names = list(WORKLOADS) if args.name == "all" else [args.name]
    for name in names:
        importlib.import_module(WORKLOADS[name]).main(quick=args.quick)


if __name__ == "__main__":
    main()
