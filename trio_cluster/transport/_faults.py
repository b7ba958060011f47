"""Frame-level fault injection for the memory transport (test support, no I/O).

`MemoryNetwork.fault` is a *fault hook*: a callable asked, for every frame
a memory connection carries, ``hook(sender, receiver)``; it returns what
happens to that frame, a `FrameFault` (or None: delivered normally). A frame
can be dropped, duplicated and/or delayed; delays are in (virtual) seconds and
keep the order of the frames on a connection, like network latency.

`RandomFaults` is the ready-made hook: seeded, so a run is reproducible. Each
(sender, receiver) pair draws from its own random stream derived from the
seed, so the decisions for one pair do not depend on how Trio happened to
interleave the traffic of other pairs.
"""

from __future__ import annotations

import math
import random
from typing import TYPE_CHECKING, TypeAlias

import attrs

from .._errors import ConfigError

if TYPE_CHECKING:
    from collections.abc import Callable, Collection

    from .._core._addresses import RunnerAddress

__all__ = ["FaultHook", "FrameFault", "RandomFaults"]


def _check_delay(_: object, __: object, value: object) -> None:
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or value < 0
    ):
        raise ConfigError(f"delay must be a finite number >= 0 seconds, got {value!r}")


@attrs.frozen
class FrameFault:
    """What happens to one frame: dropped, duplicated and/or delayed.

    Raises:
        ConfigError: ``delay`` is negative or not a finite number.
    """

    drop: bool = False
    """The frame is lost (the connection stays up)."""
    duplicate: bool = False
    """The frame is delivered twice (ignored if ``drop``)."""
    delay: float = attrs.field(default=0.0, validator=_check_delay)
    """Extra seconds before delivery; later frames of the connection wait
    behind it, so order is kept."""


FaultHook: TypeAlias = "Callable[[RunnerAddress, RunnerAddress], FrameFault | None]"
"""``hook(sender, receiver)`` is called once per frame; see `FrameFault`."""


def _check_probability(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"{name} must be a probability in [0, 1], got {value!r}")
    if not 0 <= value <= 1:
        raise ConfigError(f"{name} must be a probability in [0, 1], got {value!r}")
    return float(value)


class RandomFaults:
    """A seeded fault hook: each frame is independently dropped, duplicated
    or delayed with the given probabilities.

    Example::

        network.fault = RandomFaults(seed=7, drop=0.01, delay=0.2, max_delay=0.05)

    Args:
        seed: the seed; the same seed gives the same decisions for the same
            sequence of frames on each (sender, receiver) pair.
        drop: probability that a frame is lost.
        duplicate: probability that a frame is delivered twice.
        delay: probability that a frame is delayed.
        max_delay: a delayed frame waits a uniform random time in
            ``[0, max_delay)`` seconds.
        links: if given, only frames from ``sender`` to ``receiver`` for the
            ``(sender, receiver)`` pairs listed are affected.

    Raises:
        ConfigError: a probability outside [0, 1], or a negative
            ``max_delay``.
    """

    def __init__(
        self,
        seed: int | str,
        *,
        drop: float = 0.0,
        duplicate: float = 0.0,
        delay: float = 0.0,
        max_delay: float = 0.1,
        links: Collection[tuple[RunnerAddress, RunnerAddress]] | None = None,
    ) -> None:
        self._seed = seed
        self._drop = _check_probability("drop", drop)
        self._duplicate = _check_probability("duplicate", duplicate)
        self._delay = _check_probability("delay", delay)
        _check_delay(None, None, max_delay)
        self._max_delay = float(max_delay)
        self._links = None if links is None else frozenset(links)
        self._streams: dict[tuple[RunnerAddress, RunnerAddress], random.Random] = {}

    def __call__(self, sender: RunnerAddress, receiver: RunnerAddress) -> FrameFault:
        """Decide the fate of the next frame from ``sender`` to ``receiver``."""
        pair = (sender, receiver)
        if self._links is not None and pair not in self._links:
            return FrameFault()
        stream = self._streams.get(pair)
        if stream is None:
            stream = self._streams[pair] = random.Random(
                f"{self._seed}|{sender}|{receiver}"
            )
        # Always draw the same numbers per frame, so one decision never
        # shifts the stream of the next ones.
        drop, duplicate, delayed, amount = (stream.random() for _ in range(4))
        return FrameFault(
            drop=drop < self._drop,
            duplicate=duplicate < self._duplicate,
            delay=amount * self._max_delay if delayed < self._delay else 0.0,
        )
