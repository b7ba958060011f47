"""`cluster_status` and the ``trio-cluster migrate`` / ``status`` commands, on a real server."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

import pytest
import trio

from tests.pg_fixture import TIMEOUT, unique_prefix
from trio_cluster import PersistenceError
from trio_cluster._cli._main import main
from trio_cluster.storage import ClusterStatus, PostgresStorage, cluster_status, migrate
from trio_cluster.storage._postgres._driver._driver import PgConnection
from trio_cluster.storage._postgres._schema import LATEST_VERSION
from trio_cluster.testing import (
    BASE_TIME,
    acquire_shards,
    conformance_shard,
    final_reply,
    persisted_request,
    runner_info,
)

if TYPE_CHECKING:
    from tests.pg_fixture import PgAdmin, PgSchema

pytestmark = pytest.mark.postgres

LEASE = 2.0


async def server_time(dsn: str) -> float:
    """The database server's clock, which status ages are measured against."""
    conn = await PgConnection.connect(dsn, application_name="test clock")
    async with conn:
        result = await conn.execute(
            "SELECT extract(epoch FROM clock_timestamp())::float8", prepare=False
        )
    return float(result.rows[0][0])


async def test_status_of_a_running_cluster(
    pg_schema: PgSchema, pg_admin: PgAdmin
) -> None:
    prefix = unique_prefix()
    storage = PostgresStorage(pg_schema.dsn, table_prefix=prefix)
    one, two, three = conformance_shard(1), conformance_shard(2), conformance_shard(3)
    with trio.fail_after(TIMEOUT):
        async with (
            storage.open_session(name="st-a", lease_duration=LEASE) as a,
            storage.open_session(name="st-b", lease_duration=LEASE) as b,
            storage.open_session(name="st-c", lease_duration=LEASE) as c,
        ):
            id_a = await a.runners.register(runner_info(7001))
            id_b = await b.runners.register(runner_info(7002, weight=2.0))
            await c.runners.register(runner_info(7003))
            epochs = await acquire_shards(a.runners, one, two)
            await acquire_shards(c.runners, three)
            # Requests: shard 1 has 3 (one processed, one claimed, one
            # scheduled), shard 4 (never acquired) has 1. Saved 10 s ago.
            now = await server_time(pg_schema.dsn)
            batch = [
                persisted_request(1, shard_id=one),
                persisted_request(2, shard_id=one),
                persisted_request(3, shard_id=one, deliver_at=now + 3600),
                persisted_request(4, shard_id=conformance_shard(4)),
            ]
            await a.messages.save_requests(batch, now=now - 10)
            claimed = await a.messages.claim({one: epochs[one]}, now=now, limit=1)
            assert [r.request_id for r in claimed.requests] == [1]
            await a.messages.save_requests(
                [persisted_request(5, shard_id=one)], now=now
            )
            await a.messages.save_replies(
                [final_reply(5, epochs[one], shard_id=one)], now=now
            )
            # c's session dies: it stays registered but is not live any more.
            pid = c.runners.locks.backend_pid  # type: ignore[attr-defined]
            assert pg_admin.terminate(pid=pid) == 1

            status = await cluster_status(pg_schema.dsn, table_prefix=prefix)

    assert isinstance(status, ClusterStatus)
    assert (status.prefix, status.schema_version) == (prefix, LATEST_VERSION)
    runners = [
        (r.address, r.machine_id, r.live, r.shards, r.weight) for r in status.runners
    ]
    assert runners == [
        ("10.0.0.1:7001", id_a, True, 2, 1.0),
        ("10.0.0.1:7002", id_b, True, 0, 2.0),
        ("10.0.0.1:7003", runners[2][1], False, 0, 1.0),
    ]
    assert all(0 <= r.last_seen < 30 for r in status.runners)
    by_shard = {s.shard: s for s in status.shards}
    assert sorted(by_shard) == [
        "conformance:1",
        "conformance:2",
        "conformance:3",
        "conformance:4",
    ]
    s1, s2, s3, s4 = (by_shard[f"conformance:{n}"] for n in range(1, 5))
    assert (s1.owner, s1.held, s1.epoch) == ("10.0.0.1:7001", True, epochs[one])
    assert (s1.backlog, s1.in_flight, s1.scheduled) == (3, 1, 1)
    assert s1.oldest_age is not None
    assert 9 < s1.oldest_age < 60
    assert (s2.owner, s2.backlog, s2.oldest_age) == ("10.0.0.1:7001", 0, None)
    assert (s3.owner, s3.held, s3.epoch) == (None, False, 1)  # c's session died
    assert (s4.owner, s4.epoch, s4.backlog, s4.in_flight) == (None, 0, 1, 0)
    assert (status.backlog, status.in_flight, status.scheduled) == (4, 1, 1)

    data = json.loads(json.dumps(status.to_dict()))
    assert data["totals"]["backlog"] == 4
    assert data["totals"]["live_runners"] == 2
    assert data["runners"][0]["address"] == "10.0.0.1:7001"
    assert data["shards"][0]["shard"] == "conformance:1"

    text = status.render()
    assert f"cluster {prefix!r}" in text
    assert "runners: 2 live, 3 registered" in text
    assert "backlog: 4 unprocessed (1 in flight, 1 scheduled)" in text
    line = next(x for x in text.splitlines() if x.strip().startswith("conformance:1 "))
    assert line.split()[:4] == ["conformance:1", "10.0.0.1:7001", str(epochs[one]), "3"]


async def test_status_of_an_empty_cluster(pg_schema: PgSchema) -> None:
    prefix = unique_prefix()
    with trio.fail_after(TIMEOUT):
        await migrate(pg_schema.dsn, table_prefix=prefix)
        status = await cluster_status(pg_schema.dsn, table_prefix=prefix)
    assert (status.runners, status.shards, status.backlog) == ((), (), 0)
    assert status.oldest_age is None
    assert "runners: 0 live, 0 registered\n  (none)" in status.render()
    assert status.to_dict()["totals"]["oldest_age"] is None


async def test_status_without_a_schema_says_to_migrate(pg_schema: PgSchema) -> None:
    with (
        trio.fail_after(TIMEOUT),
        pytest.raises(PersistenceError, match="trio-cluster migrate"),
    ):
        await cluster_status(pg_schema.dsn, table_prefix=unique_prefix())


async def test_status_counts_displaced_registrations(pg_schema: PgSchema) -> None:
    prefix = unique_prefix()
    storage = PostgresStorage(pg_schema.dsn, table_prefix=prefix)
    with trio.fail_after(TIMEOUT):
        async with (
            storage.open_session(name="d-a", lease_duration=LEASE) as a,
            storage.open_session(name="d-b", lease_duration=LEASE) as b,
        ):
            first = await a.runners.register(runner_info(7001))
            second = await b.runners.register(runner_info(7001))
            status = await cluster_status(pg_schema.dsn, table_prefix=prefix)
    assert [(r.address, r.machine_id, r.live) for r in status.runners] == [
        ("10.0.0.1:7001", second, True),
        ("10.0.0.1 (displaced)", first, True),
    ]


# ----------------------------------------------------------------------
# The command line


def test_cli_migrate_then_status(
    pg_schema: PgSchema, capsys: pytest.CaptureFixture[str]
) -> None:
    prefix = unique_prefix()
    assert main(["migrate", "--dsn", pg_schema.dsn, "--prefix", prefix]) == 0
    assert (
        capsys.readouterr().out == f"schema {prefix!r} is at version {LATEST_VERSION}\n"
    )
    assert (
        main(["migrate", "--dsn", pg_schema.dsn, "--prefix", prefix]) == 0
    )  # idempotent
    capsys.readouterr()

    async def populate() -> None:
        storage = PostgresStorage(
            pg_schema.dsn, table_prefix=prefix, auto_migrate=False
        )
        async with storage.open_session(name="cli", lease_duration=LEASE) as a:
            await a.messages.save_requests([persisted_request(1)], now=BASE_TIME)

    trio.run(populate)
    assert main(["status", "--dsn", pg_schema.dsn, "--prefix", prefix]) == 0
    text = capsys.readouterr().out
    assert f"cluster {prefix!r} (schema version {LATEST_VERSION})" in text
    assert "backlog: 1 unprocessed" in text

    assert main(["status", "--dsn", pg_schema.dsn, "--prefix", prefix, "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["prefix"] == prefix
    assert data["totals"]["backlog"] == 1
    assert [s["shard"] for s in data["shards"]] == ["conformance:1"]


def test_cli_reports_database_errors_without_a_traceback(
    pg_schema: PgSchema, capsys: pytest.CaptureFixture[str]
) -> None:
    prefix = unique_prefix()
    assert main(["status", "--dsn", pg_schema.dsn, "--prefix", prefix]) == 1
    captured = capsys.readouterr()
    assert "trio-cluster migrate" in captured.err
    assert "Traceback" not in captured.err
    assert main(["migrate", "--dsn", pg_schema.dsn, "--prefix", "Bad-Prefix"]) == 2
    assert "table_prefix" in capsys.readouterr().err
    dead = "host=127.0.0.1 port=1 dbname=test connect_timeout=2"
    assert main(["migrate", "--dsn", dead, "--prefix", prefix]) == 1
    captured = capsys.readouterr()
    assert captured.err.startswith("trio-cluster migrate: ")
    assert "port 1" in captured.err
