"""``trio-cluster events lag``: the event bus's subscriptions (command line).

Prints every subscription's cursor in each partition it has consumed, the
partition's end, the lag (events not yet consumed) and the events it gave
up on (``skipped``), read from the cluster's PostgreSQL storage with a
client-only runner (it serves no shard). ``--json`` prints JSON.

Exit status: 0, 1 if the database failed, 2 for a bad DSN, prefix or argument.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from ._cluster import add_cluster_action, run_on_cluster

if TYPE_CHECKING:
    import argparse

    from .._runner import Runner

__all__ = ["add_events_parser"]


def add_events_parser(commands: Any) -> None:
    """Add ``events`` and its subcommands to the ``trio-cluster`` parser."""
    events = commands.add_parser("events", help="the event bus's subscriptions")
    actions = events.add_subparsers(dest="action", required=True)
    lag = add_cluster_action(
        actions,
        "lag",
        "each subscription's cursor, lag and skipped events per partition",
    )
    lag.set_defaults(handler=_lag)


def _lag(args: argparse.Namespace) -> int:
    async def on_cluster(runner: Runner, storage: object) -> list[dict[str, Any]]:
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

    code, rows = run_on_cluster("events", args, on_cluster)
    if rows is None:
        return code
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
