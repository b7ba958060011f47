"""Transactional persisted handlers (`trio_cluster._engine._persisted`): the
handler's writes and its reply commit together."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

import attrs
import pytest
import trio

import trio_cluster as tc
from trio_cluster.abc import StorageSession, StorageTransaction

from ..helpers import (
    Deposit as Transfer,
    Get,
    PatchingStorage,
    config,
    open_clocked_runner,
)


class JournalTransaction(StorageTransaction):
    """A transaction whose "SQL" appends to a journal that only becomes
    visible when the transaction commits."""

    def __init__(self, inner: StorageTransaction, journal: list[str]) -> None:
        self.inner = inner
        self.journal = journal
        self.pending: list[str] = []

    async def execute(
        self, query: str, params: Sequence[object] = ()
    ) -> list[tuple[Any, ...]]:
        await trio.lowlevel.checkpoint()
        self.pending.append(query % tuple(params))
        return []


class JournalStorage(PatchingStorage):
    """MemoryStorage whose transactions can run journal statements."""

    def __init__(self) -> None:
        super().__init__()
        self.journal: list[str] = []
        self.rollbacks = 0
        self.fail_commits = 0
        self.lose_commit_acks = 0
        """Commits that take effect but report a failure (the connection
        dropped before the client heard back: the outcome is unknown)."""

    def patch_session(self, session: StorageSession) -> None:
        messages = session.messages
        original_open = messages.open_transaction
        original_save = messages.save_replies
        storage = self

        @asynccontextmanager
        async def open_transaction() -> AsyncIterator[StorageTransaction]:
            async with original_open() as inner:
                wrapper = JournalTransaction(inner, storage.journal)
                try:
                    yield wrapper
                except BaseException:
                    storage.rollbacks += 1
                    raise
                if storage.fail_commits:
                    storage.fail_commits -= 1
                    storage.rollbacks += 1
                    raise tc.PersistenceError("commit failed: serialization failure")
                storage.journal.extend(wrapper.pending)
            if storage.lose_commit_acks:
                storage.lose_commit_acks -= 1
                raise tc.PersistenceError("connection lost during COMMIT")

        async def save_replies(
            replies: Any, *, now: float, transaction: Any = None
        ) -> Any:
            inner = (
                transaction.inner
                if isinstance(transaction, JournalTransaction)
                else transaction
            )
            return await original_save(replies, now=now, transaction=inner)

        messages.open_transaction = open_transaction  # type: ignore[method-assign]
        messages.save_replies = save_replies  # type: ignore[method-assign]


@attrs.define(eq=False, kw_only=True)
class Refused(Exception):
    reason: str


class Ledger(tc.Entity):
    type_name = "TxLedger"

    @tc.rpc(
        persisted=True,
        transactional=True,
        primary_key=lambda m: m.tx_id,
        errors=[Refused],
    )
    async def transfer(self, msg: Transfer) -> str:
        await tc.current_transaction().execute("insert %s %s", [msg.tx_id, msg.amount])
        if msg.amount < 0:
            raise Refused(reason="negative")
        if msg.amount == 0:
            raise RuntimeError("bug")
        return f"ok {msg.tx_id}"

    @tc.rpc(persisted=True, transactional=True)
    async def slow(self, msg: Transfer) -> None:
        await tc.current_transaction().execute("slow %s %s", [msg.tx_id, msg.amount])
        await trio.sleep(10)

    @tc.rpc
    async def outside(self, msg: Get) -> None:
        tc.current_transaction()


async def test_value_commits_writes_and_reply_together(autojump_clock):
    storage = JournalStorage()
    async with open_clocked_runner([Ledger], config(), storage) as runner:
        ref = runner.client(Ledger)("l")
        assert await ref.transfer(Transfer("t1", 5)) == "ok t1"
        assert storage.journal == ["insert t1 5"]
        # A duplicate gets the reply recorded in that transaction.
        assert await ref.transfer(Transfer("t1", 5)) == "ok t1"
        assert storage.journal == ["insert t1 5"]


async def test_declared_error_commits_and_crash_rolls_back(autojump_clock):
    storage = JournalStorage()
    async with open_clocked_runner([Ledger], config(), storage) as runner:
        ref = runner.client(Ledger)("l")
        with pytest.raises(Refused):
            await ref.transfer(Transfer("t2", -1))
        assert storage.journal == ["insert t2 -1"]
        with pytest.raises(tc.DeadLetteredError, match="bug") as raised:
            await ref.transfer(Transfer("t3", 0))
        assert raised.value.attempts == 3  # the default policy
        assert storage.journal == ["insert t2 -1"]  # every attempt rolled back
        assert storage.rollbacks == 3
        # The dead-lettered reply was recorded (outside the transaction): no
        # rerun.
        with pytest.raises(tc.DeadLetteredError, match="bug"):
            await ref.transfer(Transfer("t3", 0))
        assert storage.rollbacks == 3


async def test_interrupted_transactional_handler_rolls_back(autojump_clock):
    storage = JournalStorage()
    async with open_clocked_runner([Ledger], config(), storage) as runner:
        with trio.move_on_after(1):
            await runner.client(Ledger)("l").slow(Transfer("s", 1))
        await trio.sleep(20)
    assert storage.journal == []
    assert storage.rollbacks == 1


async def test_failed_commit_is_retried_after_a_backoff(autojump_clock):
    storage = JournalStorage()
    storage.fail_commits = 2
    cfg = config(entity_restart_backoff=0.5)
    async with open_clocked_runner([Ledger], cfg, storage) as runner:
        start = trio.current_time()
        assert await runner.client(Ledger)("l").transfer(Transfer("t4", 1)) == "ok t4"
        assert trio.current_time() - start == pytest.approx(0.5 + 1.0)
    assert storage.journal == ["insert t4 1"]
    assert storage.rollbacks == 2


async def test_rerun_after_a_commit_of_unknown_outcome_does_not_apply_twice(
    autojump_clock,
):
    # The first commit takes effect but reports a failure: the handler runs
    # again, finds its reply recorded, and rolls its second run back.
    storage = JournalStorage()
    storage.lose_commit_acks = 1
    cfg = config(entity_restart_backoff=0.5)
    async with open_clocked_runner([Ledger], cfg, storage) as runner:
        ref = runner.client(Ledger)("l")
        # The caller hears of the recorded reply (a notification) at once.
        assert await ref.transfer(Transfer("t6", 1)) == "ok t6"
        await trio.sleep(1)  # the rerun, after its backoff
        assert storage.journal == ["insert t6 1"]
        assert storage.rollbacks == 1
        assert await ref.transfer(Transfer("t6", 1)) == "ok t6"
    assert storage.journal == ["insert t6 1"]


async def test_current_transaction_outside_a_transactional_handler(autojump_clock):
    async with open_clocked_runner([Ledger]) as runner:
        with pytest.raises(tc.RemoteError, match="no current transaction"):
            await runner.client(Ledger)("l").outside(Get())


async def test_memory_storage_transactions_have_no_sql(autojump_clock):
    async with open_clocked_runner([Ledger]) as runner:
        with pytest.raises(tc.DeadLetteredError, match="has no SQL"):
            await runner.client(Ledger)("l").transfer(Transfer("t5", 1))


SUNK: list[str] = []


@attrs.frozen
class Sent:
    where: str


class Sink(tc.Entity):
    type_name = "TxSink"

    @tc.rpc(persisted=True)
    async def note(self, msg: Sent) -> None:
        SUNK.append(msg.where)


class Mixed(tc.Entity):
    type_name = "TxMixed"

    @tc.rpc(persisted=True, transactional=True)
    async def send_then_roll_back(self, msg: Get) -> None:
        sink: Any = tc.current_runner().client(Sink)("s")
        await sink.note.discard(Sent("inside"))
        with tc.outside_transaction():
            with pytest.raises(tc.NotInTransactionError):
                tc.current_transaction()
            await sink.note.discard(Sent("outside"))
        tc.current_transaction()  # inside again
        raise RuntimeError("an undeclared error rolls the transaction back")


async def test_outside_transaction_sends_at_once_what_the_rollback_keeps(
    autojump_clock,
):
    SUNK.clear()
    async with open_clocked_runner([Mixed, Sink]) as runner:
        await runner.client(Mixed)("m").send_then_roll_back.discard(Get())
        await trio.sleep(30)
    # Each run's send outside the transaction was stored; none inside was.
    assert SUNK
    assert set(SUNK) == {"outside"}


def test_a_transaction_without_savepoints_says_so():
    transaction = JournalTransaction(None, [])  # type: ignore[arg-type]
    with pytest.raises(
        tc.PersistenceError, match="JournalTransaction has no savepoints"
    ):
        transaction.savepoint()
