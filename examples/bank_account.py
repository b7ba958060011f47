"""A bank account with persisted, deduplicated deposits.

Deposits are stored before they run, so they survive a crash of the runner,
and each carries a transaction id used as its primary key: sending the same
deposit twice (a client retry) applies it once and returns the same reply.
Withdrawals can fail with a declared error, re-raised at the caller as itself.

Run it with ``python examples/bank_account.py``.
"""

from __future__ import annotations

import attrs
import trio

import trio_cluster as tc
from trio_cluster.abc import Storage


@attrs.frozen
class Deposit:
    tx_id: str
    amount: int


@attrs.frozen
class Withdraw:
    tx_id: str
    amount: int


@attrs.frozen
class GetBalance:
    pass


@attrs.define(eq=False, kw_only=True)
class InsufficientFunds(Exception):
    """Declared by ``withdraw``: crosses the wire and is re-raised as itself."""

    balance: int
    requested: int


class Account(tc.Entity):
    type_name = "Account"

    def __init__(self) -> None:
        self.balance = 0

    @tc.rpc(persisted=True, primary_key=lambda m: m.tx_id)
    async def deposit(self, msg: Deposit) -> int:
        self.balance += msg.amount
        return self.balance

    @tc.rpc(persisted=True, primary_key=lambda m: m.tx_id, errors=[InsufficientFunds])
    async def withdraw(self, msg: Withdraw) -> int:
        if msg.amount > self.balance:
            raise InsufficientFunds(balance=self.balance, requested=msg.amount)
        self.balance -= msg.amount
        return self.balance

    @tc.rpc
    async def balance_of(self, msg: GetBalance) -> int:
        return self.balance


async def main(storage: Storage | None = None) -> int:
    async with tc.open_runner(entities=[Account], storage=storage) as runner:
        alice = runner.client(Account)("alice")
        print("deposit t1:", await alice.deposit(Deposit("t1", 100)))
        print("deposit t2:", await alice.deposit(Deposit("t2", 50)))
        # A retry of t1 (same primary key) is not applied twice.
        print("deposit t1 again:", await alice.deposit(Deposit("t1", 100)))
        try:
            await alice.withdraw(Withdraw("w1", 500))
        except InsufficientFunds as exc:
            print(
                f"withdraw w1 refused: balance {exc.balance}, requested {exc.requested}"
            )
        print("withdraw w2:", await alice.withdraw(Withdraw("w2", 30)))
        balance = await alice.balance_of(GetBalance())
        print("balance:", balance)
        return balance


if __name__ == "__main__":
    trio.run(main)
