"""The examples and the demo run, and do what they say."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

from trio_cluster._cli._demo import run_demo
from trio_cluster._cli._main import main as cli_main
from trio_cluster.storage import MemoryStorage

EXAMPLES = Path(__file__).parent.parent / "examples"


def load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        f"example_{name}", EXAMPLES / f"{name}.py"
    )
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # attrs/cattrs resolve annotations through it
    spec.loader.exec_module(module)
    return module


async def test_counter_example(autojump_clock, capsys):
    assert await load("counter").main() == [7, 11]
    assert "apples=7 pears=11" in capsys.readouterr().out


async def test_bank_account_example(autojump_clock, capsys):
    assert await load("bank_account").main() == 120
    out = capsys.readouterr().out
    assert "deposit t1 again: 100" in out
    assert "withdraw w1 refused: balance 150, requested 500" in out


async def test_bank_account_example_on_shared_storage(autojump_clock):
    module = load("bank_account")
    storage = MemoryStorage()
    assert await module.main(storage) == 120
    # A second run on the same storage: every deposit and withdrawal is a
    # duplicate, so none runs again and each returns its stored reply. The
    # entity's balance lives in memory only, so the new incarnation reads 0:
    # persisted messages are not persisted state.
    assert await module.main(storage) == 0


async def test_chat_room_example(autojump_clock):
    assert await load("chat_room").main() == [
        "ada: hello",
        "ada: anyone here?",
        "bob: hi ada!",
    ]


async def test_demo_tour(autojump_clock):
    lines: list[str] = []
    await run_demo(lines.append)
    text = "\n".join(lines)
    assert "visit 'home'   -> 3 visit(s)" in text
    assert "deposit t1 again (a retry) -> 100" in text
    assert "reminded: pay rent" in text
    assert "follower got 'bob: hi ada'" in text
    assert "RemoteError: RuntimeError: disk on fire" in text
    assert "home visits after the restart: 0" in text
    assert "bob was reminded by the new runner: ['water plants']" in text


def test_cli_requires_a_command(capsys):
    with pytest.raises(SystemExit):
        cli_main([])
    assert "demo" in capsys.readouterr().err


@pytest.mark.slow
def test_python_dash_m_demo_runs():
    result = subprocess.run(
        [sys.executable, "-m", "trio_cluster", "demo"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "done." in result.stdout


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
