"""``trio-cluster workflows`` against a real PostgreSQL database: executions
listed by workflow and status a page at a time, shown with their journal,
and signalled, interrupted and resumed by name, then acted on by a runner
that hosts the workflows."""

from __future__ import annotations

import json
import uuid
from typing import TYPE_CHECKING

import pytest
import trio

import trio_cluster as tc
from trio_cluster._cli._main import main
from trio_cluster._cli._workflows import STATUSES, age_seconds
from trio_cluster.storage import PostgresStorage
from trio_cluster.workflows import (
    Status,
    WorkflowContext,
    WorkflowFailedError,
    workflow,
)

if TYPE_CHECKING:
    from tests.pg_fixture import PgSchema

pytestmark = pytest.mark.postgres

NO_RETRY = tc.RetryPolicy(max_attempts=1)
SHARDS = 8
"""The cluster's shards_per_group (not the default: the commands must be
told, through TRIO_CLUSTER_SHARDS_PER_GROUP)."""
UNDONE: list[str] = []


async def reserve(item: str) -> str:
    return f"r-{item}"


async def release(item: str, reservation: str) -> None:
    UNDONE.append(reservation)
    if item == "flaky" and UNDONE.count(reservation) == 1:
        raise RuntimeError("the stock service is down")


async def charge(amount: int) -> str:
    if amount > 100:
        raise ValueError("declined")
    return f"c-{amount}"


@workflow(name="cli.order", retry=NO_RETRY)
async def cli_order(ctx: WorkflowContext, amount: int) -> str:
    await ctx.step(reserve, "item", compensate=release)
    await ctx.step(charge, amount)
    confirmed = await ctx.wait_signal("confirm", dict[str, int])
    return f"confirmed {confirmed['by']}"


@workflow(name="cli.flaky", retry=NO_RETRY)
async def cli_flaky(ctx: WorkflowContext, amount: int) -> str:
    await ctx.step(reserve, "flaky", compensate=release)
    return await ctx.step(charge, amount)


ENTITIES = [cli_order.entity, cli_flaky.entity]


def _config() -> tc.ShardingConfig:
    return tc.ShardingConfig(shards_per_group=SHARDS)


def cli(dsn: str, prefix: str, *args: str) -> int:
    return main(["workflows", args[0], "--dsn", dsn, "--prefix", prefix, *args[1:]])


def test_statuses_are_the_workflow_statuses() -> None:
    assert tuple(s.value for s in Status) == STATUSES


def test_workflows_commands_on_postgres(
    pg_schema: PgSchema,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    dsn, prefix = pg_schema.dsn, f"cli_{uuid.uuid4().hex[:10]}"
    UNDONE.clear()

    async def populate() -> None:
        storage = PostgresStorage(dsn, table_prefix=prefix)
        async with tc.open_runner(
            entities=ENTITIES, storage=storage, config=_config()
        ) as runner:
            orders = cli_order.client(runner)
            with trio.fail_after(60):
                for n, amount in enumerate([10, 500, 20], start=1):
                    await orders.start(amount, execution_id=f"o{n}")
                with pytest.raises(WorkflowFailedError):
                    await orders.get("o2").result()
                await orders.get("o3").signal("confirm", {"by": 3})
                assert await orders.get("o3").result() == "confirmed 3"
                flaky = cli_flaky.client(runner).get("f1")
                await cli_flaky.client(runner).start(999, execution_id="f1")
                while (await flaky.poll()).status is not Status.SUSPENDED:  # noqa: ASYNC110 - bounded above
                    await trio.sleep(0.05)
                while (await orders.get("o1").poll()).status is not Status.WAITING:  # noqa: ASYNC110 - bounded above
                    await trio.sleep(0.05)

    trio.run(populate)
    capsys.readouterr()

    # list: everything, then by status, then a page at a time.
    assert cli(dsn, prefix, "list", "--json") == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["workflow"], r["execution_id"], r["status"]) for r in rows] == [
        ("cli.flaky", "f1", "suspended"),
        ("cli.order", "o1", "waiting"),
        ("cli.order", "o2", "compensated"),
        ("cli.order", "o3", "completed"),
    ]
    assert "the stock service is down" in rows[0]["problem"]
    assert (
        rows[2]["error"]
        == "StepFailedError: step 'charge' failed: ValueError: declined"
    )
    assert cli(dsn, prefix, "list", "--status", "waiting", "--json") == 0
    assert [r["execution_id"] for r in json.loads(capsys.readouterr().out)] == ["o1"]
    assert cli(dsn, prefix, "list", "--workflow", "cli.order", "--limit", "2") == 0
    text = capsys.readouterr().out
    assert "cli.order/o1  waiting" in text
    assert "(more: --after cli.order/o2)" in text
    assert (
        cli(dsn, prefix, "list", "--workflow", "cli.order", "--after", "cli.order/o2")
        == 0
    )
    text = capsys.readouterr().out
    assert text.startswith("cli.order/o3  completed  3 operation(s)")
    assert "more:" not in text
    assert cli(dsn, prefix, "list", "--workflow", "cli.nothing") == 0
    assert capsys.readouterr().out == "no executions\n"

    # show: the journal, values decoded.
    assert cli(dsn, prefix, "show", "cli.order", "o2", "--json") == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["status"] == "compensated"
    entries = shown["journal"]["entries"]
    assert [(e["kind"], e["name"], e["value"]) for e in entries] == [
        ("step", "reserve", "r-item"),
        ("step", "charge", None),
    ]
    assert entries[1]["error"] == {"type": "ValueError", "message": "declined"}
    assert shown["journal"]["arg"] == 500
    assert shown["journal"]["compensated"] == [[0]]
    assert cli(dsn, prefix, "show", "cli.order", "o3") == 0
    text = capsys.readouterr().out
    assert "status: completed" in text
    assert "journal (3 operation(s)):" in text
    assert "2  signal 'confirm'  value={\"by\": 3}" in text
    assert 'result: "confirmed 3"' in text
    assert cli(dsn, prefix, "show", "cli.order", "o9") == 1
    assert "no execution 'o9'" in capsys.readouterr().err

    # signal, interrupt, resume: refused while this command would place the
    # executions in other shards than the cluster's; then stored.
    assert (
        cli(
            dsn,
            prefix,
            "signal",
            "cli.order",
            "o1",
            "confirm",
            "--payload",
            '{"by": 7}',
        )
        == 2
    )
    assert "TRIO_CLUSTER_SHARDS_PER_GROUP" in capsys.readouterr().err
    monkeypatch.setenv("TRIO_CLUSTER_SHARDS_PER_GROUP", str(SHARDS))
    assert (
        cli(
            dsn,
            prefix,
            "signal",
            "cli.order",
            "o1",
            "confirm",
            "--payload",
            '{"by": 7}',
            "--json",
        )
        == 0
    )
    assert json.loads(capsys.readouterr().out)["sent"] == "signal"
    assert cli(dsn, prefix, "resume", "cli.flaky", "f1") == 0
    assert "resume stored for cli.flaky/f1" in capsys.readouterr().out
    assert cli(dsn, prefix, "interrupt", "cli.order", "o3", "--reason", "late") == 0
    assert cli(dsn, prefix, "signal", "cli.order", "o9", "confirm") == 1
    assert "no execution 'o9'" in capsys.readouterr().err

    # Bad input: exit status 2, nothing sent.
    assert cli(dsn, prefix, "signal", "cli.order", "o1", "x", "--payload", "{nope") == 2
    assert "--payload is not JSON" in capsys.readouterr().err
    assert cli(dsn, prefix, "list", "--after", "no-slash") == 2
    assert cli(dsn, prefix, "show", "bad/name", "o1") == 2
    assert "workflow name" in capsys.readouterr().err
    assert main(["workflows", "list", "--dsn", "not a dsn", "--prefix", "Bad-"]) == 2
    monkeypatch.setenv("TRIO_CLUSTER_NO_SUCH_SETTING", "1")
    assert cli(dsn, prefix, "list") == 2
    assert "TRIO_CLUSTER_NO_SUCH_SETTING" in capsys.readouterr().err
    monkeypatch.delenv("TRIO_CLUSTER_NO_SUCH_SETTING")

    async def act() -> None:
        storage = PostgresStorage(dsn, table_prefix=prefix)
        async with tc.open_runner(
            entities=ENTITIES, storage=storage, config=_config()
        ) as runner:
            with trio.fail_after(60):
                assert (
                    await cli_order.client(runner).get("o1").result() == "confirmed 7"
                )
                with pytest.raises(WorkflowFailedError):
                    await cli_flaky.client(runner).get("f1").result()
                # o3 had ended: the interrupt did nothing to it.
                o3 = await cli_order.client(runner).get("o3").poll()
                assert o3.status is Status.COMPLETED

    trio.run(act)
    assert UNDONE == ["r-item", "r-flaky", "r-flaky"]

    # purge: finished executions older than the age, with a limit per run.
    assert cli(dsn, prefix, "purge", "--older-than", "1h") == 0
    assert capsys.readouterr().out == "deleted 0 finished execution(s)\n"
    assert (
        cli(
            dsn,
            prefix,
            "purge",
            "--older-than",
            "0",
            "--workflow",
            "cli.order",
            "--limit",
            "2",
        )
        == 0
    )
    assert "deleted 2 finished execution(s) (the limit" in capsys.readouterr().out
    assert cli(dsn, prefix, "purge", "--older-than", "0s", "--json") == 0
    assert json.loads(capsys.readouterr().out)["deleted"] == 2
    assert cli(dsn, prefix, "list") == 0
    assert capsys.readouterr().out == "no executions\n"
    assert cli(dsn, prefix, "purge", "--older-than", "soon") == 2
    assert "--older-than: not an age" in capsys.readouterr().err
    assert cli(dsn, prefix, "purge", "--older-than", "1d", "--limit", "0") == 2


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("90", 90.0), ("90s", 90.0), ("30m", 1800.0), ("12h", 43200.0), ("7D", 604800.0)],
)
def test_ages(text: str, seconds: float) -> None:
    assert age_seconds(text) == seconds


@pytest.mark.parametrize("text", ["", "d", "-1h", "soon", "inf", "nan"])
def test_not_ages(text: str) -> None:
    with pytest.raises(ValueError, match="not an age"):
        age_seconds(text)
