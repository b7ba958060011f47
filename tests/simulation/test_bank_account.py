"""The bank-account example under failure: no deposit is lost or applied twice.

``examples/bank_account.py``'s `Account` runs on a simulated cluster of three
runners while Hypothesis kills, freezes and partitions them. Clients deposit
through whichever runner is up, retrying each deposit with its transaction id
(the primary key) until it is answered.

Deposit ``k`` of an account is ``3**k``: a balance that is a sum of distinct
deposits has only 0s and 1s in base 3, so a deposit applied twice by one
incarnation of the account shows up as a digit 2 in a later reply. (The
balance lives in memory: when the account moves to another runner it starts
again from 0, and its persisted deposits that had no reply yet are applied
again there, exactly once. That is the contract; persisted messages are not
persisted state.)

Checked: every deposit is answered (and storage holds exactly one reply per
deposit: the simulator's own invariants), a retry of a deposit gets the
first answer again, and every answer includes its own deposit and no deposit
twice.
"""

from __future__ import annotations

import pytest
import trio
from hypothesis import given, strategies as st

import trio_cluster as tc
from trio_cluster.testing import (
    FaultSchedule,
    SimulatedCluster,
    fault_schedules,
    open_simulated_cluster,
    run_simulation,
)

from ..helpers import load_example

pytestmark = pytest.mark.simulation

bank = load_example("bank_account", module_name="example_bank_account_sim")


async def deposit(cluster: SimulatedCluster, account: str, number: int) -> int:
    """Deposit ``3**number`` through any runner that is up, retrying with the
    same transaction id until it is answered."""
    message = bank.Deposit(f"{account}-{number}", 3**number)
    attempt = number
    while True:
        attempt += 1
        runners = cluster.up()
        if runners:
            runner = runners[attempt % len(runners)].runner
            assert runner is not None
            try:
                balance: int = await runner.client(bank.Account)(account).deposit(
                    message
                )
            except tc.ClusterError:
                pass  # its runner died, or storage failed: send it again
            else:
                return balance
        await trio.sleep(0.5)


async def client(
    cluster: SimulatedCluster,
    account: str,
    count: int,
    answers: dict[tuple[str, int], list[int]],
) -> None:
    for number in range(count):
        answers[account, number] = [await deposit(cluster, account, number)]
        answers[account, number].append(await deposit(cluster, account, number))


async def bank_under_failure(
    faults: FaultSchedule, seed: int, deposits: dict[str, int]
) -> dict[tuple[str, int], list[int]]:
    answers: dict[tuple[str, int], list[int]] = {}
    async with open_simulated_cluster([bank.Account], runners=3, seed=seed) as cluster:
        with trio.fail_after(faults.end + 120):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(cluster.run_schedule, faults)
                for account, count in deposits.items():
                    nursery.start_soon(client, cluster, account, count, answers)
        await cluster.heal_all()
        await cluster.wait_quiescent()
    return answers


def digits(value: int) -> list[int]:
    """``value`` in base 3, least significant digit first."""
    result = []
    while value:
        value, digit = divmod(value, 3)
        result.append(digit)
    return result


@given(
    faults=fault_schedules(
        runners=3, duration=15.0, kinds={"kill", "freeze", "partition"}
    ),
    seed=st.integers(0, 2**16),
    deposits=st.dictionaries(
        st.sampled_from(["alice", "bob", "carol", "dave"]),
        st.integers(1, 6),
        min_size=1,
    ),
)
def test_no_deposit_is_lost_or_applied_twice(faults, seed, deposits):
    answers = run_simulation(bank_under_failure, faults, seed, deposits)
    assert len(answers) == sum(deposits.values())  # none lost
    for (account, number), (balance, again) in answers.items():
        assert again == balance, f"{account}-{number}: the retry got another balance"
        applied = digits(balance)
        assert set(applied) <= {0, 1}, f"{account}: a deposit applied twice: {balance}"
        assert applied[number] == 1, f"{account}-{number} missing from {balance}"
