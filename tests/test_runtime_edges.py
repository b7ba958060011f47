"""Less common paths of the runtime: start failures, on_stop during
passivation, crashes with concurrent handlers, self-messages, unions."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import datetime

import attrs
import pytest
import trio
import trio.testing

import trio_cluster as tc
from trio_cluster.serialization import make_converter, register_tagged_union

from .helpers import Add, Get, Sleep, config


class FlakyStart(tc.Entity):
    type_name = "FlakyStart"
    failures = 0

    async def on_start(self) -> None:
        if FlakyStart.failures:
            FlakyStart.failures -= 1
            raise OSError("cannot load state")

    @tc.rpc
    async def ping(self, msg: Get) -> str:
        return "pong"


async def test_on_start_failure_fails_the_call_and_restarts(autojump_clock):
    FlakyStart.failures = 1
    async with tc.open_runner(
        entities=[FlakyStart], config=config(entity_restart_backoff=1.0)
    ) as runner:
        ref = runner.client(FlakyStart)("f")
        with pytest.raises(tc.RemoteError, match="cannot load state"):
            await ref.ping(Get())
        start = trio.current_time()
        assert await ref.ping(Get()) == "pong"
        assert trio.current_time() - start == pytest.approx(1.0)


class SlowStop(tc.Entity):
    type_name = "SlowStop"
    max_idle = 5.0
    log: list[str] = []  # noqa: RUF012

    async def on_start(self) -> None:
        SlowStop.log.append(f"start {trio.current_time():.0f}")

    async def on_stop(self) -> None:
        SlowStop.log.append(f"stopping {trio.current_time():.0f}")
        await trio.sleep(3)
        SlowStop.log.append(f"stopped {trio.current_time():.0f}")

    @tc.rpc
    async def ping(self, msg: Get) -> str:
        SlowStop.log.append(f"ping {trio.current_time():.0f}")
        return "pong"


async def test_message_during_on_stop_waits_and_reactivates(autojump_clock):
    SlowStop.log = []
    async with tc.open_runner(entities=[SlowStop], config=config()) as runner:
        ref = runner.client(SlowStop)("s")
        await ref.ping(Get())
        await trio.sleep(6)  # passivation started at t=5, on_stop runs until t=8
        assert await ref.ping(Get()) == "pong"
    assert SlowStop.log[:6] == [
        "start 0",
        "ping 0",
        "stopping 5",
        "stopped 8",
        "start 8",
        "ping 8",
    ]


class Pair(tc.Entity):
    type_name = "Pair"
    concurrency = 2

    @tc.rpc
    async def wait(self, msg: Sleep) -> None:
        await trio.sleep(msg.seconds)

    @tc.rpc
    async def fail(self, msg: Get) -> None:
        raise ValueError("boom")


async def test_crash_fails_running_volatile_siblings(autojump_clock):
    outcome: list[BaseException] = []
    async with tc.open_runner(entities=[Pair], config=config()) as runner:
        ref = runner.client(Pair)("p")

        async def waiter() -> None:
            try:
                await ref.wait(Sleep(10))
            except tc.RemoteError as exc:
                outcome.append(exc)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(waiter)
            await trio.testing.wait_all_tasks_blocked()
            with pytest.raises(tc.RemoteError, match="boom"):
                await ref.fail(Get())
    assert len(outcome) == 1
    assert outcome[0].type_name == "trio_cluster.EntityRestarted"  # type: ignore[attr-defined]


class Selfish(tc.Entity):
    type_name = "Selfish"

    def __init__(self) -> None:
        self.total = 0

    @tc.rpc
    async def add(self, msg: Add) -> int:
        self.total += msg.amount
        return self.total

    @tc.rpc
    async def add_later(self, msg: Add) -> None:
        # A message to myself, queued behind this handler.
        await self.add.discard(msg)

    @tc.rpc
    async def add_now(self, msg: Add) -> int:
        return await self.add(msg)  # a plain method call

    @tc.stream
    async def numbers(self, msg: Add) -> AsyncIterator[int]:
        for i in range(msg.amount):
            yield i

    @tc.rpc
    async def sum_of_numbers(self, msg: Add) -> int:
        async with self.numbers(msg) as numbers:
            return sum([n async for n in numbers])


async def test_entities_can_message_and_call_themselves(autojump_clock):
    async with tc.open_runner(entities=[Selfish], config=config()) as runner:
        ref = runner.client(Selfish)("me")
        await ref.add_later(Add(5))
        assert await ref.add_now(Add(1)) == 6
        assert await ref.sum_of_numbers(Add(4)) == 6


@attrs.frozen
class Cash:
    amount: int


@attrs.frozen
class Card:
    number: str
    amount: int


Payment = Cash | Card


@attrs.frozen
class Pay:
    payment: Payment


class Till(tc.Entity):
    type_name = "Till"

    @tc.rpc
    async def pay(self, msg: Pay) -> str:
        return type(msg.payment).__name__


async def test_tagged_unions_travel_with_explicit_tags(autojump_clock):
    converter = make_converter()
    register_tagged_union(converter, Payment, {Cash: "cash", Card: "card"})
    assert converter.unstructure(Pay(Card("4242", 3)), Pay) == {
        "payment": {"number": "4242", "amount": 3, "_type": "card"}
    }
    async with tc.open_runner(
        entities=[Till], config=config(), converter=converter
    ) as runner:
        assert await runner.client(Till)("t").pay(Pay(Cash(5))) == "Cash"
        assert await runner.client(Till)("t").pay(Pay(Card("1", 2))) == "Card"


def test_tagged_union_needs_every_tag_once():
    converter = make_converter()
    with pytest.raises(tc.EntityDefinitionError, match="no tag given"):
        register_tagged_union(converter, Payment, {Cash: "cash"})
    with pytest.raises(tc.EntityDefinitionError, match="unique"):
        register_tagged_union(converter, Payment, {Cash: "x", Card: "x"})


class Picky(tc.Entity):
    type_name = "Picky"

    @tc.rpc(persisted=True, primary_key=lambda m: m.amount)  # not a str
    async def keyed(self, msg: Add) -> None:
        pass


async def test_bad_primary_key_and_deliver_at_values(autojump_clock):
    class Timed(tc.Entity):
        type_name = "Timed"

        @tc.rpc(persisted=True, deliver_at=lambda m: datetime(2030, 1, 1))  # naive
        async def naive(self, msg: Add) -> None:
            pass

        @tc.rpc(persisted=True, deliver_at=lambda m: "soon")  # type: ignore[arg-type,return-value]
        async def nonsense(self, msg: Add) -> None:
            pass

    async with tc.open_runner(entities=[Picky, Timed], config=config()) as runner:
        with pytest.raises(tc.EntityDefinitionError, match="non-empty str"):
            await runner.client(Picky)("p").keyed(Add(1))
        with pytest.raises(tc.EntityDefinitionError, match="naive datetime"):
            await runner.client(Timed)("t").naive(Add(1))
        with pytest.raises(
            tc.EntityDefinitionError, match="aware datetime, Unix seconds"
        ):
            await runner.client(Timed)("t").nonsense(Add(1))


async def test_unencodable_reply_is_a_malformed_message_error(autojump_clock):
    class Liar(tc.Entity):
        type_name = "Liar"

        @tc.rpc
        async def answer(self, msg: Get) -> int:
            return "not an int"  # type: ignore[return-value]

    async with tc.open_runner(entities=[Liar], config=config()) as runner:
        with pytest.raises(tc.MalformedMessageError, match="reply"):
            await runner.client(Liar)("l").answer(Get())
        assert runner.statistics().entity_crashes == 0


class Elsewhere(tc.Entity):
    type_name = "Elsewhere"
    shard_group = "batch"

    @tc.rpc
    async def ping(self, msg: Get) -> str:
        return "pong"


async def test_group_hosted_by_no_runner_fails_fast(autojump_clock):
    async with tc.open_runner(entities=[Elsewhere], config=config()) as runner:
        start = trio.current_time()
        with pytest.raises(tc.EntityNotAssignedError, match="Elsewhere/x@batch:"):
            await runner.client(Elsewhere)("x").ping(Get())
        assert trio.current_time() == start
        with pytest.raises(tc.EntityNotAssignedError):
            await runner.client(Elsewhere)("x").ping.discard(Get())


async def test_a_second_group_is_served_when_configured(autojump_clock):
    cfg = config(shard_groups=("default", "batch"))
    async with tc.open_runner(entities=[Elsewhere], config=cfg) as runner:
        assert await runner.client(Elsewhere)("x").ping(Get()) == "pong"
        assert runner.statistics().shards == 16


async def test_persisted_delivery_survives_failing_claims(autojump_clock):
    from trio_cluster.storage import MemoryStorage

    from .test_persisted import Account, Later, clock

    storage = MemoryStorage()

    async def claims_fail_for_a_while(session: str, operation: str) -> None:
        if operation == "claim" and trio.current_time() < 3:
            raise OSError("database restarting")

    async with tc.open_runner(
        entities=[Account], config=config(), storage=storage, clock=clock()
    ) as runner:
        storage.fault_hook = claims_fail_for_a_while
        # A delayed message is found by claiming (no fast path): due at t=1,
        # claimable once claims work again (t=3, retried each second).
        at = runner.clock.now() + 1
        with trio.fail_after(10):
            delivered_at = await runner.client(Account)("a").remind(Later("x", at))
        assert delivered_at >= at + 2
        assert trio.current_time() <= 4.5
