"""Durable entity state (`trio_cluster._engine._durable_state`): loaded at
activation, saved with a transactional handler's reply, rolled back with
its transaction, and never changed where it could not be saved."""

from __future__ import annotations

from typing import Any

import attrs
import pytest
import trio

import trio_cluster as tc
from trio_cluster._engine._durable_state import StateKeeper
from trio_cluster._registry import Registry
from trio_cluster.abc import StateOutcome, StorageSession
from trio_cluster.serialization import make_converter
from trio_cluster.storage import MemoryStorage

from ..helpers import (
    ORIGIN,
    FailFirst,
    PatchingStorage,
    clock,
    config,
    open_clocked_runner,
)


@attrs.frozen
class Tally:
    count: int = 0
    last: str = ""


@attrs.frozen
class Bump:
    key: str
    amount: int = 1


@attrs.frozen
class Read:
    pass


@attrs.define(eq=False, kw_only=True)
class Refused(Exception):
    reason: str


class Counter(tc.Entity):
    type_name = "DurableCounter"
    max_idle = 5.0
    state = tc.durable(Tally)
    starts: list[int] = []  # noqa: RUF012 - shared on purpose: seen by the tests

    async def on_start(self) -> None:
        # The stored state is loaded before on_start.
        Counter.starts.append(self.state.count)

    @tc.rpc(persisted=True, transactional=True, primary_key=lambda m: m.key)
    async def bump(self, msg: Bump) -> int:
        self.state = Tally(self.state.count + msg.amount, msg.key)
        return self.state.count

    @tc.rpc(persisted=True, transactional=True, errors=[Refused])
    async def bump_then_fail(self, msg: Bump) -> int:
        self.state = Tally(self.state.count + msg.amount, msg.key)
        if msg.amount < 0:
            raise Refused(reason="declared: committed with the state")
        raise RuntimeError("a bug: rolled back")

    @tc.rpc(persisted=True, transactional=True)
    async def bump_slowly(self, msg: Bump) -> int:
        self.state = Tally(self.state.count + msg.amount, msg.key)
        await trio.sleep(10)
        return self.state.count

    @tc.rpc
    async def read(self, msg: Read) -> Tally:
        return self.state

    @tc.rpc
    async def bump_volatile(self, msg: Bump) -> int:
        self.state = Tally(self.state.count + msg.amount, msg.key)
        return self.state.count

    @tc.rpc(persisted=True)
    async def bump_persisted(self, msg: Bump) -> int:
        self.state = Tally(self.state.count + msg.amount, msg.key)
        return self.state.count


@pytest.fixture(autouse=True)
def _reset_starts() -> None:
    Counter.starts = []


async def test_state_is_saved_with_the_reply_and_survives_passivation(
    autojump_clock: Any,
) -> None:
    storage = MemoryStorage()
    async with open_clocked_runner([Counter], config(), storage) as runner:
        ref = runner.client(Counter)("c")
        assert await ref.bump(Bump("k1")) == 1
        assert await ref.bump(Bump("k2", 5)) == 6
        # A duplicate gets its recorded reply and changes nothing.
        assert await ref.bump(Bump("k1")) == 1
        assert await ref.read(Read()) == Tally(6, "k2")
        await trio.sleep(10)  # passivated (max_idle 5 s)
        assert await ref.read(Read()) == Tally(6, "k2")
        assert Counter.starts == [0, 6]
    # A new runner on the same storage continues from the last commit (its
    # wall clock goes on from the first one's, so its request ids are new).
    later = tc.TrioWallClock(origin=ORIGIN + trio.current_time())
    async with tc.open_runner(
        entities=[Counter], config=config(), storage=storage, clock=later
    ) as runner:
        ref = runner.client(Counter)("c")
        assert await ref.bump(Bump("k3")) == 7
        assert await runner.client(Counter)("other").read(Read()) == Tally()
    assert Counter.starts == [0, 6, 6, 0]


async def test_declared_error_commits_the_state_and_a_crash_rolls_it_back(
    autojump_clock: Any,
) -> None:
    async with open_clocked_runner([Counter]) as runner:
        ref = runner.client(Counter)("c")
        await ref.bump(Bump("k1", 10))
        with pytest.raises(Refused):
            await ref.bump_then_fail(Bump("k2", -3))
        assert await ref.read(Read()) == Tally(7, "k2")
        with pytest.raises(tc.DeadLetteredError, match="a bug"):
            await ref.bump_then_fail(Bump("k3", 100))
        assert await ref.read(Read()) == Tally(7, "k2")
        assert await ref.bump(Bump("k4")) == 8


async def test_interrupted_handler_puts_the_state_back(autojump_clock: Any) -> None:
    async with open_clocked_runner([Counter]) as runner:
        ref = runner.client(Counter)("c")
        await ref.bump(Bump("k1"))
        with trio.move_on_after(1):
            await ref.bump_slowly(Bump("k2", 100))
        # While it ran, the state had changed in memory only; now it is back.
        assert await ref.read(Read()) == Tally(1, "k1")
        assert await ref.bump(Bump("k3")) == 2


async def test_failed_state_write_rolls_back_and_runs_again(
    autojump_clock: Any,
) -> None:
    storage = MemoryStorage()
    storage.fault_hook = FailFirst("save_state", 2, "connection lost")
    cfg = config(entity_restart_backoff=0.5)
    async with open_clocked_runner([Counter], cfg, storage) as runner:
        ref = runner.client(Counter)("c")
        assert await ref.bump(Bump("k1", 3)) == 3  # on its third run
        assert await ref.read(Read()) == Tally(3, "k1")
        assert await ref.bump(Bump("k2", 3)) == 6


async def test_failed_load_is_retried_and_loses_nothing(autojump_clock: Any) -> None:
    storage = MemoryStorage()
    async with open_clocked_runner([Counter], config(), storage) as runner:
        await runner.client(Counter)("c").bump(Bump("k1", 4))
    storage.fault_hook = FailFirst("load_state", 1, "connection lost")
    cfg = config(entity_restart_backoff=0.5)
    later = tc.TrioWallClock(origin=ORIGIN + 1 + trio.current_time())
    async with tc.open_runner(
        entities=[Counter], config=cfg, storage=storage, clock=later
    ) as runner:
        ref = runner.client(Counter)("c")
        assert await ref.bump(Bump("k2", 1)) == 5
        assert Counter.starts == [0, 4]


async def test_state_changes_outside_a_transactional_handler_are_refused(
    autojump_clock: Any,
) -> None:
    async with open_clocked_runner([Counter]) as runner:
        ref = runner.client(Counter)("c")
        await ref.bump(Bump("k1"))
        with pytest.raises(tc.RemoteError, match="only in a transactional handler"):
            await ref.bump_volatile(Bump("v"))
        with pytest.raises(tc.DeadLetteredError, match="only in a transactional"):
            await ref.bump_persisted(Bump("p"))
        assert await ref.read(Read()) == Tally(1, "k1")


class StartsWrong(tc.Entity):
    type_name = "StartsWrong"
    state = tc.durable(Tally)
    refused: list[str] = []  # noqa: RUF012 - shared on purpose: seen by the test

    async def on_start(self) -> None:
        try:
            self.state = Tally(99)
        except tc.DurableStateError as exc:
            StartsWrong.refused.append(str(exc))

    @tc.rpc
    async def read(self, msg: Read) -> Tally:
        return self.state

    @tc.rpc(persisted=True, transactional=True)
    async def bump(self, msg: Bump) -> int:
        self.state = Tally(self.state.count + msg.amount)
        return self.state.count


async def test_on_start_cannot_change_the_state(autojump_clock: Any) -> None:
    async with open_clocked_runner([StartsWrong]) as runner:
        assert await runner.client(StartsWrong)("s").read(Read()) == Tally()
        # Not even when a transactional handler activates the entity.
        assert await runner.client(StartsWrong)("t").bump(Bump("k")) == 1
    assert len(StartsWrong.refused) == 2
    assert "only in a transactional handler" in StartsWrong.refused[0]


def test_an_entity_made_by_hand_keeps_its_state_as_an_attribute() -> None:
    counter = Counter()
    assert counter.state == Tally()
    counter.state = Tally(3)
    assert counter.state == Tally(3)
    with pytest.raises(TypeError, match="must be a Tally"):
        counter.state = 3  # type: ignore[assignment]
    assert Counter.state.type is Tally  # the declaration, on the class


def test_definition_errors() -> None:
    with pytest.raises(tc.EntityDefinitionError, match="more than once"):

        class Twice(tc.Entity):
            type_name = "Twice"
            a = tc.durable(Tally)
            b = tc.durable(Tally)

    with pytest.raises(tc.EntityDefinitionError, match="must be a class"):
        tc.durable(Tally | None)  # type: ignore[arg-type]
    with pytest.raises(tc.EntityDefinitionError, match="initial"):
        tc.durable(Tally, initial=Tally(1))  # type: ignore[arg-type]


class Parallel(tc.Entity):
    type_name = "Parallel"
    concurrency = 2
    state = tc.durable(int, initial=lambda: 0)

    @tc.rpc
    async def read(self, msg: Read) -> int:
        return self.state


async def test_durable_state_needs_one_handler_at_a_time(autojump_clock: Any) -> None:
    with pytest.raises(tc.EntityDefinitionError, match="concurrency = 1"):
        async with open_clocked_runner([Parallel]):
            pass  # pragma: no cover


class Overridden(Counter):
    type_name = "Overridden"
    state = tc.durable(Tally, initial=lambda: Tally(100))


async def test_a_subclass_may_redeclare_the_state(autojump_clock: Any) -> None:
    async with open_clocked_runner([Overridden]) as runner:
        assert await runner.client(Overridden)("o").bump(Bump("k")) == 101


class StaleStateStorage(PatchingStorage):
    """MemoryStorage whose next ``stale`` state writes are refused by
    fencing, as if the shard had moved on meanwhile."""

    def __init__(self) -> None:
        super().__init__()
        self.stale = 0

    def patch_session(self, session: StorageSession) -> None:
        messages: Any = session.messages
        original = messages.save_state
        storage = self

        async def save_state(write: Any, *, now: float, transaction: Any = None) -> Any:
            if storage.stale:
                storage.stale -= 1
                await trio.lowlevel.checkpoint()
                return StateOutcome.STALE_EPOCH
            return await original(write, now=now, transaction=transaction)

        messages.save_state = save_state


async def test_a_state_write_refused_by_fencing_rolls_back_reply_and_state(
    autojump_clock: Any,
) -> None:
    storage = StaleStateStorage()
    async with open_clocked_runner([Counter], config(), storage) as runner:
        ref = runner.client(Counter)("c")
        assert await ref.bump(Bump("k1", 2)) == 2
        storage.stale = 1
        with trio.move_on_after(30) as waited:
            await ref.bump(Bump("k2", 40))  # the next owner would run it
        assert waited.cancelled_caught
        # No reply was recorded, and memory went back to the committed state.
        assert await ref.read(Read()) == Tally(2, "k1")
        # (Snapshots are keyed by type and id: any shard finds it.)
        address = tc.EntityAddress(
            "DurableCounter", tc.EntityId("c"), tc.ShardId("default", 1)
        )
        stored = storage._states.load(address)
        assert stored is not None
        assert stored.version == 1
        assert await ref.bump(Bump("k3", 1)) == 3


async def test_clear_address_resets_the_state_of_a_live_entity(
    autojump_clock: Any,
) -> None:
    storage = MemoryStorage()
    async with open_clocked_runner([Counter], config(), storage) as runner:
        ref = runner.client(Counter)("c")
        assert await ref.bump(Bump("k1", 5)) == 5
        address = runner.client(Counter).address_of("c")
        async with storage.open_session(name="operator", lease_duration=10) as op:
            await op.messages.clear_address(address)
        # The incarnation in memory still reads 5, but its next save is
        # refused for its version: the request runs again from the start.
        assert await ref.bump(Bump("k2", 1)) == 1
        assert await ref.read(Read()) == Tally(1, "k2")


async def test_a_storage_without_state_is_refused_for_durable_types() -> None:
    registry = Registry([Counter, Plain], config=config(), converter=make_converter())
    not_states: Any = object()  # a MessageStorage that keeps no entity state
    with pytest.raises(tc.ConfigError, match="DurableCounter declare durable"):
        StateKeeper(not_states, clock(), registry.types.values())
    # Types without durable state need nothing of it.
    plain = Registry([Plain], config=config(), converter=make_converter())
    StateKeeper(not_states, clock(), plain.types.values())


class Plain(tc.Entity):
    type_name = "Plain"

    @tc.rpc
    async def read(self, msg: Read) -> int:
        return 0


class RefusingStateStorage(PatchingStorage):
    """MemoryStorage that refuses every state write for its data."""

    def patch_session(self, session: StorageSession) -> None:
        messages: Any = session.messages

        async def save_state(write: Any, *, now: float, transaction: Any = None) -> Any:
            await trio.lowlevel.checkpoint()
            raise tc.StorageRefusedError("value too long for type bytea")

        messages.save_state = save_state


async def test_a_state_storage_refuses_is_the_callers_error(
    autojump_clock: Any,
) -> None:
    async with open_clocked_runner(
        [Counter], config(), RefusingStateStorage()
    ) as runner:
        ref = runner.client(Counter)("c")
        with pytest.raises(tc.MalformedMessageError, match="storage refused"):
            await ref.bump(Bump("k1"))
        assert await ref.read(Read()) == Tally()  # nothing changed
