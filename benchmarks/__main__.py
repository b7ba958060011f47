"""``python -m benchmarks <name>|all [--quick]``."""

from __future__ import annotations

import argparse
import importlib

WORKLOADS = {
    "w1": "benchmarks.w1_volatile",
    "w2": "benchmarks.w2_remote",
    "w3": "benchmarks.w3_persisted",
    "w4": "benchmarks.w4_failover",
    "w5": "benchmarks.w5_entities",
}


def main() -> None:
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
