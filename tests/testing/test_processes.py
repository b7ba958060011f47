"""`trio_cluster.testing.ChildProcess`: event lines, deadlines, signals (real
child processes, so real time; each wait is bounded)."""

from __future__ import annotations

import signal
import subprocess
import sys
from typing import TYPE_CHECKING

import pytest
import trio

from trio_cluster.testing import ChildProcess

if TYPE_CHECKING:
    from pathlib import Path

READY_THEN_WAIT = """
import json, sys
print("starting up")
print(json.dumps({"event": "ready", "port": 7}), flush=True)
print("not json {", flush=True)
print(json.dumps([1, 2]), flush=True)
sys.stdin.read()
print(json.dumps({"event": "stopped"}), flush=True)
"""


def python(code: str) -> list[str]:
    return [sys.executable, "-c", code]


async def test_events_are_read_and_waited_for() -> None:
    child = ChildProcess(python(READY_THEN_WAIT), name="child", stdin=subprocess.PIPE)
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            await nursery.start(child.run)
            assert child.running
            ready = await child.wait_event("ready", seconds=20)
            assert ready == {"event": "ready", "port": 7}
            assert child.event("stopped") is None
            assert child.process is not None
            assert child.process.stdin is not None
            await child.process.stdin.aclose()
            await child.wait_event("stopped", seconds=20)
            assert await child.wait_exit() == 0
    # Only JSON objects with an "event" are events.
    assert [event["event"] for event in child.events] == ["ready", "stopped"]
    assert not child.running


async def test_a_child_that_exits_first_fails_with_its_log(tmp_path: Path) -> None:
    code = "import sys; print('cannot start', file=sys.stderr); sys.exit(3)"
    child = ChildProcess(python(code), name="broken", log_path=tmp_path / "log")
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            await nursery.start(child.run)
            with pytest.raises(
                AssertionError, match="exited before printing a 'ready'"
            ):
                await child.wait_event("ready", seconds=20)
            assert await child.wait_exit() == 3
    failure = str(child.failure("failed"))
    assert failure.startswith("broken failed (exit status 3)")
    assert "cannot start" in failure


async def test_a_deadline_then_signals() -> None:
    child = ChildProcess(python("import time; time.sleep(60)"), name="sleeper")
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            await nursery.start(child.run)
            with pytest.raises(AssertionError, match="printed no 'ready' event within"):
                await child.wait_event("ready", seconds=0.2)
            child.freeze()
            child.resume()
            child.terminate()
            assert await child.wait_exit() == -signal.SIGTERM
            child.kill_leftover()  # gone already: nothing to do
            await child.aclose()


async def test_cancelling_run_kills_the_child() -> None:
    child = ChildProcess(python("import time; time.sleep(60)"))
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            await nursery.start(child.run)
            nursery.cancel_scope.cancel()
        assert await child.wait_exit() == -signal.SIGKILL
