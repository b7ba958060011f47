"""``trio-cluster webhooks attempts|dead|replay`` on PostgreSQL.

The deliveries run in this process (a runner hosting the webhooks part,
with an ``httpx.MockTransport`` as the receiver); the commands run through
`trio_cluster._cli._main.main`, each in its own ``trio.run``.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

import httpx
import pytest
import trio

import trio_cluster as tc
from tests.pg_fixture import unique_prefix
from trio_cluster._cli._main import main
from trio_cluster.storage import PostgresStorage
from trio_cluster.webhooks import RetrySchedule, WebhookEndpoint, Webhooks

if TYPE_CHECKING:
    from tests.pg_fixture import PgSchema

pytestmark = [pytest.mark.postgres, pytest.mark.slow]

PART = Webhooks(schedule=RetrySchedule((0, 0.2), jitter=0))
"""Named ``default``, as the commands' ``--name`` default."""


def deliver(dsn: str, prefix: str, answer: int, until: int, send: bool) -> str | None:
    """Run a runner hosting `PART` whose receiver answers ``answer`` until
    ``until`` attempts are recorded for the endpoint; send an event first
    if ``send``; return its message id."""

    async def run() -> str | None:
        storage = PostgresStorage(dsn, table_prefix=prefix)
        transport = httpx.MockTransport(lambda request: httpx.Response(answer))
        message_id = None
        async with (
            tc.open_runner(entities=PART.entities, storage=storage) as runner,
            PART.open(runner, storage, transport=transport) as hooks,
        ):
            await runner.wait_shards_acquired()
            if send:
                await hooks.register(WebhookEndpoint("shop", "http://shop.test/"))
                message_id = (await hooks.send("paid", {"n": 1})).message_id
            with trio.fail_after(30):
                while len(await hooks.attempts(endpoint_id="shop")) < until:  # noqa: ASYNC110
                    await trio.sleep(0.05)
                if send:
                    while not await hooks.dead_deliveries():  # noqa: ASYNC110
                        await trio.sleep(0.05)
        return message_id

    return trio.run(run)


def command(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    code = main(args)
    return code, capsys.readouterr().out


def test_attempts_dead_and_replay(
    pg_schema: PgSchema, capsys: pytest.CaptureFixture[str]
) -> None:
    prefix = unique_prefix()
    where = ["--dsn", pg_schema.dsn, "--prefix", prefix, "--json"]
    message_id = deliver(pg_schema.dsn, prefix, 500, until=2, send=True)
    assert message_id is not None

    code, out = command(capsys, "webhooks", "attempts", "--message", message_id, *where)
    assert code == 0
    attempts = json.loads(out)
    assert [(a["attempt"], a["outcome"], a["status"]) for a in attempts] == [
        (1, "failure", 500),
        (2, "failure", 500),
    ]
    assert attempts[0]["next_at"] is not None
    assert attempts[1]["next_at"] is None

    code, out = command(capsys, "webhooks", "dead", *where)
    assert code == 0
    [dead] = json.loads(out)
    assert (dead["message"], dead["endpoint"]) == (message_id, "shop")
    assert "2 attempt(s) failed, the last with HTTP 500" in dead["error"]

    code, out = command(capsys, "webhooks", "replay", message_id, *where)
    assert (code, json.loads(out)) == (0, {"replayed": 1})
    code, out = command(capsys, "webhooks", "replay", message_id, *where)
    assert (code, json.loads(out)) == (1, {"replayed": 0})

    deliver(pg_schema.dsn, prefix, 200, until=3, send=False)
    code, out = command(capsys, "webhooks", "attempts", "--endpoint", "shop", *where)
    assert [a["outcome"] for a in json.loads(out)] == ["failure", "failure", "success"]
    code, out = command(capsys, "webhooks", "dead", *where)
    assert json.loads(out) == []

    code, out = command(
        capsys,
        "webhooks",
        "attempts",
        "--endpoint",
        "shop",
        "--dsn",
        pg_schema.dsn,
        "--prefix",
        prefix,
    )
    assert code == 0
    assert "attempt 3: success HTTP 200" in out


def test_attempts_needs_a_message_or_an_endpoint(
    pg_schema: PgSchema, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["webhooks", "attempts", "--dsn", pg_schema.dsn])
    assert code == 2
    assert "give --message, --endpoint or both" in capsys.readouterr().err
