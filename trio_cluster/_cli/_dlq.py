"""``trio-cluster dlq``: the dead letters of a PostgreSQL cluster (command line).

* ``dlq list [--after ID] [--limit N]``: dead letters, oldest id first;
* ``dlq show ID``: one dead letter, with its payload (hex) and metadata;
* ``dlq replay ID...``: save each again as a new request (prints the new ids);
* ``dlq purge ID...`` or ``dlq purge --all``: delete them.

Each command opens a client-only runner (it serves no shard; registering
gives it a machine id, so the ids of replayed requests are unique
cluster-wide) on the cluster's storage, runs through
`trio_cluster.DeadLetterQueue`, and closes it. ``--json`` prints JSON.

Exit status: 0, 1 if the database failed (or ``show``/``replay`` found no
such dead letter), 2 for a bad DSN, prefix or argument.
"""

from __future__ import annotations

import sys
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from ._cluster import add_cluster_action, print_result, run_on_cluster

if TYPE_CHECKING:
    import argparse
    from collections.abc import Awaitable, Callable

    from .._operations._dead_letters import DeadLetterQueue
    from .._runner import Runner
    from .._storage_retries import DeadLetter

__all__ = ["add_dlq_parser"]


def add_dlq_parser(commands: Any) -> None:
    """Add ``dlq`` and its subcommands to the ``trio-cluster`` parser."""
    dlq = commands.add_parser(
        "dlq", help="list, show, replay or purge dead-lettered persisted requests"
    )
    actions = dlq.add_subparsers(dest="action", required=True)

    def action(name: str, help_text: str) -> argparse.ArgumentParser:
        parser = add_cluster_action(actions, name, help_text)
        return parser

    listing = action("list", "dead letters, oldest id first")
    listing.add_argument("--after", type=int, help="only ids above this one")
    listing.add_argument("--limit", type=int, default=100)
    listing.set_defaults(handler=_list)
    show = action("show", "one dead letter, with its payload")
    show.add_argument("id", type=int)
    show.set_defaults(handler=_show)
    replay = action("replay", "save dead letters again as new requests")
    replay.add_argument("ids", type=int, nargs="+", metavar="ID")
    replay.set_defaults(handler=_replay)
    purge = action("purge", "delete dead letters (the ids given, or --all)")
    purge.add_argument("ids", type=int, nargs="*", metavar="ID")
    purge.add_argument("--all", action="store_true", help="every dead letter")
    purge.set_defaults(handler=_purge)


def _summary(letter: DeadLetter) -> dict[str, Any]:
    return {
        "id": letter.request_id,
        "entity": f"{letter.entity_type}/{letter.entity_id}",
        "shard": f"{letter.shard.group}:{letter.shard.number}",
        "handler": letter.tag,
        "attempts": letter.attempts,
        "error": letter.error,
        "dead_at": datetime.fromtimestamp(letter.dead_at, UTC).isoformat(),
        "primary_key": letter.primary_key,
        "replayed_as": letter.replayed_as,
    }


def _detail(letter: DeadLetter) -> dict[str, Any]:
    return {
        **_summary(letter),
        "metadata": dict(letter.metadata),
        "payload_hex": letter.payload.hex(),
    }


def _line(letter: DeadLetter) -> str:
    s = _summary(letter)
    replayed = "" if s["replayed_as"] is None else f" replayed as {s['replayed_as']}"
    return (
        f"{s['id']}  {s['entity']}.{s['handler']}  {s['attempts']} attempt(s)"
        f"  {s['dead_at']}{replayed}\n    {s['error']}"
    )


def _run(
    args: argparse.Namespace, body: Callable[[DeadLetterQueue], Awaitable[int]]
) -> int:
    """Run ``body`` on the cluster's dead letters (see `run_on_cluster`)."""

    async def on_cluster(runner: Runner, storage: object) -> int:
        return await body(runner.dead_letters)

    code, result = run_on_cluster("dlq", args, on_cluster)
    return code if result is None else result


def _list(args: argparse.Namespace) -> int:
    async def body(queue: DeadLetterQueue) -> int:
        letters = await queue.list(after_id=args.after, limit=args.limit)
        text = "\n".join(_line(x) for x in letters) or "no dead letters"
        print_result(args, [_summary(x) for x in letters], text)
        return 0

    return _run(args, body)


def _show(args: argparse.Namespace) -> int:
    async def body(queue: DeadLetterQueue) -> int:
        letter = await queue.get(args.id)
        if letter is None:
            print(f"trio-cluster dlq: no dead letter {args.id}", file=sys.stderr)
            return 1
        detail = _detail(letter)
        text = "\n".join(f"{key}: {value}" for key, value in detail.items())
        print_result(args, detail, text)
        return 0

    return _run(args, body)


def _replay(args: argparse.Namespace) -> int:
    async def body(queue: DeadLetterQueue) -> int:
        replayed = {
            request_id: await queue.replay(request_id) for request_id in args.ids
        }
        lines = [
            f"{old} replayed as {new}"
            if new is not None
            else f"{old}: not replayed (no such dead letter, or replayed already)"
            for old, new in replayed.items()
        ]
        print_result(args, {str(k): v for k, v in replayed.items()}, "\n".join(lines))
        return 0 if all(new is not None for new in replayed.values()) else 1

    return _run(args, body)


def _purge(args: argparse.Namespace) -> int:
    if bool(args.ids) == bool(args.all):
        print("trio-cluster dlq purge: give dead letter ids, or --all", file=sys.stderr)
        return 2

    async def body(queue: DeadLetterQueue) -> int:
        purged = await queue.purge_all() if args.all else await queue.purge(args.ids)
        print_result(args, {"purged": purged}, f"{purged} dead letter(s) purged")
        return 0

    return _run(args, body)
