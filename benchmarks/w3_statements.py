"""W3's two statements alone, in variants of the fence (a diagnostic).

``python -m benchmarks.w3_statements [--iterations 3000]
[--synchronous-commit off] [--driver]``: on one bare psycopg connection
(autocommit, statements prepared, ``plan_cache_mode=force_generic_plan`` as
the storage's pool), or with ``--driver`` on one connection of the
project's driver (`PgConnection`, as the W3 floor and the storage), in one
loop, each variant's request and reply statement of
a sequential persisted call (`_one_row.save_claimed`, `save_final_reply`)
and the W3 floor's two single-row inserts, in a shuffled order per
iteration; prints a Markdown table of the medians and of the WAL bytes each
statement wrote (``pg_current_wal_insert_lsn()`` before and after it:
other sessions' WAL would count too, so the median of 300).
The variants are of the SQL text only (no storage change):

* the statements as they are (the ``FOR SHARE`` fence on the shard's row);
* without the fence (a plain read of the epoch), or ``FOR KEY SHARE``;
* the fence as a transaction-level shared advisory lock taken by a statement
  of its own before the write, both pipelined with one Sync (one implicit
  transaction, one round trip), and the same pipeline with ``SELECT 1``
  instead of the lock (what the second statement costs by itself);
* the reply without the foreign key to its request (a second set of tables
  without it), without the update marking the request processed, and
  without fence, foreign key and update;
* the request as a plain ``INSERT ... VALUES`` of the same row (no read of
  the shard's row at all, no ``ON CONFLICT``): what the row costs by itself;
* the floor's two inserts, each behind the same ``FOR SHARE`` fence on the
  shard's row: what any message layout that keeps the fence pays at least.

Tables: the schema under the prefixes ``w3st_a`` and ``w3st_b``, dropped
before and after. The timings include the client's CPU (psycopg's pipeline
mode costs much more in the client than a plain statement; the project's
driver's less).
"""

from __future__ import annotations

import argparse
import random
import re
import statistics
import time
from collections.abc import Callable
from functools import partial
from typing import Any

import psycopg
import trio

from trio_cluster.storage._postgres import _one_row
from trio_cluster.storage._postgres._driver._driver import PgConnection
from trio_cluster.storage._postgres._schema import PgNames, migrate

from ._common import bench_dsn, drop_tables, progress

PAYLOAD = b"x" * 60
FLOOR = "floor (two single-row inserts)"
FENCED_FLOOR = "floor's inserts, each behind the `FOR SHARE` fence"
LOCK = "SELECT pg_advisory_xact_lock_shared($1::int4, $2::int4)"
ONE = "SELECT 1"
NOW = 1.8e9  # saved_at, processed_at: any time
Forms = dict[str, str]
Variant = tuple[Forms, str, str, "str | None"]


def _sql(query: str) -> str:
    # ``$n`` parameters as psycopg's named ones.
    return re.sub(r"\$(\d+)", r"%(p\1)s", query)


def _forms(names: PgNames) -> Forms:
    request = _one_row.save_claimed(names.messages, names.shards)
    reply = _one_row.save_final_reply(names.messages, names.replies, names.shards)
    update = re.search(r"\), touched AS \(.*?\n\), notes", reply, re.S)
    if "FOR SHARE OF sh" not in request + reply or update is None:
        raise RuntimeError("the statements changed: update the variants")
    reply_nolock = reply.replace("    FOR SHARE OF sh\n", "")
    return {
        "request": request,
        "reply": reply,
        "request_nolock": request.replace("FOR SHARE OF sh\n", ""),
        "reply_nolock": reply_nolock,
        "request_keyshare": request.replace("FOR SHARE", "FOR KEY SHARE"),
        "reply_keyshare": reply.replace("FOR SHARE", "FOR KEY SHARE"),
        "reply_noupdate": reply.replace(update.group(0), "), notes"),
        "reply_min": reply_nolock.replace(update.group(0), "), notes"),
        "request_values": f"""
INSERT INTO {names.messages} (request_id, shard_group, shard_number, entity_type,
    entity_id, tag, payload, primary_key, dedup, deliver_at, stream, claimed_epoch,
    saved_at, metadata, attempts)
VALUES ($1::int8, $2::text, $3::int4, $4::text, $5::text, $6::text, $7::bytea,
        $8::text, $9::bytea, NULL, $10::bool, $11::int8, $12::float8,
        $13::text::jsonb, 1)
RETURNING 0, NULL::int4, request_id, claimed_epoch, NULL::bytea""",
        "floor_fenced": f"""
INSERT INTO w3st_floor (id, payload)
SELECT $1::int8, $2::bytea FROM {names.shards} sh
WHERE sh.shard_group = 'g' AND sh.shard_number = 0 AND sh.epoch = $3::int8
FOR SHARE OF sh""",
    }


def _variants(a: Forms, b: Forms) -> dict[str, Variant]:
    return {
        "as now (`FOR SHARE` fence)": (a, "request", "reply", None),
        "no fence (plain epoch read)": (a, "request_nolock", "reply_nolock", None),
        "`FOR KEY SHARE` fence": (a, "request_keyshare", "reply_keyshare", None),
        "shared xact advisory lock, pipelined": (
            a,
            "request_nolock",
            "reply_nolock",
            LOCK,
        ),
        "no fence + `SELECT 1`, pipelined": (a, "request_nolock", "reply_nolock", ONE),
        "as now, reply without the foreign key": (b, "request", "reply", None),
        "as now, reply without the update": (a, "request", "reply_noupdate", None),
        "as now, request a plain `INSERT ... VALUES` (no epoch read)": (
            a,
            "request_values",
            "reply",
            None,
        ),
        "no fence, no foreign key, no update": (b, "request_nolock", "reply_min", None),
    }


async def _setup(dsn: str, a: PgNames, b: PgNames) -> None:
    for names in (a, b):
        drop_tables(dsn, names.prefix)
        await migrate(dsn, table_prefix=names.prefix)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("DROP TABLE IF EXISTS w3st_floor")
        conn.execute(
            "CREATE TABLE w3st_floor (id bigint PRIMARY KEY, payload bytea NOT NULL)"
        )
        row = conn.execute(
            "SELECT conname FROM pg_constraint"
            " WHERE conrelid = %s::regclass AND contype = 'f'",
            (b.replies,),
        ).fetchone()
        assert row is not None
        conn.execute(f"ALTER TABLE {b.replies} DROP CONSTRAINT {row[0]}")
        for names in (a, b):
            conn.execute(
                f"INSERT INTO {names.shards} (shard_group, shard_number, epoch, owner)"
                " VALUES ('g', 0, 1, 'r')"
            )


class _Loop:
    """The statements, through psycopg or (``driver``) the project's driver;
    the SQL has ``$n`` parameters."""

    def __init__(
        self,
        conn: psycopg.Connection[Any],
        driver: PgConnection | None,
        variants: dict[str, Variant],
        fenced_floor: str,
    ) -> None:
        self.conn, self.driver, self.variants, self.next_id = conn, driver, variants, 1
        self.floors = {
            FLOOR: ("INSERT INTO w3st_floor (id, payload) VALUES ($1, $2)", []),
            FENCED_FLOOR: (fenced_floor, [1]),  # $3: the shard's epoch
        }

    async def _run(self, query: str, values: list[object], pre: str | None) -> int:
        """Run ``query`` (after ``pre``, pipelined); return the rows it wrote
        or returned (the command tag's count)."""
        conn, driver = self.conn, self.driver
        if driver is not None:
            if pre is None:
                return (await driver.execute(query, values)).rowcount
            key = [7, 0] if pre == LOCK else []
            results = await driver.execute_pipeline([(pre, key), (query, values)])
            return results[1].rowcount
        params = {f"p{i}": value for i, value in enumerate(values, 1)}
        if pre is None:
            return conn.execute(_sql(query), params, prepare=True).rowcount
        with conn.pipeline():
            key_params = {"p1": 7, "p2": 0} if pre == LOCK else None
            conn.execute(_sql(pre), key_params, prepare=True)
            cursor = conn.execute(_sql(query), params, prepare=True)
        return cursor.rowcount

    async def pair(self, name: str, between: Callable[[], None]) -> None:
        """Run variant ``name``'s two statements; ``between`` before, between
        and after them."""
        rid, self.next_id = self.next_id, self.next_id + 1
        if name in self.floors:
            insert, more = self.floors[name]
            between()
            written = await self._run(insert, [2 * rid, PAYLOAD, *more], None)
            between()
            written += await self._run(insert, [2 * rid + 1, PAYLOAD, *more], None)
            between()
            if written != 2:
                raise RuntimeError(f"{name}: a statement wrote nothing")
            return
        forms, request, reply, pre = self.variants[name]
        saved = [
            rid,
            "g",
            0,
            "t",
            "e1",
            "tag",
            PAYLOAD,
            None,
            None,
            False,
            1,
            NOW,
            None,
        ]
        between()
        written = await self._run(forms[request], saved, pre)
        between()
        answer = [rid, "g", 0, 1, PAYLOAD, NOW, "c", False]
        written += await self._run(forms[reply], answer, pre)
        between()
        if written != 2:
            raise RuntimeError(f"{name}: a statement wrote nothing")


async def measure(
    dsn: str, iterations: int, synchronous_commit: str, *, driver: bool
) -> None:
    """Set up, run the loop, print the table, drop the tables."""
    a, b = PgNames.for_prefix("w3st_a"), PgNames.for_prefix("w3st_b")
    await _setup(dsn, a, b)
    forms = _forms(a)
    variants = _variants(forms, _forms(b))
    names = [FLOOR, FENCED_FLOOR, *variants]
    settings = {
        "plan_cache_mode": "force_generic_plan",
        "synchronous_commit": synchronous_commit,
    }
    try:
        with psycopg.connect(dsn, autocommit=True) as conn:
            for name, value in settings.items():
                conn.execute("SELECT set_config(%s, %s, false)", (name, value))
            ours = None
            if driver:
                ours = await PgConnection.connect(
                    dsn, application_name="w3_statements", settings=settings
                )
            try:
                loop = _Loop(conn, ours, variants, forms["floor_fenced"])
                times, wal = await _loop(conn, loop, names, iterations)
            finally:
                if ours is not None:
                    await ours.aclose()
    finally:
        for names_ in (a, b):
            drop_tables(dsn, names_.prefix)
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("DROP TABLE IF EXISTS w3st_floor")
    print(f"{'the project driver' if driver else 'psycopg'}, ", end="")
    _print(names, times, wal, iterations, synchronous_commit)


async def _loop(
    conn: psycopg.Connection[Any], loop: _Loop, names: list[str], iterations: int
) -> tuple[dict[str, list[tuple[int, int]]], dict[str, list[tuple[int, int]]]]:
    stamps: list[int] = []
    times: dict[str, list[tuple[int, int]]] = {n: [] for n in names}
    progress(f"w3_statements: {iterations} iterations of {len(names)} pairs")
    for i in range(iterations + 30):  # the first 30: warm-up
        order = names[:]
        random.shuffle(order)
        for name in order:
            stamps.clear()
            await loop.pair(name, lambda: stamps.append(time.perf_counter_ns()))
            if i >= 30:
                times[name].append((stamps[1] - stamps[0], stamps[2] - stamps[1]))
    lsn = "SELECT pg_current_wal_insert_lsn()::text"
    wal: dict[str, list[tuple[int, int]]] = {n: [] for n in names}
    lsns: list[str] = []

    def mark() -> None:
        row = conn.execute(lsn, prepare=True).fetchone()
        assert row is not None
        lsns.append(row[0])

    for _ in range(300):
        for name in names:
            lsns.clear()
            await loop.pair(name, mark)
            row = conn.execute(
                "SELECT %s::pg_lsn - %s::pg_lsn, %s::pg_lsn - %s::pg_lsn",
                (lsns[1], lsns[0], lsns[2], lsns[1]),
            ).fetchone()
            assert row is not None
            wal[name].append((int(row[0]), int(row[1])))
    return times, wal


def _print(
    names: list[str],
    times: dict[str, list[tuple[int, int]]],
    wal: dict[str, list[tuple[int, int]]],
    iterations: int,
    synchronous_commit: str,
) -> None:
    def med(values: list[tuple[int, int]], part: int | None) -> float:
        if part is None:
            return statistics.median(x + y for x, y in values)
        return statistics.median(v[part] for v in values)

    floor = med(times[FLOOR], None)
    print(f"synchronous_commit={synchronous_commit}, {iterations} iterations")
    print("| variant | request p50 | reply p50 | both p50 | / floor | WAL bytes |")
    print("|---|---|---|---|---|---|")
    for name in names:
        t, w = times[name], wal[name]
        print(
            f"| {name} | {med(t, 0) / 1e3:.0f} µs | {med(t, 1) / 1e3:.0f} µs"
            f" | {med(t, None) / 1e3:.0f} µs | {med(t, None) / floor:.2f}"
            f" | {med(w, 0):.0f} + {med(w, 1):.0f} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.w3_statements")
    parser.add_argument("--iterations", type=int, default=3000)
    parser.add_argument("--synchronous-commit", default="on", choices=["on", "off"])
    parser.add_argument(
        "--driver",
        action="store_true",
        help="the statements through the project's driver (PgConnection)",
    )
    args = parser.parse_args()
    run = partial(measure, driver=args.driver)
    trio.run(run, bench_dsn(), args.iterations, args.synchronous_commit)


if __name__ == "__main__":
    main()
