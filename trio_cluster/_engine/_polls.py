"""When sharding reads the live runners again (Trio driver).

Nothing is polled while nothing changes: `PollSchedule.next_poll` returns
when a read is asked for (`soon`: a registry announcement, a lost lock
session, shutdown), and otherwise only while something is pending:

* after a peer's connection dropped (`peer_lost`), at once and then after
  short, doubling delays (`QUICK_POLLS`, up to ``membership_poll_interval``)
  while the peer is still live in storage or wanted shards are still locked:
  the storage session of a killed process ends a few milliseconds after its
  connections drop;
* every ``membership_poll_interval`` while shards are wanted (locked
  elsewhere still), and while a peer whose connection dropped is still live
  in storage and its lease may still run out (frozen, cut off: its shards
  are taken as soon as its session ends, not at the next lease refresh). A
  peer alive after all is suspected no longer once its lease would have
  ended.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import trio

from .._core._retry import Backoff

if TYPE_CHECKING:
    from collections.abc import Callable

    from .._core._addresses import RunnerAddress
    from .._core._config import ShardingConfig
    from ._shard_table import ShardTable

__all__ = ["QUICK_POLLS", "PollSchedule"]

QUICK_POLLS = 0.01
"""First delay between the polls that follow a peer's lost connection (it
doubles up to ``membership_poll_interval``)."""


class PollSchedule:
    """When the assignment loop reads the live runners (module docstring).

    Args:
        config: the runner's policies (poll interval, lease timing).
        table: the live runners as of the last read.
        wanted: whether shards assigned here are still unlocked.
    """

    def __init__(
        self, config: ShardingConfig, table: ShardTable, wanted: Callable[[], bool]
    ) -> None:
        self._interval = config.membership_poll_interval
        self._suspicion = config.lease_duration + config.lease_refresh_interval
        self._table = table
        self._wanted = wanted
        self._asked = trio.Event()
        self._quick = Backoff(min(QUICK_POLLS, self._interval), self._interval)
        self._attempt: int | None = None
        """Quick polls made since a peer's connection dropped (None: none
        under way)."""
        self._suspects: dict[RunnerAddress, float] = {}
        """Peers whose connection dropped, with the time by which their lease
        must have ended if they are frozen or cut off."""

    def soon(self) -> None:
        """Ask for a read now."""
        self._asked.set()

    def peer_lost(self, peer: RunnerAddress) -> None:
        """The connection to ``peer`` dropped: a read now, quick ones after
        it, then reads at the interval while it may still be frozen."""
        self._suspects[peer] = trio.current_time() + self._suspicion
        self._attempt = 0
        self.soon()

    async def next_poll(self) -> None:
        """Return when the live runners are to be read (module docstring).
        Cancellation: nothing is lost (a read asked for stays asked)."""
        while True:
            with trio.move_on_after(self._delay()):
                await self._asked.wait()
            asked = self._asked.is_set()
            self._asked = trio.Event()
            if (
                asked
                or self._attempt is not None
                or self._wanted()
                or self._suspecting()
            ):
                return

    def _suspecting(self) -> bool:
        """Whether a peer whose connection dropped is still live in storage
        and its lease may still run out."""
        if self._suspects:
            now = trio.current_time()
            live = {runner.address for runner in self._table.live}
            for peer, until in list(self._suspects.items()):
                if until <= now or peer not in live:
                    del self._suspects[peer]
        return bool(self._suspects)

    def _delay(self) -> float:
        """How long to wait for the next read (unless one is asked for)."""
        attempt = self._attempt
        if attempt is None:
            return self._interval
        delay = self._quick.delay(attempt)
        if (not self._suspecting() and not self._wanted()) or delay >= self._interval:
            # Gone and taken over, or alive after all (a frozen or
            # partitioned peer stays live until its session ends).
            self._attempt = None
            return self._interval
        self._attempt = attempt + 1
        return delay
