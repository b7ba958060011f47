"""Fault schedules: what goes wrong, when, and for how long (test support).

A `FaultSchedule` is a list of faults, each starting at a virtual time
(seconds from the start of the schedule) and undoing itself after its
duration: a killed runner restarts, a frozen one thaws, a partition heals.
So a schedule always ends with a whole cluster, and Hypothesis can shrink one
to the few faults that matter; their ``repr`` reads as a story::

    FaultSchedule(faults=(KillRunner(at=2.0, runner=1, down_for=3.0),
                          FreezeRunner(at=4.5, runner=0, duration=6.0)))

`run_schedule` plays a schedule on a `SimulatedCluster`; the faults act
through its primitives (`SimulatedCluster.kill` and friends), which this
module knows only as a `FaultTarget`.
"""

from __future__ import annotations

import heapq
import math
from typing import TYPE_CHECKING, Protocol, TypeAlias

import attrs
import trio

from trio_cluster import ConfigError

if TYPE_CHECKING:
    from collections.abc import Iterable

    from trio_cluster.transport import RandomFaults

__all__ = [
    "Fault",
    "FaultSchedule",
    "FaultTarget",
    "FrameFaults",
    "FreezeRunner",
    "KillRunner",
    "LoseLockSession",
    "PartitionRunners",
    "SkewClock",
    "StopRunner",
    "StorageOutage",
    "run_schedule",
]


class FaultTarget(Protocol):
    """What faults act on: the primitives of a `SimulatedCluster`."""

    def runner(self, index: int) -> object:
        """Runner ``index``; raises `ConfigError` if there is none."""

    async def kill(self, index: int) -> None: ...
    def stop_soon(self, index: int) -> None: ...
    async def wait_stopped(self, index: int) -> None: ...
    def restart_soon(self, index: int) -> None: ...
    def freeze(self, index: int) -> None: ...
    def thaw(self, index: int) -> None: ...
    def partition(self, a: int, b: int) -> None: ...
    def heal(self, a: int, b: int) -> None: ...
    def storage_outage(
        self, index: int | None = None, *, hang: bool = False
    ) -> None: ...
    def end_storage_outage(
        self, index: int | None = None, *, hang: bool = False
    ) -> None: ...
    def lose_session(self, index: int) -> None: ...
    def skew_clock(self, index: int, seconds: float) -> None: ...
    def frame_faults(
        self, *, drop: float, duplicate: float, delay: float, max_delay: float
    ) -> RandomFaults: ...
    def end_frame_faults(self, token: RandomFaults) -> None: ...


def _time(_: object, attribute: attrs.Attribute[float], value: object) -> None:
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or value < 0
    ):
        raise ConfigError(
            f"{attribute.name} must be a finite number of seconds >= 0, got {value!r}"
        )


def _index(_: object, attribute: attrs.Attribute[int], value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(
            f"{attribute.name} must be a runner number >= 0, got {value!r}"
        )


def _probability(_: object, attribute: attrs.Attribute[float], value: object) -> None:
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not 0 <= value <= 1
    ):
        raise ConfigError(
            f"{attribute.name} must be a probability in [0, 1], got {value!r}"
        )


class _Lasting:
    """A fault undone ``duration`` seconds after it started."""

    __slots__ = ()
    at: float
    duration: float

    @property
    def end(self) -> float:
        return self.at + self.duration


class _Instant:
    """A fault that is not undone (it ends when it starts)."""

    __slots__ = ()
    at: float

    @property
    def end(self) -> float:
        return self.at

    async def _stop(self, cluster: FaultTarget) -> None:
        await trio.lowlevel.checkpoint()


@attrs.frozen
class _Down:
    """A runner down at ``at``, started again ``down_for`` later."""

    at: float = attrs.field(validator=_time)
    runner: int = attrs.field(validator=_index)
    down_for: float = attrs.field(validator=_time)

    @property
    def end(self) -> float:
        return self.at + self.down_for


@attrs.frozen
class KillRunner(_Down):
    """Kill a runner (SIGKILL) at ``at``; restart it ``down_for`` later."""

    async def _start(self, cluster: FaultTarget) -> None:
        await cluster.kill(self.runner)

    async def _stop(self, cluster: FaultTarget) -> None:
        cluster.restart_soon(self.runner)
        await trio.lowlevel.checkpoint()


@attrs.frozen
class StopRunner(_Down):
    """Stop a runner gracefully at ``at``, as a rolling deploy does (its
    shards drain and are released); start it again ``down_for`` later, or
    once its stop is over if that takes longer."""

    async def _start(self, cluster: FaultTarget) -> None:
        cluster.stop_soon(self.runner)
        await trio.lowlevel.checkpoint()

    async def _stop(self, cluster: FaultTarget) -> None:
        await cluster.wait_stopped(self.runner)
        cluster.restart_soon(self.runner)


@attrs.frozen
class FreezeRunner(_Lasting):
    """Freeze a runner (its storage calls and envelopes held, as with
    SIGSTOP) at ``at``, for ``duration``; then its held I/O goes through."""

    at: float = attrs.field(validator=_time)
    runner: int = attrs.field(validator=_index)
    duration: float = attrs.field(validator=_time)

    async def _start(self, cluster: FaultTarget) -> None:
        cluster.freeze(self.runner)
        await trio.lowlevel.checkpoint()

    async def _stop(self, cluster: FaultTarget) -> None:
        cluster.thaw(self.runner)
        await trio.lowlevel.checkpoint()


@attrs.frozen
class PartitionRunners(_Lasting):
    """Cut the network between runners ``a`` and ``b`` for ``duration``."""

    at: float = attrs.field(validator=_time)
    a: int = attrs.field(validator=_index)
    b: int = attrs.field(validator=_index)
    duration: float = attrs.field(validator=_time)

    async def _start(self, cluster: FaultTarget) -> None:
        if self.a != self.b:
            cluster.partition(self.a, self.b)
        await trio.lowlevel.checkpoint()

    async def _stop(self, cluster: FaultTarget) -> None:
        if self.a != self.b:
            cluster.heal(self.a, self.b)
        await trio.lowlevel.checkpoint()


@attrs.frozen
class StorageOutage(_Lasting):
    """Cut ``runner`` (None: every runner) off from storage for ``duration``:
    calls fail at once, or with ``hang`` wait for the end and then go
    through, late (those whose caller did not give up)."""

    at: float = attrs.field(validator=_time)
    runner: int | None = attrs.field(validator=attrs.validators.optional(_index))
    duration: float = attrs.field(validator=_time)
    hang: bool = False

    async def _start(self, cluster: FaultTarget) -> None:
        cluster.storage_outage(self.runner, hang=self.hang)
        await trio.lowlevel.checkpoint()

    async def _stop(self, cluster: FaultTarget) -> None:
        cluster.end_storage_outage(self.runner, hang=self.hang)
        await trio.lowlevel.checkpoint()


@attrs.frozen
class LoseLockSession(_Instant):
    """At ``at``, storage ends ``runner``'s lock session (a lost database
    connection): its locks are free at once."""

    at: float = attrs.field(validator=_time)
    runner: int = attrs.field(validator=_index)

    async def _start(self, cluster: FaultTarget) -> None:
        cluster.lose_session(self.runner)
        await trio.lowlevel.checkpoint()


@attrs.frozen
class SkewClock(_Instant):
    """At ``at``, ``runner``'s wall clock jumps to ``seconds`` off true time
    (for good: skew is not undone)."""

    at: float = attrs.field(validator=_time)
    runner: int = attrs.field(validator=_index)
    seconds: float = 0.0

    async def _start(self, cluster: FaultTarget) -> None:
        cluster.skew_clock(self.runner, self.seconds)
        await trio.lowlevel.checkpoint()


@attrs.frozen
class FrameFaults(_Lasting):
    """Drop, duplicate and/or delay transport frames between every pair of
    runners for ``duration`` (seeded by the cluster's seed)."""

    at: float = attrs.field(validator=_time)
    duration: float = attrs.field(validator=_time)
    drop: float = attrs.field(default=0.0, validator=_probability)
    duplicate: float = attrs.field(default=0.0, validator=_probability)
    delay: float = attrs.field(default=0.0, validator=_probability)
    max_delay: float = attrs.field(default=0.1, validator=_time)

    async def _start(self, cluster: FaultTarget) -> RandomFaults:
        await trio.lowlevel.checkpoint()
        return cluster.frame_faults(
            drop=self.drop,
            duplicate=self.duplicate,
            delay=self.delay,
            max_delay=self.max_delay,
        )


Fault: TypeAlias = (
    KillRunner
    | StopRunner
    | FreezeRunner
    | PartitionRunners
    | StorageOutage
    | LoseLockSession
    | SkewClock
    | FrameFaults
)
"""One fault of a `FaultSchedule`."""


def _faults(value: Iterable[Fault]) -> tuple[Fault, ...]:
    return tuple(value)


@attrs.frozen
class FaultSchedule:
    """Faults to inject, each with its start time (see the module docstring)."""

    faults: tuple[Fault, ...] = attrs.field(default=(), converter=_faults)

    @property
    def end(self) -> float:
        """When the last fault is undone (seconds from the start)."""
        return max((fault.end for fault in self.faults), default=0.0)

    def runners(self) -> frozenset[int]:
        """Every runner number the faults name."""
        named: set[int] = set()
        for fault in self.faults:
            for name in ("runner", "a", "b"):
                value = getattr(fault, name, None)
                if value is not None:
                    named.add(value)
        return frozenset(named)


async def run_schedule(cluster: FaultTarget, schedule: FaultSchedule) -> None:
    """Play ``schedule`` on ``cluster`` from now; return when every fault
    has been undone.

    Raises:
        ConfigError: a fault names a runner the cluster does not have.
    """
    for number in sorted(schedule.runners()):
        cluster.runner(number)  # raises ConfigError
    start = trio.current_time()
    # Starts and ends on one timeline, in time order; at equal times ends
    # come first (a fault that ends when another begins is over by then),
    # then schedule order.
    timeline = [(fault.at, 1, order) for order, fault in enumerate(schedule.faults)]
    heapq.heapify(timeline)
    tokens: dict[int, RandomFaults] = {}
    while timeline:
        at, phase, order = heapq.heappop(timeline)
        await trio.sleep_until(start + at)
        fault = schedule.faults[order]
        if phase == 1:
            if isinstance(fault, FrameFaults):
                tokens[order] = await fault._start(cluster)
            else:
                await fault._start(cluster)
            heapq.heappush(timeline, (fault.end, 0, order))
        elif isinstance(fault, FrameFaults):
            cluster.end_frame_faults(tokens.pop(order))
        else:
            await fault._stop(cluster)
