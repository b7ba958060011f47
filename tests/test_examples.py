"""The examples and the README example run, and do what they say."""

from __future__ import annotations

import sys
import time
from types import ModuleType

import pytest
import trio

from trio_cluster.storage import MemoryStorage

from .helpers import EXAMPLES, ORIGIN, load_example


async def test_counter_example(autojump_clock, capsys):
    assert await load_example("counter").main() == [7, 11]
    assert "apples=7 pears=11" in capsys.readouterr().out


async def test_bank_account_example(autojump_clock, capsys):
    assert await load_example("bank_account").main() == 120
    out = capsys.readouterr().out
    assert "deposit t1 again: 100" in out
    assert "withdraw w1 refused: balance 150, requested 500" in out


async def test_bank_account_example_on_shared_storage(autojump_clock):
    module = load_example("bank_account")
    storage = MemoryStorage()
    assert await module.main(storage) == 120
    # A second run on the same storage: every deposit and withdrawal is a
    # duplicate, so none runs again and each returns its stored reply. The
    # entity's balance lives in memory only, so the new incarnation reads 0:
    # persisted messages are not persisted state.
    assert await module.main(storage) == 0


async def test_order_fsm_example(autojump_clock, capsys):
    module = load_example("order_fsm")
    assert await module.main() == [
        module.Shipped(30, "TRACK-1"),
        module.Cancelled("changed my mind", refunded=0),
        module.Cancelled("not shipped in time", refunded=50),
    ]
    out = capsys.readouterr().out
    assert "o1 went through ['Pending', 'Paid', 'Shipped']" in out
    assert "o2: transition pay is not allowed in state cancelled" in out


async def test_order_fsm_example_state_is_durable(autojump_clock):
    # A second run on the same storage continues every order from its
    # stored state: each transition of the script is now invalid.
    module = load_example("order_fsm")
    storage = MemoryStorage()
    first = await module.main(storage)
    clock = module.tc.TrioWallClock(origin=ORIGIN + 1000)
    async with module.tc.open_runner(
        entities=[module.Order], storage=storage, clock=clock
    ) as runner:
        orders = runner.client(module.Order)
        states = [
            await orders(o).current_state(module.tc.GetState())
            for o in ("o1", "o2", "o3")
        ]
        assert states == first
        with pytest.raises(module.tc.InvalidTransitionError, match="state shipped"):
            await orders("o1").pay(module.Pay(1))


async def test_chat_room_example(autojump_clock):
    assert await load_example("chat_room").main() == [
        "ada: hello",
        "ada: anyone here?",
        "bob: hi ada!",
    ]


async def test_readme_example_runs(autojump_clock, capsys):
    readme = (EXAMPLES.parent / "README.md").read_text()
    code = readme.split("```python\n", 1)[1].split("```", 1)[0]
    assert code.rstrip().endswith("trio.run(main)")
    module = ModuleType("readme_example")
    sys.modules["readme_example"] = module
    exec(
        compile(code.replace("trio.run(main)", ""), "README.md", "exec"),
        module.__dict__,
    )
    await module.main()
    assert capsys.readouterr().out.split() == ["10", "10"]


async def test_job_queue_example(autojump_clock, capsys):
    assert await load_example("job_queue").main() == ["o1", "o2", "o3", "o4"]
    out = capsys.readouterr().out
    assert "o6 rolled back: no confirmation" in out
    assert "ValueError: no mailbox for nobody" in out


async def test_store_then_publish_example(autojump_clock, capsys):
    assert await load_example("store_then_publish").main() == ["o1", "o3"]
    out = capsys.readouterr().out
    assert "o2 failed: nothing stored, nothing published" in out
    assert "shipping o2" not in out


async def test_webhooks_example(capsys):
    # Real time: a real HTTP receiver on the loopback interface.
    processed = await load_example("webhooks").main()
    # Deliveries of an unordered endpoint may run in any order.
    assert sorted(processed) == ["customer.created", "invoice.paid", "invoice.sent"]
    out = capsys.readouterr().out
    assert "receiver: refused (no matching signature)" in out
    assert "forged request: HTTP 401" in out
    assert "again: already handled" in out
    assert ": failure (HTTP 500)" in out
    assert ": success (HTTP 200)" in out


async def test_gateway_counter_example(capsys):
    """Real sockets on 127.0.0.1 (no virtual time)."""
    with trio.fail_after(30):
        assert await load_example("gateway_counter").main() == [
            2,
            5,
            "refused: at most 100",
        ]
    assert "refused: at most 100" in capsys.readouterr().out


async def test_parallel_shipping_example(autojump_clock, capsys):
    ledger = await load_example("parallel_shipping").main()
    out = capsys.readouterr().out
    assert "o1: ['signed-book', 'signed-lamp']" in out
    assert "o1 took 3 minutes" in out  # the parcels travelled at once
    assert (
        "o1 journal: [('step', (0,)), ('nursery', (1,)), ('child', (1, 0, 0)),"
        " ('child', (1, 1, 0))]"
    ) in out
    assert "o2 compensated: ((1, 0, 0), (0,))" in out
    assert "o3: compensated - Interrupted: customer cancelled" in out
    # Each note to Accounts once (sent with its transactional step's result).
    notes = [line for line in ledger if line.startswith("accounts:")]
    assert sorted(notes) == sorted(
        [
            "accounts: charged 40 for o1",
            "accounts: charged 70 for o2",
            "accounts: refunded ch-o2",
            "accounts: charged 90 for o3",
            "accounts: refunded ch-o3",
        ]
    )
    # Compensations newest position first: the lost parcel's child undid
    # itself, then the delivered parcel was recalled, then the refund.
    order = [
        ledger.index(line)
        for line in ("unpack box-vase", "recall signed-desk", "refund ch-o2")
    ]
    assert order == sorted(order)
    # The interrupt reached the child in transit before the refund.
    assert ledger.index("unpack box-rug") < ledger.index("refund ch-o3")
    assert "deliver rug" not in ledger


async def test_order_saga_example(autojump_clock, capsys):
    ledger = await load_example("order_saga").main()
    assert ledger == [
        "reserve book for o1",
        "charge 30 for o1",
        "ship o1",
        "reserve lamp for o2",
        "release res-o2",
        "reserve desk for o3",
        "charge 200 for o3",
        "refund ch-o3",
        "release res-o3",
    ]
    out = capsys.readouterr().out
    assert "o2: workflow 'o2' compensated: StepFailedError" in out
    assert "o3 is compensated" in out


async def test_durable_sleep_example(autojump_clock, capsys):
    assert (await load_example("durable_sleep").main(delay=5.0)).sent_by.endswith(":2")
    out = capsys.readouterr().out
    assert "127.0.0.1:1 sleeps until" in out
    assert "reminder r1: 'water the plants' (sent by 127.0.0.1:2)" in out


async def test_durable_sleep_example_sleeps_30_days_through_a_kill(autojump_clock):
    # Virtual time: 30 days pass in a fraction of a second; the runner that
    # noted the reminder is killed at once, and the one that took over its
    # shard sends it when the 30 days are over, not before.
    module = load_example("durable_sleep")
    start = trio.current_time()
    cpu = time.process_time()
    sent = await module.main(delay=30 * 86400.0, lease=3 * 86400.0)
    assert (sent.noted_by, sent.sent_by) == ("127.0.0.1:1", "127.0.0.1:2")
    assert 0 <= sent.sent_at - sent.due < 1.0  # two clocks, read at two instants
    assert trio.current_time() - start == pytest.approx(30 * 86400.0, abs=10)
    assert time.process_time() - cpu < 1.0
