"""``trio-cluster webhooks``: attempts and replays of a PostgreSQL cluster's
webhooks (command line).

* ``webhooks attempts (--message ID | --endpoint ID) [--limit N]``: the most
  recent attempts, oldest first: when, outcome, HTTP status, latency, error
  and when the next one is due;
* ``webhooks dead``: the deliveries in the dead letters;
* ``webhooks replay MESSAGE_ID [--endpoint ID]``: deliver a dead message
  again from the first attempt (and delete its dead letters).

``--name`` is the `Webhooks` part's name (``default``). Each command opens a
client-only runner on the cluster's storage (it serves no shard), runs
through `trio_cluster.webhooks.WebhookClient`, and closes it. ``--json``
prints JSON.

Exit status: 0, 1 if the database failed (or ``replay`` found nothing to
replay), 2 for a bad DSN, prefix or argument.
"""

from __future__ import annotations

import sys
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from ._cluster import add_cluster_action, print_result, run_on_cluster

if TYPE_CHECKING:
    import argparse
    from collections.abc import Awaitable, Callable

    from .._runner import Runner
    from ..abc import AttemptRecord
    from ..storage import PostgresStorage
    from ..webhooks import WebhookClient

__all__ = ["add_webhooks_parser"]


def add_webhooks_parser(commands: Any) -> None:
    """Add ``webhooks`` and its subcommands to the ``trio-cluster`` parser."""
    webhooks = commands.add_parser(
        "webhooks", help="webhook attempts, dead deliveries and replays"
    )
    actions = webhooks.add_subparsers(dest="action", required=True)

    def action(name: str, help_text: str) -> argparse.ArgumentParser:
        parser = add_cluster_action(actions, name, help_text)
        parser.add_argument("--name", default="default", help="the Webhooks part")
        return parser

    attempts = action("attempts", "attempts of a message or an endpoint")
    attempts.add_argument("--message", help="a message id (webhook-id)")
    attempts.add_argument("--endpoint", help="an endpoint id")
    attempts.add_argument("--limit", type=int, default=100)
    attempts.set_defaults(handler=_attempts)
    dead = action("dead", "deliveries in the dead letters")
    dead.set_defaults(handler=_dead)
    replay = action("replay", "deliver a dead message again, from the first attempt")
    replay.add_argument("message", metavar="MESSAGE_ID")
    replay.add_argument("--endpoint", help="only to this endpoint")
    replay.set_defaults(handler=_replay)


def _time(seconds: float | None) -> str | None:
    return None if seconds is None else datetime.fromtimestamp(seconds, UTC).isoformat()


def _attempt(record: AttemptRecord) -> dict[str, Any]:
    return {
        "message": record.message_id,
        "endpoint": record.endpoint_id,
        "attempt": record.attempt,
        "at": _time(record.at),
        "outcome": record.outcome,
        "status": record.status,
        "latency": round(record.latency, 6),
        "error": record.error,
        "next_at": _time(record.next_at),
    }


def _line(item: dict[str, Any]) -> str:
    status = "" if item["status"] is None else f" HTTP {item['status']}"
    error = "" if item["error"] is None else f" ({item['error']})"
    later = "" if item["next_at"] is None else f", next at {item['next_at']}"
    return (
        f"{item['at']}  {item['message']} -> {item['endpoint']}  attempt"
        f" {item['attempt']}: {item['outcome']}{status}{error}"
        f" in {item['latency'] * 1000:.1f} ms{later}"
    )


def _run(
    args: argparse.Namespace, body: Callable[[WebhookClient], Awaitable[int]]
) -> int:
    """Open the part on the cluster's storage (see `run_on_cluster`), run
    ``body``."""
    from ..webhooks import Webhooks

    part = Webhooks(name=args.name)

    async def on_cluster(runner: Runner, storage: PostgresStorage) -> int:
        async with part.open(runner, storage) as client:
            return await body(client)

    code, result = run_on_cluster("webhooks", args, on_cluster, entities=part.entities)
    return code if result is None else result


def _attempts(args: argparse.Namespace) -> int:
    if args.message is None and args.endpoint is None:
        print(
            "trio-cluster webhooks attempts: give --message, --endpoint or both",
            file=sys.stderr,
        )
        return 2

    async def body(client: WebhookClient) -> int:
        found = await client.attempts(
            message_id=args.message, endpoint_id=args.endpoint, limit=args.limit
        )
        items = [_attempt(record) for record in found]
        print_result(args, items, "\n".join(map(_line, items)) or "no attempts")
        return 0

    return _run(args, body)


def _dead(args: argparse.Namespace) -> int:
    async def body(client: WebhookClient) -> int:
        items = [
            {
                "dead_letter": letter_id,
                "message": dead.message.message_id,
                "endpoint": dead.endpoint_id,
                "event_type": dead.message.event_type,
                "error": dead.error,
            }
            for letter_id, dead in await client.dead_deliveries()
        ]
        text = "\n".join(
            f"{i['message']} -> {i['endpoint']} ({i['event_type']}): {i['error']}"
            for i in items
        )
        print_result(args, items, text or "no dead deliveries")
        return 0

    return _run(args, body)


def _replay(args: argparse.Namespace) -> int:
    async def body(client: WebhookClient) -> int:
        replayed = await client.replay(args.message, endpoint_id=args.endpoint)
        print_result(
            args,
            {"replayed": replayed},
            f"{replayed} deliver{'y' if replayed == 1 else 'ies'} replayed",
        )
        return 0 if replayed else 1

    return _run(args, body)
