"""`RunnerListener`: the public observation seam of a runner (API).

In the spirit of `trio.abc.Instrument`: subclass `RunnerListener`, override the
events you care about, and pass instances to ``open_runner(listeners=[...])``.
The runner calls them synchronously, in its own tasks, at the moment each
thing happens, so a listener sees the runner's state exactly as it is then:

* ``shard_acquired(runner, shard, epoch)``: the runner serves ``shard`` from
  now on, under the lease it acquired at ``epoch`` (the fencing token every
  write of the shard carries);
* ``shard_stopping(runner, shard, epoch, graceful=...)``: it stops taking work
  for the shard. Graceful: the shard moved away or the runner is shutting
  down, and its running handlers get ``entity_termination_timeout`` to
  finish. Forced: the lease lapsed or the lock was lost, and its handlers are
  cancelled at once;
* ``shard_stopped(runner, shard, epoch)``: no handler of the shard runs on
  this runner any more;
* ``handler_started(runner, address, handler, epoch)`` and
  ``handler_finished(...)``: a handler of entity ``address`` runs under the
  shard epoch (volatile, persisted and stream handlers alike; ``on_start`` and
  ``on_stop`` are not handlers);
* ``runner_started(runner)`` / ``runner_stopping(runner)``: the runner is
  registered and serving / its graceful shutdown begins.

Events are called with the runner's address (a process may hold several
runners), and only for what happened after the listener was installed.
Listeners must be quick and must not block or raise: like Trio with a failing
instrument, a runner logs a listener's exception and stops calling that
listener. Read-only views complete the picture: `Runner.served_shards`,
`Runner.machine_id`, `Runner.live_runners` and `Runner.assignment`.

This is where users hook their own metrics and tracing; the deterministic
simulator (`trio_cluster.testing`) checks its invariants through it too.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ._core._addresses import EntityAddress, RunnerAddress, ShardId

__all__ = ["RunnerListener"]


class RunnerListener:
    """Base class of runner listeners; every event does nothing by default."""

    __slots__ = ()

    def runner_started(self, runner: RunnerAddress) -> None:
        """The runner is registered and serves its first shards."""

    def runner_stopping(self, runner: RunnerAddress) -> None:
        """The runner's graceful shutdown begins (it takes no more calls)."""

    def shard_acquired(self, runner: RunnerAddress, shard: ShardId, epoch: int) -> None:
        """``runner`` serves ``shard`` from now on, at lease epoch ``epoch``."""

    def shard_stopping(
        self, runner: RunnerAddress, shard: ShardId, epoch: int, *, graceful: bool
    ) -> None:
        """``runner`` takes no more work for ``shard``; graceful stops let
        running handlers finish (within the termination timeout) while the
        shard keeps its lease, forced stops (lease lapsed, lock lost) cancel
        them now. A graceful stop whose lock is lost or whose lease runs out
        meanwhile is escalated: this is called again, with ``graceful``
        false."""

    def shard_stopped(self, runner: RunnerAddress, shard: ShardId, epoch: int) -> None:
        """No handler of ``shard`` runs on ``runner`` any more."""

    def handler_started(
        self, runner: RunnerAddress, address: EntityAddress, handler: str, epoch: int
    ) -> None:
        """Handler ``handler`` of entity ``address`` starts, under ``epoch``."""

    def handler_finished(
        self, runner: RunnerAddress, address: EntityAddress, handler: str, epoch: int
    ) -> None:
        """Handler ``handler`` of entity ``address`` finished (returned, raised
        or was cancelled)."""
