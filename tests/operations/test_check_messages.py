"""`check_messages` and ``trio-cluster check-messages``: messages saved by
one version of the entities, checked against another (see `deploy_versions`)."""

from __future__ import annotations

import json
from typing import Any

import attrs
import pytest
import trio

import trio_cluster as tc
from trio_cluster._cli._main import main
from trio_cluster._core._addresses import EntityAddress, EntityId, ShardId
from trio_cluster._core._config import ShardingConfig
from trio_cluster._core._hashing import shard_for
from trio_cluster._registry import Registry
from trio_cluster._storage_abc import PersistedRequest, ReplyRecord, Storage
from trio_cluster.serialization import make_converter
from trio_cluster.storage import MemoryStorage, PostgresStorage

from . import deploy_versions as v

NOW = 1_800_000_000.0
CONFIG = ShardingConfig()
V1_TYPES = Registry(v.V1, config=CONFIG, converter=make_converter()).types


@attrs.frozen
class Saved:
    entity_type: str
    entity_id: str
    tag: str
    message: Any
    deliver_at: float | None = None
    shard: ShardId | None = None


SAVED = [
    Saved("deploy.Counter", "a", "add", v.Add(1)),  # 1: add's message changed
    Saved("deploy.Counter", "a", "reset", v.Reset()),  # 2: renamed to clear
    Saved("deploy.Ledger", "x", "write", v.Entry("hi")),  # 3: type removed
    Saved("deploy.Counter", "b", "peek", v.Reset(1)),  # 4: now volatile
    Saved("deploy.Counter", "c", "add", v.Add(2), deliver_at=NOW + 86_400),  # 5
    Saved("deploy.Counter", "d", "add", v.Add(3)),  # 6: answered below
]
ANSWERED = 6


def request(number: int, saved: Saved) -> PersistedRequest:
    handler = V1_TYPES[saved.entity_type].handlers[saved.tag]
    shard = saved.shard or shard_for(
        saved.entity_id, "default", CONFIG.shards_per_group
    )
    return PersistedRequest(
        request_id=number,
        address=EntityAddress(saved.entity_type, EntityId(saved.entity_id), shard),
        tag=saved.tag,
        payload=handler.message.encode(saved.message),
        deliver_at=saved.deliver_at,
    )


async def save_v1(storage: Storage, saved: list[Saved] = SAVED) -> None:
    """Store ``saved`` as version 1 would, and answer request `ANSWERED`."""
    async with storage.open_session(name="v1", lease_duration=5.0) as session:
        requests = [request(i, s) for i, s in enumerate(saved, start=1)]
        await session.messages.save_requests(requests, now=NOW)
        answered = requests[ANSWERED - 1].address.shard
        epochs = await session.runners.acquire([answered])
        reply = ReplyRecord(ANSWERED, answered, epochs[answered], b"done")
        await session.messages.save_replies([reply], now=NOW)


def summary(report: tc.MessageCheck) -> dict[str, list[int]]:
    return {p.kind.value: [e.request_id for e in p.examples] for p in report.problems}


async def test_the_same_version_decodes_everything() -> None:
    storage = MemoryStorage()
    await save_v1(storage)
    report = await tc.check_messages(storage, entities=v.V1)
    assert report.ok
    assert report.checked == len(SAVED) - 1  # the answered one is not read
    assert report.render() == "5 unprocessed messages checked: all decode"


@pytest.mark.parametrize("batch_size", [1, 2, 500])
async def test_a_changed_version_reports_each_problem(batch_size: int) -> None:
    storage = MemoryStorage()
    await save_v1(storage)
    report = await tc.check_messages(storage, entities=v.V2, batch_size=batch_size)
    assert not report.ok
    assert report.checked == 5
    assert report.failing == 5
    assert summary(report) == {
        "unknown_entity_type": [3],
        "unknown_handler": [2],
        "not_persisted": [4],
        "undecodable_payload": [1, 5],
    }
    by_kind = {p.kind: p for p in report.problems}
    unknown = by_kind[tc.ProblemKind.UNKNOWN_ENTITY_TYPE].examples[0]
    assert unknown.error == "unknown entity type 'deploy.Ledger'"
    assert unknown.address.startswith("deploy.Ledger/x@default:")
    assert unknown.tag == "write"
    renamed = by_kind[tc.ProblemKind.UNKNOWN_HANDLER].examples[0]
    assert renamed.error == "entity type 'deploy.Counter' has no handler 'reset'"
    assert "volatile" in by_kind[tc.ProblemKind.NOT_PERSISTED].examples[0].error
    undecodable = by_kind[tc.ProblemKind.UNDECODABLE_PAYLOAD]
    assert undecodable.count == 2
    assert "currency" in undecodable.examples[0].error
    text = report.render()
    assert "5 would fail" in text
    assert "undecodable payload: 2" in text
    assert json.loads(json.dumps(report.to_dict()))["failing"] == 5


async def test_examples_are_capped_and_errors_cut() -> None:
    storage = MemoryStorage()
    many = [Saved("deploy.Counter", f"e{i}", "add", v.Add(i)) for i in range(7)]
    await save_v1(storage, many)
    report = await tc.check_messages(storage, entities=v.V2, examples=2)
    (problem,) = report.problems
    assert problem.count == 6  # the sixth was answered
    assert [e.request_id for e in problem.examples] == [1, 2]
    assert all(len(e.error) <= 200 for e in problem.examples)
    none = await tc.check_messages(storage, entities=v.V2, examples=0)
    assert none.problems[0].examples == ()


async def test_a_misplaced_or_invalid_address_is_reported() -> None:
    storage = MemoryStorage()
    home = shard_for("a", "default", CONFIG.shards_per_group)
    elsewhere = ShardId("default", home.number % CONFIG.shards_per_group + 1)
    rows = [Saved("deploy.Counter", "a", "reset", v.Reset(), shard=elsewhere)]
    await save_v1(storage, [*rows, *SAVED[:5], SAVED[1]])
    report = await tc.check_messages(storage, entities=v.V1)
    assert summary(report) == {"invalid_address": [1]}
    assert "belongs to shard" in report.problems[0].examples[0].error


async def test_checking_reads_only() -> None:
    storage = MemoryStorage()
    await save_v1(storage)
    await tc.check_messages(storage, entities=v.V2)
    async with storage.open_session(name="after", lease_duration=5.0) as session:
        shards = {
            shard_for(s.entity_id, "default", CONFIG.shards_per_group) for s in SAVED
        }
        epochs = await session.runners.acquire(shards)
        batch = await session.messages.claim(epochs, now=NOW, limit=100)
        assert sorted(r.request_id for r in batch.requests) == [1, 2, 3, 4]


async def test_bad_arguments_are_refused() -> None:
    with pytest.raises(tc.ConfigError, match="batch_size"):
        await tc.check_messages(MemoryStorage(), entities=v.V1, batch_size=0)
    with pytest.raises(tc.EntityDefinitionError):
        await tc.check_messages(MemoryStorage(), entities=[object])  # type: ignore[list-item]


# --------------------------------------------------------------------------
# PostgreSQL and the command line


def check_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(["check-messages", *argv])
    out, err = capsys.readouterr()
    assert "Traceback" not in err, err
    return code, out, err


@pytest.mark.postgres
async def test_postgres_messages_checked_with_the_python_api(pg_schema: Any) -> None:
    await save_v1(PostgresStorage(pg_schema.dsn))
    storage = PostgresStorage(pg_schema.dsn, auto_migrate=False)
    assert (await tc.check_messages(storage, entities=v.V1)).ok
    report = await tc.check_messages(storage, entities=v.V2, batch_size=2)
    assert summary(report) == {
        "unknown_entity_type": [3],
        "unknown_handler": [2],
        "not_persisted": [4],
        "undecodable_payload": [1, 5],
    }


@pytest.mark.postgres
def test_cli_exit_status_0_when_every_message_decodes(capsys, pg_schema):
    trio.run(save_v1, PostgresStorage(pg_schema.dsn))
    code, out, err = check_cli(
        capsys, "tests.operations.deploy_versions:V1", "--dsn", pg_schema.dsn
    )
    assert (code, err) == (0, "")
    assert out.strip() == "5 unprocessed messages checked: all decode"


@pytest.mark.postgres
def test_cli_exit_status_1_lists_the_problems(capsys, pg_schema):
    trio.run(save_v1, PostgresStorage(pg_schema.dsn))
    code, out, _ = check_cli(
        capsys, "tests.operations.deploy_versions:V2", "--dsn", pg_schema.dsn, "--json"
    )
    assert code == 1
    report = json.loads(out)
    assert report["checked"] == 5
    assert {p["kind"]: p["count"] for p in report["problems"]} == {
        "unknown_entity_type": 1,
        "unknown_handler": 1,
        "not_persisted": 1,
        "undecodable_payload": 2,
    }
    code, out, _ = check_cli(
        capsys, "tests.operations.deploy_versions:V2", "--dsn", pg_schema.dsn
    )
    assert code == 1
    assert "unknown entity type: 1" in out


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["tests.operations.nowhere:V1"], "cannot import"),
        (["tests.operations.deploy_versions:V3"], "has no attribute 'V3'"),
        (["tests.operations.deploy_versions:V1", "--prefix", "Bad!"], "table_prefix"),
    ],
)
def test_cli_exit_status_2_for_a_bad_target_or_prefix(capsys, argv, says):
    code, out, err = check_cli(capsys, *argv, "--dsn", "host=127.0.0.1 dbname=test")
    assert code == 2
    assert out == ""
    assert len(err.strip().splitlines()) == 1
    assert err.startswith("trio-cluster check-messages: ")
    assert says in err


def test_cli_exit_status_2_for_a_malformed_dsn(capsys):
    code, _, err = check_cli(
        capsys, "tests.operations.deploy_versions:V1", "--dsn", "nonsense=1 ="
    )
    assert code == 2
    assert "DSN" in err


def test_cli_exit_status_2_when_the_database_is_down(capsys):
    code, _, err = check_cli(
        capsys,
        "tests.operations.deploy_versions:V1",
        "--dsn",
        "host=127.0.0.1 port=1 dbname=test connect_timeout=5",
    )
    assert code == 2
    assert len(err.strip().splitlines()) == 1


@pytest.mark.postgres
def test_cli_exit_status_2_without_the_schema(capsys, pg_schema):
    code, _, err = check_cli(
        capsys, "tests.operations.deploy_versions:V1", "--dsn", pg_schema.dsn
    )
    assert code == 2
    assert len(err.strip().splitlines()) == 1
