"""``trio-cluster events lag``: the event bus's subscriptions (command line).

Prints every subscription's cursor in each partition it has consumed, the
partition's end, the lag (events not yet consumed) and the events it gave
up on (``skipped``), read from the cluster's PostgreSQL storage with a
client-only runner (it serves no shard). ``--json`` prints JSON.

Exit status: 0, 1 if the database failed, 2 for a bad DSN, prefix or argument.
"""

from __future__ import annotations

import json
import sys
from typing import TYPE_CHECKING, Any

import trio

if TYPE_CHECKING:
    import argparse

__all__ = ["add_events_parser"]


def add_events_parser(commands: Any) -> None:
    """Add ``events`` and its subcommands to the ``trio-cluster`` parser."""
    events = commands.add_parser("events", help="the event bus's subscriptions")
    actions = events.add_subparsers(dest="action", required=True)
    lag = actions.add_parser(
        "lag", help="each subscription's cursor, lag and skipped events per partition"
    )
    lag.add_argument("--dsn", required=True, help="PostgreSQL connection string")
    lag.add_argument("--prefix", default="trio_cluster")
    lag.add_argument("--json", action="store_true", help="machine-readable output")
    lag.set_defaults(handler=_lag)


def _lag(args: argparse.Namespace) -> int:
    import trio_cluster as tc

    from ..storage import PostgresStorage

    async def main() -> list[dict[str, Any]]:
        storage = PostgresStorage(
            args.dsn, table_prefix=args.prefix, pool_size=1, auto_migrate=False
        )
        config = tc.ShardingConfig(shard_groups=())
        async with tc.open_runner(storage=storage, config=config) as runner:
            positions = await runner.event_storage.all_positions()
        return [
            {
                "subscription": p.subscription,
                "topic": p.topic,
                "partition": p.partition,
                "cursor": p.cursor,
                "end": p.end,
                "lag": p.lag,
                "skipped": p.skipped,
            }
            for p in positions
        ]

    try:
        rows = trio.run(main)
    except (tc.ConfigError, TypeError, ValueError) as exc:
        print(f"trio-cluster events: {exc}", file=sys.stderr)
        return 2
    except tc.PersistenceError as exc:
        print(f"trio-cluster events: the database failed: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(rows))
        return 0
    print("subscription  topic  partition  cursor  end  lag  skipped")
    for row in rows:
        print(
            f"{row['subscription']}  {row['topic']}  {row['partition']}"
            f"  {row['cursor']}  {row['end']}  {row['lag']}  {row['skipped']}"
        )
    return 0
