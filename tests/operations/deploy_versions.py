"""Two versions of the same entities, before and after a deploy (for the
tests of `check_messages` and ``trio-cluster check-messages``).

Version 1 hosts ``deploy.Counter`` (``add``, ``reset``, ``peek``) and
``deploy.Ledger``. Version 2 changes ``add``'s message type (a new required
field), renames ``reset`` to ``clear``, makes ``peek`` volatile and drops
``deploy.Ledger``.
"""

from __future__ import annotations

import attrs

import trio_cluster as tc


@attrs.frozen
class Add:
    amount: int


@attrs.frozen
class AddV2:
    amount: int
    currency: str


@attrs.frozen
class Reset:
    to: int = 0


@attrs.frozen
class Entry:
    text: str


class CounterV1(tc.Entity):
    type_name = "deploy.Counter"

    @tc.rpc(persisted=True)
    async def add(self, message: Add) -> int:
        return message.amount

    @tc.rpc(persisted=True)
    async def reset(self, message: Reset) -> None:
        pass

    @tc.rpc(persisted=True)
    async def peek(self, message: Reset) -> int:
        return 0


class LedgerV1(tc.Entity):
    type_name = "deploy.Ledger"

    @tc.rpc(persisted=True)
    async def write(self, message: Entry) -> None:
        pass


class CounterV2(tc.Entity):
    type_name = "deploy.Counter"

    @tc.rpc(persisted=True)
    async def add(self, message: AddV2) -> int:
        return message.amount

    @tc.rpc(persisted=True)
    async def clear(self, message: Reset) -> None:
        pass

    @tc.rpc
    async def peek(self, message: Reset) -> int:
        return 0


V1 = [CounterV1, LedgerV1]
V2 = [CounterV2]
