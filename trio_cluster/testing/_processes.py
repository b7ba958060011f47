"""Child processes that report on stdout in JSON lines (test support, real time).

Multi-process tests and benchmarks start runners (``python -m trio_cluster
run ...``) or helper servers in child processes and must know when each one
is ready. `ChildProcess` starts a command with its stdout piped, reads that
stdout line by line in a task, and records every line that is a JSON object
with an ``"event"`` key. `ChildProcess.wait_event` waits for the first event
of a name within a deadline, and fails loudly, with the exit status and the
end of the child's log, if the child exits first or the deadline passes.

``python -m trio_cluster run`` prints ``{"event": "ready", "address": ...}``
once it serves its shards and ``{"event": "stopped"}`` after a graceful
shutdown, so for a runner::

    child = ChildProcess(
        [sys.executable, "-m", "trio_cluster", "run", "app:ENTITIES", ...],
        name="b",
        log_path=tmp_path / "b.log",
    )
    await nursery.start(child.run)
    address = (await child.wait_event("ready", seconds=30))["address"]
    child.kill()

It also sends signals (`ChildProcess.kill` is ``kill -9``, ``freeze`` is
SIGSTOP, ``resume`` SIGCONT, ``terminate`` SIGTERM) and waits for the exit.
Everything is real time: it runs real processes.
"""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
from typing import TYPE_CHECKING, Any

import trio

if TYPE_CHECKING:
    import os
    from collections.abc import Mapping, Sequence
    from pathlib import Path

_LOG_TAIL = 3000
"""Characters of the child's log quoted in a failure."""


class ChildProcess:
    """A child process whose stdout is read as JSON event lines.

    Args:
        command: the program and its arguments.
        name: how failures name the process (default: the program).
        env: the child's environment (default: this process's).
        cwd: the child's working directory.
        log_path: a file the child's stderr is appended to (default: this
            process's stderr); failures quote its end.
        stdin: the child's stdin, ``subprocess.DEVNULL`` (the default) or
            ``subprocess.PIPE`` (then write to or close ``process.stdin``).
    """

    def __init__(
        self,
        command: Sequence[str],
        *,
        name: str | None = None,
        env: Mapping[str, str] | None = None,
        cwd: str | os.PathLike[str] | None = None,
        log_path: Path | None = None,
        stdin: int = subprocess.DEVNULL,
    ) -> None:
        self.command = list(command)
        self.name = name if name is not None else self.command[0]
        self.env = None if env is None else dict(env)
        self.cwd = cwd
        self.log_path = log_path
        self.stdin = stdin
        self.process: trio.Process | None = None
        """The running process, once `run` has started it."""
        self.events: list[dict[str, Any]] = []
        """Every event line read so far, in order."""
        self._eof = False
        self._changed = trio.Event()

    def __repr__(self) -> str:
        return f"<ChildProcess {self.name} pid={self.pid}>"

    @property
    def pid(self) -> int | None:
        return None if self.process is None else self.process.pid

    @property
    def running(self) -> bool:
        """Whether the process was started and has not exited."""
        return self.process is not None and self.process.poll() is None

    async def run(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Start the process, then read its stdout until it closes.

        For ``await nursery.start(child.run)``: ``started()`` is called once
        the process exists (not when it is ready: see `wait_event`). If this
        task is cancelled or fails, the process is killed (SIGCONT, then
        SIGKILL), not waited for.

        Raises:
            OSError: the command cannot be started (before ``started()``).
        """
        with contextlib.ExitStack() as stack:
            stderr = None
            if self.log_path is not None:
                stderr = stack.enter_context(self.log_path.open("ab"))
            self.process = await trio.lowlevel.open_process(
                self.command,
                stdin=self.stdin,
                stdout=subprocess.PIPE,
                stderr=stderr,
                env=self.env,
                cwd=self.cwd,
            )
        task_status.started()
        try:
            await self._read_stdout()
        except BaseException:
            self.kill_leftover()
            raise

    async def _read_stdout(self) -> None:
        assert self.process is not None
        assert self.process.stdout is not None
        buffer = b""
        try:
            while chunk := await self.process.stdout.receive_some(65536):
                buffer += chunk
                *lines, buffer = buffer.split(b"\n")
                for line in lines:
                    self._on_line(line.decode(errors="replace"))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            self._eof = True
            self._notify()

    def _on_line(self, line: str) -> None:
        try:
            event = json.loads(line)
        except ValueError:
            return
        if isinstance(event, dict) and isinstance(event.get("event"), str):
            self.events.append(event)
            self._notify()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    def event(self, name: str) -> dict[str, Any] | None:
        """The first event line named ``name`` read so far, if any."""
        return next((event for event in self.events if event["event"] == name), None)

    async def wait_event(self, name: str, *, seconds: float) -> dict[str, Any]:
        """Wait for the first event line named ``name``; return it.

        Raises:
            AssertionError: the child's stdout closed (it exited) first, or
                ``seconds`` passed first; the message quotes its log.
        """
        with trio.move_on_after(seconds):
            while (found := self.event(name)) is None and not self._eof:
                await self._changed.wait()
            if found is not None:
                return found
            raise self.failure(f"exited before printing a {name!r} event")
        raise self.failure(f"printed no {name!r} event within {seconds} s")

    def log_text(self) -> str:
        """The child's stderr so far (empty without a ``log_path``)."""
        if self.log_path is None or not self.log_path.exists():
            return ""
        return self.log_path.read_text(errors="replace")

    def failure(self, what: str) -> AssertionError:
        """An error saying ``what`` happened, with the exit status and the
        end of the log."""
        returncode = None if self.process is None else self.process.returncode
        tail = self.log_text()[-_LOG_TAIL:]
        return AssertionError(
            f"{self.name} {what} (exit status {returncode}); its log ends:\n{tail}"
        )

    def send_signal(self, signum: signal.Signals) -> None:
        assert self.process is not None, f"{self.name} was never started"
        self.process.send_signal(signum)

    def kill(self) -> None:
        """SIGKILL (``kill -9``)."""
        self.send_signal(signal.SIGKILL)

    def freeze(self) -> None:
        """SIGSTOP."""
        self.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        """SIGCONT."""
        self.send_signal(signal.SIGCONT)

    def terminate(self) -> None:
        """SIGTERM (a trio_cluster runner then shuts down gracefully)."""
        self.send_signal(signal.SIGTERM)

    async def wait_exit(self, seconds: float = 30.0) -> int:
        """Wait for the process to exit; return its exit status.

        Raises:
            AssertionError: it still runs after ``seconds``.
        """
        assert self.process is not None, f"{self.name} was never started"
        with trio.move_on_after(seconds):
            return await self.process.wait()
        raise self.failure(f"did not exit within {seconds} s")

    def kill_leftover(self) -> None:
        """SIGCONT then SIGKILL, if the process still runs (no waiting)."""
        if self.running:
            assert self.process is not None
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(signal.SIGCONT)
                self.process.send_signal(signal.SIGKILL)

    async def aclose(self, seconds: float = 10.0) -> None:
        """Kill the process if it still runs, and wait for it to exit
        (shielded from cancellation, at most ``seconds``)."""
        self.kill_leftover()
        with trio.CancelScope(shield=True), trio.move_on_after(seconds):
            if self.process is not None:
                await self.process.wait()
