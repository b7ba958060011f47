"""`cluster_status`: runners, shard map and backlog read from PostgreSQL (edge adapter).

What ``trio-cluster status`` prints. It needs no runner: it reads the
cluster's tables (`._schema`) and ``pg_locks`` over one short-lived
connection, with every query in one pipeline (one round trip). Liveness and
ownership come from the advisory locks, exactly as the runners see them
(`._runners`): a runner is *live* while its lock session holds its
liveness lock; a shard's *owner* is the live runner whose session holds the
shard's lock. Ages are measured against the database server's clock; the
backlog age needs schema version 2 (requests saved earlier have none).

The backlog is counted with one scan of the unprocessed requests: meant for
an operator or a monitoring probe every few seconds, not for a hot path.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import attrs

from trio_cluster._errors import PersistenceError

from ._driver._driver import PgConnection
from ._runner_queries import LOCKS_QUERY, RUNNER_KEY
from ._schema import LATEST_VERSION, PgNames, schema_version

if TYPE_CHECKING:
    from collections.abc import Sequence

__all__ = ["ClusterStatus", "RunnerStatus", "ShardStatus", "cluster_status"]


@attrs.frozen
class RunnerStatus:
    """One registered runner."""

    address: str
    """``host:port``; for a displaced registration (its address was taken
    over while its session lived) ``host (displaced)``."""
    machine_id: int
    """Its Snowflake machine id."""
    live: bool
    """Its lock session is alive (it holds its liveness lock)."""
    displaced: bool
    """A newer registration took its address over while its session lived:
    it is no longer a member, but keeps its machine id reserved."""
    groups: tuple[str, ...]
    """The shard groups it hosts."""
    weight: float
    """Its relative share of shards."""
    shards: int
    """Shards whose locks its session holds."""
    last_seen: float
    """Seconds since it last registered or heartbeat."""


@attrs.frozen
class ShardStatus:
    """One shard: who owns it, at which fencing epoch, and its backlog."""

    shard: str
    """``group:number``."""
    owner: str | None
    """Address of the live runner holding its lock; None if nobody does (or
    only a session without a registration)."""
    held: bool
    """Some session holds its lock."""
    epoch: int
    """Its fencing epoch (acquisitions so far; 0: never acquired)."""
    backlog: int
    """Unprocessed requests (without a final reply)."""
    in_flight: int
    """Of those, claimed by an owner (being handled, or to re-claim)."""
    scheduled: int
    """Of those, with a ``deliver_at`` still in the future."""
    oldest_age: float | None
    """Seconds since the oldest unprocessed request was saved; None if none
    (or saved before schema version 2)."""


@attrs.frozen
class ClusterStatus:
    """A snapshot of one cluster (one table prefix) in a database.

    `to_dict` gives plain JSON data; `render` a readable report.
    """

    prefix: str
    """The cluster's table prefix."""
    schema_version: int
    collected_at: float
    """The database server's clock (seconds since the Unix epoch)."""
    runners: tuple[RunnerStatus, ...]
    """Registered runners: live ones first, displaced ones last, by address."""
    shards: tuple[ShardStatus, ...]
    """Every shard ever acquired or with a backlog, by group and number."""

    @property
    def live_runners(self) -> int:
        return sum(runner.live for runner in self.runners)

    @property
    def backlog(self) -> int:
        """Unprocessed requests in every shard."""
        return sum(shard.backlog for shard in self.shards)

    @property
    def in_flight(self) -> int:
        return sum(shard.in_flight for shard in self.shards)

    @property
    def scheduled(self) -> int:
        return sum(shard.scheduled for shard in self.shards)

    @property
    def oldest_age(self) -> float | None:
        """Age of the oldest unprocessed request of the cluster, in seconds."""
        ages = [s.oldest_age for s in self.shards if s.oldest_age is not None]
        return max(ages, default=None)

    def to_dict(self) -> dict[str, Any]:
        """The status as JSON-serialisable data: its fields (records as
        dicts, sequences as tuples), plus ``totals``."""
        data = attrs.asdict(self)
        data["totals"] = {
            "runners": len(self.runners),
            "live_runners": self.live_runners,
            "shards": len(self.shards),
            "owned_shards": sum(shard.owner is not None for shard in self.shards),
            "backlog": self.backlog,
            "in_flight": self.in_flight,
            "scheduled": self.scheduled,
            "oldest_age": self.oldest_age,
        }
        return data

    def render(self) -> str:
        """A plain-text report: runners, the shard map, the backlog."""
        lines = [
            f"cluster {self.prefix!r} (schema version {self.schema_version})",
            "",
            f"runners: {self.live_runners} live, {len(self.runners)} registered",
        ]
        lines += _table(
            ("ADDRESS", "MACHINE", "LIVE", "SHARDS", "WEIGHT", "GROUPS", "SEEN"),
            [
                (
                    r.address,
                    str(r.machine_id),
                    "yes" if r.live else "no",
                    str(r.shards),
                    f"{r.weight:g}",
                    ",".join(r.groups),
                    f"{_age(r.last_seen)} ago",
                )
                for r in self.runners
            ],
        )
        owned = sum(shard.owner is not None for shard in self.shards)
        lines += ["", f"shards: {len(self.shards)} known, {owned} owned by a runner"]
        lines += _table(
            ("SHARD", "OWNER", "EPOCH", "BACKLOG", "IN FLIGHT", "SCHEDULED", "OLDEST"),
            [
                (
                    s.shard,
                    s.owner or ("(unregistered)" if s.held else "-"),
                    str(s.epoch),
                    str(s.backlog),
                    str(s.in_flight),
                    str(s.scheduled),
                    "-" if s.oldest_age is None else _age(s.oldest_age),
                )
                for s in self.shards
            ],
        )
        oldest = self.oldest_age
        lines += [
            "",
            f"backlog: {self.backlog} unprocessed ({self.in_flight} in flight,"
            f" {self.scheduled} scheduled), oldest"
            f" {'-' if oldest is None else _age(oldest)}",
        ]
        return "\n".join(lines)


def _age(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f}s"
    if seconds < 3600:
        return f"{seconds / 60:.1f}m"
    return f"{seconds / 3600:.1f}h"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    if not rows:
        return ["  (none)"]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    return [
        "  "
        + "  ".join(
            cell.ljust(width) for cell, width in zip(row, widths, strict=True)
        ).rstrip()
        for row in [header, *rows]
    ]


def _queries(n: PgNames) -> list[str]:
    r, s, m = n.runners, n.shards, n.messages
    return [
        "SELECT extract(epoch FROM clock_timestamp())::float8",
        f"""
WITH locks AS MATERIALIZED ({LOCKS_QUERY})
SELECT r.host, r.port, r.machine_id, r.groups, r.weight,
       EXISTS (SELECT 1 FROM locks l WHERE l.key = {RUNNER_KEY}),
       (SELECT count(*) FROM locks l JOIN {s} sh ON l.key = sh.id
        WHERE l.pid IN (SELECT x.pid FROM locks x WHERE x.key = {RUNNER_KEY})),
       extract(epoch FROM clock_timestamp() - r.seen_at)::float8
FROM {r} r""",
        f"""
WITH locks AS MATERIALIZED ({LOCKS_QUERY}),
holders AS (
    SELECT l.pid, r.host, r.port FROM locks l JOIN {r} r ON l.key = {RUNNER_KEY}
    WHERE r.port >= 0
)
SELECT s.shard_group, s.shard_number, s.epoch, h.host, h.port, l.pid IS NOT NULL
FROM {s} s
LEFT JOIN locks l ON l.key = s.id
LEFT JOIN holders h ON h.pid = l.pid""",
        f"""
SELECT shard_group, shard_number, count(*),
       count(*) FILTER (WHERE claimed_epoch IS NOT NULL),
       count(*) FILTER (WHERE deliver_at > $1::float8),
       min(saved_at)
FROM {m} WHERE processed_at IS NULL
GROUP BY shard_group, shard_number""",
    ]


async def cluster_status(
    dsn: str, *, table_prefix: str = "trio_cluster"
) -> ClusterStatus:
    """Read the status of the cluster with ``table_prefix`` from the database.

    Args:
        dsn: A libpq connection string or URI.
        table_prefix: The cluster's table prefix.

    Returns:
        Runners (live or not, machine ids, shards held), every known shard
        with owner, epoch and backlog, as of now.

    Raises:
        ConfigError: a malformed DSN or table prefix.
        PersistenceError: the database failed, or has no schema for this
            prefix (run ``trio-cluster migrate``), or a newer one.

    On cancellation the connection is closed; nothing was written.
    """
    names = PgNames.for_prefix(table_prefix)
    conn = await PgConnection.connect(dsn, application_name="trio_cluster status")
    async with conn:
        version = await schema_version(conn, names)
        if version == 0:
            raise PersistenceError(
                f"no trio_cluster schema with table prefix {names.prefix!r} in this"
                " database: run `trio-cluster migrate` (or start a runner)"
            )
        if version > LATEST_VERSION:
            raise PersistenceError(
                f"the trio_cluster schema with table prefix {names.prefix!r} is at"
                f" version {version}, newer than this version of trio_cluster"
                f" knows ({LATEST_VERSION}): upgrade trio_cluster"
            )
        clock, runners, shards, backlog = _queries(names)
        now = (await conn.execute(clock, prepare=False)).rows[0][0]
        lock_class = names.namespace & 0xFFFF_FFFF
        results = await conn.execute_pipeline(
            [(runners, [lock_class]), (shards, [lock_class]), (backlog, [now])],
            prepare=False,
        )
    return _build(names.prefix, version, now, *(result.rows for result in results))


def _build(
    prefix: str,
    version: int,
    now: float,
    runner_rows: list[tuple[Any, ...]],
    shard_rows: list[tuple[Any, ...]],
    backlog_rows: list[tuple[Any, ...]],
) -> ClusterStatus:
    runners = [
        RunnerStatus(
            address=f"{host} (displaced)" if port < 0 else _address(host, port),
            machine_id=machine_id,
            live=live,
            displaced=port < 0,
            groups=tuple(groups),
            weight=weight,
            shards=held if live else 0,
            last_seen=max(0.0, seen),
        )
        for host, port, machine_id, groups, weight, live, held, seen in runner_rows
    ]
    runners.sort(key=lambda r: (not r.live, r.displaced, r.address))
    map_: dict[tuple[str, int], dict[str, Any]] = {}
    for group, number, epoch, host, port, held in shard_rows:
        owner = None if host is None else _address(host, port)
        map_[group, number] = {"owner": owner, "held": held, "epoch": epoch}
    empty = {"owner": None, "held": False, "epoch": 0}
    for group, number, count, claimed, scheduled, oldest in backlog_rows:
        entry = map_.setdefault((group, number), dict(empty))
        entry.update(
            backlog=count,
            in_flight=claimed,
            scheduled=scheduled,
            oldest_age=None if oldest is None else max(0.0, now - oldest),
        )
    shards = [
        ShardStatus(
            shard=f"{group}:{number}",
            owner=entry["owner"],
            held=entry["held"],
            epoch=entry["epoch"],
            backlog=entry.get("backlog", 0),
            in_flight=entry.get("in_flight", 0),
            scheduled=entry.get("scheduled", 0),
            oldest_age=entry.get("oldest_age"),
        )
        for (group, number), entry in sorted(map_.items())
    ]
    return ClusterStatus(prefix, version, now, tuple(runners), tuple(shards))


def _address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
