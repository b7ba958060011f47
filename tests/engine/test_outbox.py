"""The transactional outbox (`PersistedDelivery._send_in`,
``runner.transaction()``) end to end on memory storage: persisted messages
sent inside a transaction exist once it commits, and never if it rolls back."""

from __future__ import annotations

from typing import ClassVar

import attrs
import pytest
import trio

import trio_cluster as tc

from ..helpers import open_clocked_runner


@attrs.frozen
class Item:
    key: str
    fail: bool = False


class Stock(tc.Entity):
    type_name = "OutboxStock"
    received: ClassVar[list[str]] = []

    @tc.rpc(persisted=True)
    async def reserve(self, msg: Item) -> str:
        Stock.received.append(msg.key)
        return msg.key


class Orders(tc.Entity):
    type_name = "OutboxOrders"

    @tc.rpc(persisted=True, transactional=True, retry=tc.RetryPolicy(max_attempts=1))
    async def place(self, msg: Item) -> str:
        await tc.current_runner().client(Stock)(msg.key).reserve.discard(msg)
        await trio.sleep(1)  # the message is saved, not yet visible
        assert Stock.received.count(msg.key) == 0
        if msg.fail:
            raise RuntimeError("failed after sending")
        return "placed"

    @tc.rpc(persisted=True, transactional=True, retry=tc.RetryPolicy(max_attempts=1))
    async def ask(self, msg: Item) -> str:
        return await tc.current_runner().client(Stock)(msg.key).reserve(msg)


@pytest.fixture(autouse=True)
def _reset() -> None:
    Stock.received = []


async def test_a_message_sent_in_a_transactional_handler_is_delivered_after_commit(
    autojump_clock,
):
    async with open_clocked_runner([Orders, Stock]) as runner:
        assert await runner.client(Orders)("o").place(Item("a")) == "placed"
        await trio.sleep(1)
        assert Stock.received == ["a"]


async def test_a_message_sent_in_a_rolled_back_handler_is_never_delivered(
    autojump_clock,
):
    async with open_clocked_runner([Orders, Stock]) as runner:
        with pytest.raises(tc.DeadLetteredError, match="failed after sending"):
            await runner.client(Orders)("o").place(Item("b", fail=True))
        await trio.sleep(5)
        assert Stock.received == []


async def test_a_call_waiting_for_its_reply_inside_a_transaction_is_refused(
    autojump_clock,
):
    async with open_clocked_runner([Orders, Stock]) as runner:
        with pytest.raises(tc.DeadLetteredError, match="CallInTransactionError"):
            await runner.client(Orders)("o").ask(Item("c"))
        async with runner.transaction():
            with pytest.raises(tc.CallInTransactionError, match="discard"):
                await runner.client(Stock)("c").reserve(Item("c"))
        assert Stock.received == []


async def test_runner_transaction_is_an_outbox_for_application_code(autojump_clock):
    async with open_clocked_runner([Stock]) as runner:
        stock = runner.client(Stock)
        async with runner.transaction() as transaction:
            assert tc.current_transaction() is transaction
            await stock("d").reserve.discard(Item("d"))
            await stock("e").reserve.discard(Item("e"))
            await trio.sleep(1)
            assert Stock.received == []
        with pytest.raises(tc.NotInTransactionError):
            tc.current_transaction()
        await trio.sleep(1)
        assert sorted(Stock.received) == ["d", "e"]

        class Abort(Exception):
            pass

        async def send_then_fail() -> None:
            async with runner.transaction():
                await stock("f").reserve.discard(Item("f"))
                raise Abort

        with pytest.raises(Abort):
            await send_then_fail()
        with trio.move_on_after(1):  # cancelled: rolled back too
            async with runner.transaction():
                await stock("g").reserve.discard(Item("g"))
                await trio.sleep_forever()
        await trio.sleep(5)
        assert sorted(Stock.received) == ["d", "e"]
