"""Claiming stored requests (`trio_cluster._engine._claims`) on memory storage:
a stored request that cannot be turned into a delivery (a "poison row") is
answered with a typed error and kept, and the runner goes on serving every
other request.

The poison rows are saved straight into storage by another session, as a
foreign writer, an older version or a hand-edited row would leave them: the
API edge would have refused them (entity ids are built with attrs'
validators disabled).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import attrs
import pytest
import trio

import trio_cluster as tc
from trio_cluster.abc import PersistedRequest, ReplyQuery
from trio_cluster.storage import MemoryStorage

from ..helpers import (
    Account,
    Count,
    Counter,
    Deposit,
    Elsewhere,
    Get,
    config,
    open_clocked_runner,
)

POISON_ID = 9001


def unchecked_id(value: str) -> tc.EntityId:
    """An `EntityId` the validator would refuse (as storage may hold one)."""
    with attrs.validators.disabled():
        return tc.EntityId(value)


def account_at(runner: tc.Runner, entity_id: tc.EntityId) -> tc.EntityAddress:
    """``Account/<entity_id>`` in the shard of a valid id (served here)."""
    return tc.EntityAddress(
        "Account", entity_id, runner.client(Account).address_of("ivy").shard
    )


def wrong_shard(runner: tc.Runner) -> tc.EntityAddress:
    right = runner.client(Account).address_of("ivy").shard
    other = tc.ShardId(right.group, right.number % 8 + 1)
    return tc.EntityAddress("Account", tc.EntityId("ivy"), other)


def wrong_group(runner: tc.Runner) -> tc.EntityAddress:
    # `Elsewhere` lives in the "batch" group: never in a "default" shard.
    shard = runner.client(Account).address_of("ivy").shard
    return tc.EntityAddress("Elsewhere", tc.EntityId("ivy"), shard)


Row = tuple[Callable[[tc.Runner], tc.EntityAddress], str, Any, type[Exception], str]

POISON_ROWS: dict[str, Row] = {
    "empty id": (
        lambda r: account_at(r, unchecked_id("")),
        "deposit",
        Deposit("p", 1),
        tc.InvalidIdError,
        "non-empty",
    ),
    "padded id": (
        lambda r: account_at(r, unchecked_id(" ivy ")),
        "deposit",
        Deposit("p", 1),
        tc.InvalidIdError,
        "whitespace",
    ),
    "over-long id": (
        lambda r: account_at(r, unchecked_id("x" * 256)),
        "deposit",
        Deposit("p", 1),
        tc.InvalidIdError,
        "over 255",
    ),
    "NUL in id": (
        lambda r: account_at(r, unchecked_id("a\x00b")),
        "deposit",
        Deposit("p", 1),
        tc.InvalidIdError,
        "NUL",
    ),
    "lone surrogate in id": (
        lambda r: account_at(r, unchecked_id("a\ud800")),
        "deposit",
        Deposit("p", 1),
        tc.InvalidIdError,
        "surrogate",
    ),
    "id in the wrong shard": (
        wrong_shard,
        "deposit",
        Deposit("p", 1),
        tc.MalformedMessageError,
        "belongs to shard",
    ),
    "type in the wrong group": (
        wrong_group,
        "ping",
        Get(),
        tc.MalformedMessageError,
        "belongs to shard batch:",
    ),
    "unknown entity type": (
        lambda r: tc.EntityAddress("Ghost", tc.EntityId("g"), wrong_shard(r).shard),
        "deposit",
        Deposit("p", 1),
        tc.UnknownEntityTypeError,
        "Ghost",
    ),
    "unknown handler": (
        lambda r: account_at(r, tc.EntityId("ivy")),
        "withdraw",
        Deposit("p", 1),
        tc.UnknownEntityTypeError,
        "withdraw",
    ),
    "stream handler": (
        lambda r: r.client(Counter).address_of("ivy"),
        "count",
        Count(2),
        tc.UnknownEntityTypeError,
        "count",
    ),
    "volatile handler": (
        lambda r: account_at(r, tc.EntityId("ivy")),
        "applied_ids",
        Get(),
        tc.MalformedMessageError,
        "Account.applied_ids is volatile",
    ),
    "undecodable payload": (
        lambda r: account_at(r, tc.EntityId("ivy")),
        "deposit",
        b"\xc1",
        tc.MalformedMessageError,
        "malformed",
    ),
}


def encoded(runner: tc.Runner, address: tc.EntityAddress, tag: str, msg: Any) -> bytes:
    """``msg`` encoded for ``tag`` (as `Account.deposit` if unknown here)."""
    if isinstance(msg, bytes):
        return msg
    entity_type = runner._registry.get(address.entity_type)
    if entity_type is None or tag not in entity_type.handlers:
        entity_type, tag = runner._registry.get("Account"), "deposit"
    assert entity_type is not None
    return entity_type.handlers[tag].message.encode(msg)


@pytest.mark.parametrize("case", list(POISON_ROWS))
async def test_a_poison_row_gets_a_typed_error_and_the_runner_serves_on(
    autojump_clock, case
):
    # Regression (issue 11, item 6): such a row was delivered anyway (an
    # entity ran under an id the API refuses, or a second instance of an
    # entity ran in a shard that is not its own; a stream handler crashed its
    # entity), and on PostgreSQL it killed the runner on every restart. A
    # volatile handler ran from storage, redelivered (issue 12, item 5).
    make_address, tag, msg, error, match = POISON_ROWS[case]
    storage = MemoryStorage()
    entities = [Account, Counter, Elsewhere]
    async with open_clocked_runner(entities, config(), storage) as runner:
        await runner.wait_shards_acquired()
        address = make_address(runner)
        poison = PersistedRequest(
            request_id=POISON_ID,
            address=address,
            tag=tag,
            payload=encoded(runner, address, tag, msg),
        )
        async with storage.open_session(name="writer", lease_duration=60) as writer:
            await writer.messages.save_requests([poison], now=runner.clock.now())
            await trio.sleep(5)
            # The runner serves on, the poison row's shard included.
            accounts = runner.client(Account)
            assert await accounts("ivy").deposit(Deposit("after", 2)) == 2
            [stored] = await writer.messages.replies_for([ReplyQuery(POISON_ID)])
        assert stored.known  # kept for inspection, not deleted
        assert stored.final is not None
        reply = runner._registry.generic_reply.decode_exit(stored.final)
        assert isinstance(reply.error, error), reply
        assert match in str(reply.error)
        assert runner.statistics().persisted_delivered == 1  # only "after" ran


# ----------------------------------------------------------------------
# The read loop waits while it cannot claim


@attrs.frozen
class Hold:
    key: str
    at: float | None = None


class Holder(tc.Entity):
    """Its persisted handler runs until cancelled; ``later`` is due at ``at``."""

    type_name = "ClaimsHolder"

    @tc.rpc(persisted=True, primary_key=lambda m: m.key)
    async def hold(self, msg: Hold) -> None:
        await trio.sleep_forever()

    @tc.rpc(persisted=True, primary_key=lambda m: m.key, deliver_at=lambda m: m.at)
    async def later(self, msg: Hold) -> str:
        return msg.key


class StepBudget(trio.abc.Instrument):
    """Cancels ``scope`` after ``limit`` task steps: a busy loop stops
    virtual time, so the test would otherwise never end."""

    def __init__(self, scope: trio.CancelScope, limit: int) -> None:
        self.scope, self.limit, self.steps = scope, limit, 0

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        self.steps += 1
        if self.steps == self.limit:
            self.scope.cancel()


async def test_a_due_request_at_the_in_flight_limit_does_not_spin(autojump_clock):
    # Regression (found by the simulator's state machine property): at the
    # in-flight limit the read loop does not claim, but it took a request's
    # due time, once past, as a reason to wake at once, again and again: a
    # busy loop (virtual time stood still; a real runner burned a core)
    # until a job ended.
    cfg = attrs.evolve(config(), max_persisted_in_flight=1)
    with trio.CancelScope() as scope:
        budget = StepBudget(scope, 200_000)
        trio.lowlevel.add_instrument(budget)
        try:
            async with (
                open_clocked_runner([Holder], cfg) as runner,
                trio.open_nursery() as nursery,
            ):
                client = runner.client(Holder)("h")
                nursery.start_soon(client.hold, Hold("busy"))
                await trio.sleep(0.1)  # the one job in flight runs
                at = runner.clock.now() + 1.0
                await client.later.discard(Hold("due", at=at))
                await trio.sleep(30)  # due after 1 s; the limit keeps it
                steps = budget.steps
                await trio.sleep(30)
                assert budget.steps - steps < 5_000, "the read loop spins"
                nursery.cancel_scope.cancel()
        finally:
            trio.lowlevel.remove_instrument(budget)
    assert not scope.cancelled_caught, "the read loop spins (virtual time stopped)"
