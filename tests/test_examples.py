"""The examples and the README example run, and do what they say."""

from __future__ import annotations

import sys
from types import ModuleType

import trio

from trio_cluster.storage import MemoryStorage

from .helpers import EXAMPLES, load_example


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


async def test_gateway_counter_example(capsys):
    """Real sockets on 127.0.0.1 (no virtual time)."""
    with trio.fail_after(30):
        assert await load_example("gateway_counter").main() == [
            2,
            5,
            "refused: at most 100",
        ]
    assert "refused: at most 100" in capsys.readouterr().out
