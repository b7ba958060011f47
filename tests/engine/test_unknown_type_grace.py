"""The grace period for unknown entity types (`ShardingConfig.unknown_type_grace`,
`trio_cluster._engine._claims`): during a rolling deploy, a persisted request
for a type that only the new version hosts is kept by an old runner that
owns its shard, and delivered by the new runner that takes the shard over;
after the grace it is answered with `UnknownEntityTypeError`. Virtual time,
memory storage, one shard (so every request shares it)."""

from __future__ import annotations

from contextlib import AbstractAsyncContextManager

import attrs
import pytest
import trio

import trio_cluster as tc
from trio_cluster.abc import ReplyQuery
from trio_cluster.storage import MemoryStorage

from ..helpers import Account, Deposit, config, open_clocked_runner

GRACE = 60.0


class Newcomer(tc.Entity):
    """An entity type only the new version of the code hosts."""

    type_name = "deploy.Newcomer"
    seen: list[str] = []  # noqa: RUF012

    @tc.rpc(persisted=True)
    async def note(self, msg: Deposit) -> str:
        Newcomer.seen.append(msg.tx_id)
        return f"noted {msg.tx_id}"


def runner_config(port: int, **overrides: object) -> tc.ShardingConfig:
    values: dict[str, object] = {
        "shards_per_group": 1,
        "unknown_type_grace": GRACE,
        "runner_address": tc.RunnerAddress("127.0.0.1", port),
    }
    values.update(overrides)
    return config(**values)


@attrs.define
class Call:
    """A persisted call to a `Newcomer`, from a client-only runner."""

    result: str | None = None
    error: BaseException | None = None
    finished_at: float | None = None
    done: trio.Event = attrs.Factory(trio.Event)

    async def run(self, client: tc.Runner, tx_id: str) -> None:
        try:
            self.result = await client.client(Newcomer)("n1").note(Deposit(tx_id, 1))
        except tc.ClusterError as exc:
            self.error = exc
        self.finished_at = trio.current_time()
        self.done.set()


def old_runner(
    storage: MemoryStorage, **overrides: object
) -> AbstractAsyncContextManager[tc.Runner]:
    return open_clocked_runner([Account], runner_config(2, **overrides), storage)


def client_runner(storage: MemoryStorage) -> AbstractAsyncContextManager[tc.Runner]:
    cfg = runner_config(1, shard_groups=())
    return open_clocked_runner([], cfg, storage)


async def test_kept_during_the_grace_and_delivered_by_the_new_version(
    autojump_clock,
):
    Newcomer.seen.clear()
    storage = MemoryStorage()
    call = Call()
    async with client_runner(storage) as client, trio.open_nursery() as nursery:
        async with old_runner(storage) as old:
            await old.wait_shards_acquired()
            start = trio.current_time()
            nursery.start_soon(call.run, client, "t1")
            await trio.sleep(1)
            # Other requests of the shard are not held up.
            assert await old.client(Account)("ivy").deposit(Deposit("a", 5)) == 5
            assert trio.current_time() - start < 2
            await trio.sleep(GRACE / 2)
            assert not call.done.is_set()  # kept, not answered
            assert old._parts.persisted.statistics["held_unknown_type"] == 1
        # The old runner stopped (rolling deploy): the new version takes the
        # shard over and delivers the request.
        assert not call.done.is_set()
        new = runner_config(3)
        async with open_clocked_runner([Account, Newcomer], new, storage) as runner:
            await runner.wait_shards_acquired()
            with trio.fail_after(GRACE):
                await call.done.wait()
            assert call.result == "noted t1"
            assert call.finished_at is not None
            assert call.finished_at - start < GRACE
            assert Newcomer.seen == ["t1"]


async def test_answered_with_an_error_after_the_grace(autojump_clock):
    Newcomer.seen.clear()
    storage = MemoryStorage()
    call = Call()
    async with (
        client_runner(storage) as client,
        old_runner(storage) as old,
        trio.open_nursery() as nursery,
    ):
        await old.wait_shards_acquired()
        start = trio.current_time()
        nursery.start_soon(call.run, client, "t2")
        with trio.fail_after(GRACE * 2):
            await call.done.wait()
        assert call.finished_at is not None
        assert isinstance(call.error, tc.UnknownEntityTypeError)
        assert call.error.entity_type == "deploy.Newcomer"
        assert GRACE <= call.finished_at - start <= GRACE + 1
        assert old._parts.persisted.statistics["held_unknown_type"] == 0
        # It stays stored, answered, for inspection.
        async with storage.open_session(name="look", lease_duration=5) as look:
            page = await look.messages.scan_unprocessed(limit=10)
            assert page == []
    assert Newcomer.seen == []


@pytest.mark.parametrize("grace", [0.0, GRACE])
async def test_no_grace_answers_at_once(autojump_clock, grace):
    # With a grace of 0, the old behaviour; a request not made by a runner
    # (its id is no Snowflake of a recent time) counts as old either way.
    storage = MemoryStorage()
    call = Call()
    async with (
        client_runner(storage) as client,
        old_runner(storage, unknown_type_grace=grace) as old,
    ):
        await old.wait_shards_acquired()
        if grace == 0:
            start = trio.current_time()
            await call.run(client, "t3")
            assert isinstance(call.error, tc.UnknownEntityTypeError)
            assert call.finished_at is not None
            assert call.finished_at - start < 1
            return
        # A hand-written row with a small id: answered at once.
        shard = client.client(Newcomer).address_of("n1").shard
        row = tc.abc.PersistedRequest(
            request_id=42,
            address=tc.EntityAddress("deploy.Newcomer", tc.EntityId("n1"), shard),
            tag="note",
            payload=b"\x80",
        )
        async with storage.open_session(name="w", lease_duration=5) as writer:
            await writer.messages.save_requests([row], now=old.clock.now())
            await trio.sleep(1)
            [stored] = await writer.messages.replies_for([ReplyQuery(42)])
            assert stored.final is not None
