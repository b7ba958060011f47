"""`Probe`: an entity that reports every execution to the simulator (test support).

Storage shows what happened to persisted requests, but not what ran where.
The probe's handlers record each execution (which runner, which shard epoch,
which message) in the `ProbeJournal` of the open simulated cluster, which
checks, at the instant a handler starts and again when it ends its work:

* **single executor**: no other living runner is running a handler of the
  same shard, and the runner running it serves the shard;
* **volatile at most once**: a volatile message (``touch``) never runs twice;
* **per-entity FIFO**: the persisted writes of one client stream first run
  in the order they were stored (a write that runs after a later one of its
  stream ran is a violation when it runs; one answered without running,
  dead-lettered, overtakes nothing), and within one shard epoch on one runner
  they run in increasing order, each at most once;
* **bounded attempts**: a persisted write starts at most as many times as
  its retry policy allows attempts (storage counts one per claim, and
  gives back the claims of writes a stopping shard never started), however
  often the runners running it are killed.

Replies name the execution (``r1@3#17``: run ``r1``, epoch 3, 17th
execution), so a client that gets two different replies for one primary key
has seen a request answered twice.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

import attrs
import trio

from trio_cluster import Entity, RetryPolicy, Runner, ShardId, current_runner, rpc

from ._invariants import Incarnation
from ._trace import SimulationTrace

if TYPE_CHECKING:
    from trio_cluster.abc import PersistedRequest


__all__ = ["Probe", "ProbeJournal", "ProbeTouch", "ProbeWrite", "install_journal"]

_JOURNAL: trio.lowlevel.RunVar[ProbeJournal] = trio.lowlevel.RunVar(
    "trio_cluster.simulation.probes"
)


@attrs.frozen
class ProbeWrite:
    """A persisted write: message ``seq`` of client stream ``stream``."""

    stream: int
    seq: int
    work: float = 0.0
    """Seconds the handler works (sleeps) before answering."""


@attrs.frozen
class ProbeTouch:
    """A volatile message; ``op`` is unique in the simulation."""

    op: int
    work: float = 0.0


def _write_number(key: str) -> tuple[int, int]:
    """The (stream, seq) of a write's primary key (`write_key`)."""
    stream, _, seq = key.partition(".")
    return int(stream), int(seq)


def write_key(message: ProbeWrite) -> str:
    """The primary key of a write (its stream and number)."""
    return f"{message.stream}.{message.seq}"


_WRITE_ATTEMPTS = 2
"""`Probe.write`'s attempts: few, so that two kills of the runners running
a write exhaust them (and a claim that failed to count would show)."""


class Probe(Entity):
    """An entity whose handlers report to the simulation's `ProbeJournal`.

    Only usable inside `open_simulated_cluster`.
    """

    type_name = "trio_cluster.testing.Probe"

    @rpc(
        persisted=True,
        primary_key=write_key,
        retry=RetryPolicy(max_attempts=_WRITE_ATTEMPTS),
    )
    async def write(self, message: ProbeWrite) -> str:
        return await _journal().run(self, message)

    @rpc
    async def touch(self, message: ProbeTouch) -> str:
        return await _journal().run(self, message)


def _journal() -> ProbeJournal:
    try:
        return _JOURNAL.get()
    except (LookupError, RuntimeError):
        raise RuntimeError(
            "no simulated cluster is open (use open_simulated_cluster)"
        ) from None


def install_journal(journal: ProbeJournal) -> Callable[[], None]:
    """Make ``journal`` the one `Probe` handlers of this ``trio.run`` report
    to (the open simulated cluster's); returns an undo."""
    token = _JOURNAL.set(journal)
    return lambda: _JOURNAL.reset(token)


@attrs.define(eq=False)
class _Execution:
    runner: str
    shard: ShardId
    epoch: int | None
    what: str


@attrs.define(eq=False, kw_only=True)
class ProbeJournal:
    """The executions of `Probe` handlers in one simulated cluster.

    Args:
        trace: where executions are recorded.
        fail: called with the text of a violation.
        incarnation_of: the run of a `Runner` of the cluster (None if it is
            not one of its runners).
        current_runs: the latest run of each runner (dead or alive).
    """

    _trace: SimulationTrace
    _fail: Callable[[str], None]
    _incarnation_of: Callable[[Runner], Incarnation | None]
    _current_runs: Callable[[], Iterable[Incarnation]]
    executions: int = attrs.field(init=False, default=0)
    _running: dict[ShardId, list[_Execution]] = attrs.field(init=False, factory=dict)
    _touched: dict[int, str] = attrs.field(init=False, factory=dict)
    _waiting: dict[int, set[int]] = attrs.field(init=False, factory=dict)
    """Per stream, the writes stored that never ran yet."""
    _overtaken: dict[tuple[int, int], str] = attrs.field(init=False, factory=dict)
    """Writes (stream, seq) a later write of their stream ran before, with
    the violation to report if they run after all (a write answered without
    running, dead-lettered, was overtaken by no run)."""
    _last_in_epoch: dict[tuple[str, ShardId, int | None, int], int] = attrs.field(
        init=False, factory=dict
    )
    _ops: int = attrs.field(init=False, default=0)
    _starts: dict[str, int] = attrs.field(init=False, factory=dict)
    """Per write key, the times it started on a living runner."""

    def next_op(self) -> int:
        """A fresh ``ProbeTouch.op`` number."""
        self._ops += 1
        return self._ops

    async def run(self, entity: Probe, message: ProbeWrite | ProbeTouch) -> str:
        incarnation = self._incarnation_of(current_runner())
        label = "?" if incarnation is None else incarnation.label
        shard = entity.address.shard
        epoch = None if incarnation is None else incarnation.serving.get(shard)
        what = (
            f"write {write_key(message)}"
            if isinstance(message, ProbeWrite)
            else f"touch {message.op}"
        )
        execution = _Execution(label, shard, epoch, what)
        self.executions += 1
        number = self.executions
        self._trace.record(
            "volatile" if isinstance(message, ProbeTouch) else "persisted",
            "%s runs %s on %s at %s@%s",
            label,
            what,
            entity.address.entity_id,
            shard,
            epoch,
        )
        if incarnation is None or incarnation.dead:
            # A killed process runs nothing: what its cancelled tasks still
            # do is an artefact of simulating the kill.
            if message.work:
                await trio.sleep(message.work)
            return f"{label}@{epoch}#{number}"
        if epoch is None:
            self._fail(
                f"single owner: {label} runs {what} of {entity.address} although it"
                f" does not serve shard {shard}"
            )
        self._check_alone(execution)
        if isinstance(message, ProbeWrite):
            self._check_order(entity, execution, message)
            self._check_attempts(execution, message)
        else:
            self._check_once(execution, message)
        running = self._running.setdefault(shard, [])
        running.append(execution)
        try:
            if message.work:
                await trio.sleep(message.work)
            if not incarnation.dead:  # killed meanwhile: it runs nothing
                self._check_alone(execution)
                if message.work and not incarnation.owns(shard, epoch):
                    self._fail(
                        f"lapsed lease: {label} ran {what} of shard {shard} on"
                        f" after it stopped serving it forced at epoch {epoch}"
                        " (the handler should have been cancelled)"
                    )
        finally:
            running.remove(execution)
        return f"{label}@{epoch}#{number}"

    def _may_act(self, execution: _Execution) -> bool:
        """Whether ``execution`` can still have effects: its run lives and
        still serves or drains its shard at its epoch (a handler of a shard
        stopped forced is cancelled at its next checkpoint and nothing of it
        leaves its runner)."""
        for incarnation in self._current_runs():
            if incarnation.label == execution.runner:
                return incarnation.owns(execution.shard, execution.epoch)
        return False

    def _check_alone(self, execution: _Execution) -> None:
        for other in self._running.get(execution.shard, ()):
            if other.runner != execution.runner and self._may_act(other):
                self._fail(
                    f"single owner: {execution.runner} runs {execution.what} of shard"
                    f" {execution.shard} at epoch {execution.epoch} while"
                    f" {other.runner} runs {other.what} at epoch {other.epoch}"
                )

    def _check_attempts(self, execution: _Execution, message: ProbeWrite) -> None:
        key = write_key(message)
        starts = self._starts[key] = self._starts.get(key, 0) + 1
        limit = _WRITE_ATTEMPTS
        if starts > limit:
            self._fail(
                f"bounded attempts: {execution.what} started {starts} times (now on"
                f" {execution.runner}), more than its {limit} attempts"
            )

    def _check_once(self, execution: _Execution, message: ProbeTouch) -> None:
        earlier = self._touched.get(message.op)
        if earlier is not None:
            self._fail(
                f"volatile at most once: {execution.what} ran on {earlier} and"
                f" again on {execution.runner}"
            )
        self._touched[message.op] = execution.runner

    def _check_order(
        self, entity: Probe, execution: _Execution, message: ProbeWrite
    ) -> None:
        key = (execution.runner, execution.shard, execution.epoch, message.stream)
        last = self._last_in_epoch.get(key)
        if last is not None and message.seq <= last:
            self._fail(
                f"FIFO: {execution.runner} ran write {write_key(message)} after"
                f" write {message.stream}.{last} in the same epoch"
                f" {execution.epoch} of shard {execution.shard}"
            )
        self._last_in_epoch[key] = message.seq
        overtaken = self._overtaken.pop((message.stream, message.seq), None)
        if overtaken is not None:
            self._fail(overtaken)
        waiting = self._waiting.get(message.stream)
        if waiting is None or message.seq not in waiting:
            return  # it ran before
        waiting.discard(message.seq)
        for seq in waiting:
            if seq < message.seq:
                # A violation once the earlier write runs; none if it is
                # answered without running (dead-lettered).
                self._overtaken.setdefault(
                    (message.stream, seq),
                    f"FIFO: write {write_key(message)} to {entity.address} ran"
                    f" (on {execution.runner}) before write {message.stream}.{seq},"
                    " which was stored earlier",
                )
        if not waiting:
            del self._waiting[message.stream]

    def answered(self, tag: str, primary_key: str | None) -> None:
        """A request got its final reply (called by the checker): a write
        answered without running (dead-lettered) waits no more, so the
        writes stored after it may run."""
        if tag != "write" or primary_key is None:
            return
        key = _write_number(primary_key)
        waiting = self._waiting.get(key[0])
        if waiting is not None and key[1] in waiting:
            # Answered without running: nothing overtook a run of it.
            waiting.discard(key[1])
            self._overtaken.pop(key, None)
            if not waiting:
                del self._waiting[key[0]]

    def stored(self, request: PersistedRequest) -> None:
        """Storage accepted ``request`` (called by the checker)."""
        if (
            request.address.entity_type == Probe.type_name
            and request.tag == "write"
            and request.primary_key is not None
        ):
            stream, seq = _write_number(request.primary_key)
            self._waiting.setdefault(stream, set()).add(seq)
