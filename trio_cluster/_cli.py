"""The ``trio-cluster`` command line (also ``python -m trio_cluster``)."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import TYPE_CHECKING

import trio

if TYPE_CHECKING:
    from collections.abc import Sequence

__all__ = ["main"]


def _demo(args: argparse.Namespace) -> int:
    from ._demo import run_demo

    # The tour crashes an entity on purpose: keep its traceback off the screen.
    logging.getLogger("trio_cluster").setLevel(logging.CRITICAL)
    trio.run(run_demo)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="trio-cluster",
        description="Distributed, persistent actors for Trio.",
    )
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser(
        "demo",
        help="a self-contained tour on memory storage (entities, persistence, streams, crashes)",
    )
    demo.set_defaults(handler=_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``trio-cluster`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.handler(args))
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
