"""``trio-cluster workflows``: a PostgreSQL cluster's workflow executions (command line).

* ``workflows list [--workflow NAME] [--status STATUS] [--after WORKFLOW/ID]
  [--limit N]``: executions in order of workflow and id, a page at a time
  (the last line says how to ask for the next page);
* ``workflows show WORKFLOW ID``: one execution: its status, error,
  problem, signals, argument, result and journal, values decoded;
* ``workflows signal WORKFLOW ID NAME [--payload JSON]``: send it a signal
  (the payload is a JSON value, given to the workflow's converter);
* ``workflows interrupt WORKFLOW ID [--reason TEXT]``: interrupt it (its
  compensations run);
* ``workflows resume WORKFLOW ID``: replay a suspended execution again;
* ``workflows purge --older-than AGE [--workflow NAME] [--limit N]``:
  delete finished executions (completed, failed, compensated) last saved
  more than AGE ago (``90s``, ``30m``, ``12h``, ``7d``; a number alone is
  seconds), at most N (1000) per run, with their stored messages; prints
  how many (run it again while it deletes N).

Each command opens a client-only runner on the cluster's storage (it serves
no shard), runs through `trio_cluster.workflows.WorkflowAdmin`, and closes
it; the workflows' code is not needed. ``signal``, ``interrupt`` and
``resume`` store their message and return: a runner that hosts the
workflow acts on it. They place the execution in its shard with the
``shards_per_group`` of ``TRIO_CLUSTER_SHARDS_PER_GROUP``, which must be
the cluster's (the command checks it against where the execution is
stored, and sends nothing if they differ). ``--json`` prints JSON.

Exit status: 0; 1 if the database failed or there is no such execution;
2 for a bad DSN, prefix, workflow name, status, cursor or payload.
"""

from __future__ import annotations

import json
import os
import sys
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from ._cluster import add_cluster_action, print_result, run_on_cluster

if TYPE_CHECKING:
    import argparse
    from collections.abc import Awaitable, Callable

    from .._runner import Runner
    from ..workflows import WorkflowAdmin, WorkflowExecution

__all__ = ["add_workflows_parser"]

STATUSES = (
    "not_started",
    "running",
    "waiting",
    "suspended",
    "compensating",
    "completed",
    "failed",
    "compensated",
)
"""`trio_cluster.workflows.Status` values (checked against it in the tests:
the parser is built without importing the workflows)."""

_SHOWN = frozenset({"error", "problem", "wake"})
"""Journal fields the text of ``show`` leaves out: in the summary above it,
or internal (the wake token)."""

_TIMES = frozenset({"until", "wake_at", "waiting_until", "saved_at"})
"""Fields that are Unix times: printed as ISO 8601."""


def add_workflows_parser(commands: Any) -> None:
    """Add ``workflows`` and its subcommands to the ``trio-cluster`` parser."""
    workflows = commands.add_parser(
        "workflows",
        help="list, show, signal, interrupt, resume or purge workflow executions",
    )
    actions = workflows.add_subparsers(dest="action", required=True)

    def action(name: str, help_text: str) -> argparse.ArgumentParser:
        parser = add_cluster_action(actions, name, help_text)
        return parser

    def one(name: str, help_text: str) -> argparse.ArgumentParser:
        parser = action(name, help_text)
        parser.add_argument("workflow", help="the workflow's name")
        parser.add_argument("execution_id", metavar="ID", help="the execution id")
        return parser

    listing = action("list", "executions, in order of workflow and id")
    listing.add_argument("--workflow", help="only this workflow's executions")
    listing.add_argument(
        "--status", choices=STATUSES, help="only those with this status"
    )
    listing.add_argument(
        "--after", metavar="WORKFLOW/ID", help="the page after this execution"
    )
    listing.add_argument("--limit", type=int, default=100)
    listing.set_defaults(handler=_list)
    one("show", "one execution, with its journal").set_defaults(handler=_show)
    signal = one("signal", "send an execution a signal")
    signal.add_argument("name", help="the signal's name")
    signal.add_argument(
        "--payload", default="null", help="the signal's value, as JSON (default null)"
    )
    signal.set_defaults(handler=_signal)
    interrupt = one("interrupt", "interrupt an execution (its compensations run)")
    interrupt.add_argument("--reason", default="", help="why (recorded)")
    interrupt.set_defaults(handler=_interrupt)
    one("resume", "replay a suspended execution again").set_defaults(handler=_resume)
    purge = action("purge", "delete finished executions older than an age")
    purge.add_argument(
        "--older-than",
        required=True,
        metavar="AGE",
        help="last saved before this long ago: 90s, 30m, 12h, 7d (seconds alone)",
    )
    purge.add_argument("--workflow", help="only this workflow's executions")
    purge.add_argument("--limit", type=int, default=1000)
    purge.set_defaults(handler=_purge)


def _fail(message: str, code: int) -> int:
    print(f"trio-cluster workflows: {message}", file=sys.stderr)
    return code


def _run(
    args: argparse.Namespace, body: Callable[[WorkflowAdmin], Awaitable[int]]
) -> int:
    """Run ``body`` on the cluster's executions (see `run_on_cluster`);
    `ExecutionNotFoundError` is exit status 1."""
    import trio_cluster as tc

    from .._core._config import ShardingConfig
    from ..workflows import ExecutionNotFoundError, WorkflowAdmin
    from ._security import ENV_VARIABLES

    try:
        config = ShardingConfig.from_env(
            os.environ, ignore=ENV_VARIABLES, shard_groups=()
        )
    except tc.ConfigError as exc:
        return _fail(" ".join(str(exc).split()), 2)

    async def on_cluster(runner: Runner, storage: object) -> int:
        try:
            return await body(WorkflowAdmin(runner))
        except ExecutionNotFoundError as exc:
            return _fail(str(exc), 1)

    code, result = run_on_cluster("workflows", args, on_cluster, config=config)
    return code if result is None else result


# ----------------------------------------------------------------------
# Rendering


def _time(seconds: float | None) -> str | None:
    return None if seconds is None else datetime.fromtimestamp(seconds, UTC).isoformat()


def _plain(value: Any, key: str = "") -> Any:
    """``value`` as JSON: bytes as hex, tuples as lists, times as ISO 8601."""
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, dict):
        return {str(k): _plain(v, str(k)) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(item) for item in value]
    if key in _TIMES and isinstance(value, int | float):
        return _time(value)
    return value


def _summary(execution: WorkflowExecution) -> dict[str, Any]:
    info = execution.info
    return {
        "workflow": execution.workflow,
        "execution_id": execution.execution_id,
        "status": None if execution.status is None else execution.status.value,
        "steps": None if info is None else info.steps,
        "error": None if info is None or info.error is None else str(info.error),
        "problem": execution.problem if info is None else info.problem,
        "waiting_until": None if info is None else _time(info.waiting_until),
        "version": execution.version,
        "saved_at": _time(execution.saved_at),
    }


def _detail(execution: WorkflowExecution, admin: WorkflowAdmin) -> dict[str, Any]:
    detail = {**_summary(execution), "shard": str(execution.shard)}
    if execution.journal is not None:
        journal = _plain(admin.journal_data(execution.journal))
        journal.pop("status", None)  # in the summary
        detail["journal"] = journal
    return detail


def _line(summary: dict[str, Any]) -> str:
    text = (
        f"{summary['workflow']}/{summary['execution_id']}  {summary['status']}"
        f"  {summary['steps']} operation(s)  saved {summary['saved_at']}"
    )
    if summary["waiting_until"]:
        text += f"  until {summary['waiting_until']}"
    for key in ("error", "problem"):
        if summary[key]:
            text += f"\n    {key}: {summary[key]}"
    return text


def _detail_text(detail: dict[str, Any]) -> str:
    lines = [
        f"{key}: {value}"
        for key, value in detail.items()
        if key != "journal" and value not in (None, "", [])
    ]
    journal = dict(detail.get("journal", {}))
    entries = journal.pop("entries", [])
    lines += [
        f"{key}: {json.dumps(value)}"
        for key, value in journal.items()
        if value not in (None, "", [], 0) and key not in _SHOWN
    ]
    lines.append(f"journal ({len(entries)} operation(s)):")
    for seq, entry in enumerate(entries):
        # Each operation at its position in the code's structure ("2.1.0":
        # a nursery's task's step), else its order in the journal.
        position = entry.get("position")
        at = ".".join(map(str, position)) if position else str(seq)
        head = f"  {at}  {entry.get('kind')} {entry.get('name')!r}"
        rest = [
            f"{key}={json.dumps(value)}"
            for key, value in entry.items()
            if key not in ("kind", "name", "position")
            and value not in (None, "", [])
            and (key, value) != ("attempts", 1)
        ]
        lines.append("  ".join([head, *rest]))
    return "\n".join(lines)


# ----------------------------------------------------------------------
# Commands


def _list(args: argparse.Namespace) -> int:
    from ..workflows import Status

    after = None
    if args.after is not None:
        workflow, slash, execution_id = args.after.partition("/")
        if not slash:
            return _fail(f"--after must be WORKFLOW/ID, got {args.after!r}", 2)
        after = (workflow, execution_id)
    status = None if args.status is None else Status(args.status)

    async def body(admin: WorkflowAdmin) -> int:
        page = await admin.list(
            workflow=args.workflow, status=status, after=after, limit=args.limit
        )
        summaries = [_summary(x) for x in page]
        text = "\n".join(_line(s) for s in summaries) or "no executions"
        if page and len(page) == args.limit:
            last = page[-1]
            text += f"\n(more: --after {last.workflow}/{last.execution_id})"
        print_result(args, summaries, text)
        return 0

    return _run(args, body)


def _show(args: argparse.Namespace) -> int:
    async def body(admin: WorkflowAdmin) -> int:
        execution = await admin.get(args.workflow, args.execution_id)
        if execution is None:
            return _fail(
                f"no execution {args.execution_id!r} of workflow {args.workflow!r}", 1
            )
        detail = _detail(execution, admin)
        print_result(args, detail, _detail_text(detail))
        return 0

    return _run(args, body)


def _signal(args: argparse.Namespace) -> int:
    try:
        payload = json.loads(args.payload)
    except ValueError as exc:
        return _fail(f"--payload is not JSON: {exc}", 2)

    async def body(admin: WorkflowAdmin) -> int:
        await admin.signal(args.workflow, args.execution_id, args.name, payload)
        _sent(args, "signal", name=args.name)
        return 0

    return _run(args, body)


def _interrupt(args: argparse.Namespace) -> int:
    async def body(admin: WorkflowAdmin) -> int:
        await admin.interrupt(args.workflow, args.execution_id, args.reason)
        _sent(args, "interrupt")
        return 0

    return _run(args, body)


def _resume(args: argparse.Namespace) -> int:
    async def body(admin: WorkflowAdmin) -> int:
        await admin.resume(args.workflow, args.execution_id)
        _sent(args, "resume")
        return 0

    return _run(args, body)


_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def age_seconds(text: str) -> float:
    """Seconds of an age such as ``90s``, ``30m``, ``12h``, ``7d`` or
    ``3600``.

    Raises:
        ValueError: not an age (or negative).
    """
    text = text.strip().lower()
    scale = _UNITS.get(text[-1:])
    number = text[:-1] if scale is not None else text
    try:
        value = float(number) * (scale or 1)
    except ValueError:
        raise ValueError(f"not an age: {text!r} (say 90s, 30m, 12h or 7d)") from None
    if not value >= 0 or value == float("inf"):
        raise ValueError(f"not an age: {text!r}")
    return value


def _purge(args: argparse.Namespace) -> int:
    try:
        older_than = age_seconds(args.older_than)
    except ValueError as exc:
        return _fail(f"--older-than: {exc}", 2)
    if args.limit < 1:
        return _fail(f"--limit must be >= 1, got {args.limit}", 2)

    async def body(admin: WorkflowAdmin) -> int:
        deleted = await admin.purge(
            older_than=older_than, workflow=args.workflow, limit=args.limit
        )
        more = " (the limit: run it again for more)" if deleted == args.limit else ""
        print_result(
            args,
            {"deleted": deleted, "older_than_s": older_than},
            f"deleted {deleted} finished execution(s){more}",
        )
        return 0

    return _run(args, body)


def _sent(args: argparse.Namespace, what: str, **extra: str) -> None:
    data = {
        "workflow": args.workflow,
        "execution_id": args.execution_id,
        "sent": what,
        **extra,
    }
    print_result(
        args,
        data,
        f"{what} stored for {args.workflow}/{args.execution_id}"
        " (a runner hosting the workflow runs it)",
    )
