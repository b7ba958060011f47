"""Commands that act on a running cluster's storage (CLI).

`run_on_cluster` opens what ``trio-cluster dlq``, ``events`` and
``webhooks`` need: a client-only runner (it serves no shard) on the
cluster's PostgreSQL storage (``--dsn``, ``--prefix``; never migrated from
here), and turns failures into one line on stderr and an exit status.
"""

from __future__ import annotations

import json
import sys
from typing import TYPE_CHECKING, Any, TypeVar

import trio

if TYPE_CHECKING:
    import argparse
    from collections.abc import Awaitable, Callable, Sequence

    from .._core._config import ShardingConfig
    from .._entity import Entity
    from .._runner import Runner
    from ..storage import PostgresStorage

__all__ = ["add_cluster_action", "print_result", "run_on_cluster"]

T = TypeVar("T")


def add_cluster_action(
    actions: Any, name: str, help_text: str
) -> argparse.ArgumentParser:
    """Add subcommand ``name`` to ``actions`` (a command's subparsers) with
    the options `run_on_cluster` and `print_result` read: ``--dsn``,
    ``--prefix`` and ``--json``."""
    parser: argparse.ArgumentParser = actions.add_parser(name, help=help_text)
    parser.add_argument("--dsn", required=True, help="PostgreSQL connection string")
    parser.add_argument("--prefix", default="trio_cluster")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    return parser


def run_on_cluster(
    command: str,
    args: argparse.Namespace,
    body: Callable[[Runner, PostgresStorage], Awaitable[T]],
    *,
    entities: Sequence[type[Entity]] = (),
    config: ShardingConfig | None = None,
) -> tuple[int, T | None]:
    """Run ``body(runner, storage)`` on a client-only runner hosting
    ``entities`` (for their clients) on the cluster's storage; ``config``
    is its config (it must host no shard group; default: the defaults).

    Returns:
        ``(0, result)``; or, after one line on stderr naming ``command``,
        ``(2, None)`` for a bad DSN, prefix or argument (`ConfigError`,
        `TypeError`, `ValueError`) and ``(1, None)`` if the database failed
        (`PersistenceError`).
    """
    import trio_cluster as tc

    from ..storage import PostgresStorage

    async def main() -> T:
        storage = PostgresStorage(
            args.dsn, table_prefix=args.prefix, pool_size=1, auto_migrate=False
        )
        async with tc.open_runner(
            entities=entities,
            storage=storage,
            config=tc.ShardingConfig(shard_groups=()) if config is None else config,
        ) as runner:
            return await body(runner, storage)

    try:
        return 0, trio.run(main)
    except (tc.ConfigError, TypeError, ValueError, tc.PersistenceError) as exc:
        print(f"trio-cluster {command}: {' '.join(str(exc).split())}", file=sys.stderr)
        return (1 if isinstance(exc, tc.PersistenceError) else 2), None


def print_result(args: argparse.Namespace, data: Any, text: str) -> None:
    """Print ``data`` as JSON with ``--json``, else ``text``."""
    print(json.dumps(data, indent=2) if args.json else text)
