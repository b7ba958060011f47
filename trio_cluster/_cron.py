"""Cron jobs: persisted schedules that run once per instant, cluster-wide.

Theory of operation: each `Cron` is an entity of the internal type
``trio_cluster.Cron`` whose id is the cron's name. One persisted, deduplicated
``tick`` message exists per scheduled instant (primary key = the instant,
``deliver_at`` = the instant). Running a tick schedules the next one, so the
chain survives crashes and restarts with the messages. A singleton per cron
re-sends the next tick whenever its shard starts somewhere; deduplication
makes that harmless, and it mends a chain broken by lost messages. A tick
delivered later than ``skip_if_older_than`` after its instant (the cluster was
down) is skipped, and the next one is scheduled from now.

Every runner of the cluster must be given the same crons (the function is
looked up by name on the runner that runs the tick). Crons live in the
``default`` shard group.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from datetime import UTC, datetime
from typing import ClassVar, TypeVar

import attrs

from ._context import runner_context
from ._core._checks import positive_seconds
from ._core._cron import CronSchedule
from ._entity import Entity
from ._errors import ConfigError, EntityDefinitionError
from ._handlers import rpc
from ._singletons import Singleton

T = TypeVar("T")

__all__ = ["Cron", "CronEntity", "CronTick", "cron_entity", "cron_singletons"]

log = logging.getLogger("trio_cluster.cron")


def _parse_schedule(value: object) -> CronSchedule:
    if isinstance(value, CronSchedule):
        return value
    if isinstance(value, str):
        return CronSchedule.parse(value)
    raise ConfigError(f"a cron schedule is a cron expression string, got {value!r}")


def _check_name(_: object, __: object, value: T) -> None:
    if (
        not isinstance(value, str)
        or not value
        or len(value) > 200
        or value.strip() != value
    ):
        raise EntityDefinitionError(
            f"a cron name must be 1-200 trimmed characters, got {value!r}"
        )


def _check_age(_: object, __: object, value: T) -> None:
    positive_seconds("skip_if_older_than", value)


@attrs.frozen
class Cron:
    """A persisted schedule: ``Cron("report", "0 * * * *", send_report)``.

    ``run`` receives the scheduled instant (aware UTC ``datetime``). An
    exception it raises is logged; the schedule goes on.
    """

    name: str = attrs.field(validator=_check_name)
    schedule: CronSchedule = attrs.field(converter=_parse_schedule)
    """A 5-field cron expression (minute hour day month weekday), in UTC."""
    run: Callable[[datetime], Awaitable[None]]
    skip_if_older_than: float = attrs.field(default=86_400.0, validator=_check_age)
    """Seconds: a tick delivered later than this after its instant is skipped."""


@attrs.frozen
class CronTick:
    """The persisted message of one scheduled instant."""

    name: str
    instant: float
    """Unix seconds of the scheduled instant."""


def _tick_key(tick: CronTick) -> str:
    return str(round(tick.instant))


def _tick_time(tick: CronTick) -> float:
    return tick.instant


class CronEntity(Entity):
    """Internal entity that runs the ticks of one cron (id = the cron's name)."""

    type_name = "trio_cluster.Cron"
    max_idle = 60.0
    crons: ClassVar[Mapping[str, Cron]] = {}
    """The crons of the runner this class was made for (see `cron_entity`)."""

    @rpc(persisted=True, primary_key=_tick_key, deliver_at=_tick_time)
    async def tick(self, tick: CronTick) -> None:
        runner = runner_context()
        cron = self.crons.get(tick.name)
        if cron is None:
            log.error(
                "cron %r is not configured on runner %s; tick dropped",
                tick.name,
                runner.address,
            )
            return
        now = runner.clock.now()
        if now - tick.instant > cron.skip_if_older_than:
            log.warning(
                "cron %s: skipping the run for %s (too old)",
                tick.name,
                _iso(tick.instant),
            )
        else:
            try:
                await cron.run(datetime.fromtimestamp(tick.instant, UTC))
            except Exception as exc:
                log.error(
                    "cron %s failed for %s", tick.name, _iso(tick.instant), exc_info=exc
                )
        after = datetime.fromtimestamp(max(tick.instant, runner.clock.now()), UTC)
        following = cron.schedule.next_after(after).timestamp()
        await self.tick.discard(CronTick(tick.name, following))


def _iso(instant: float) -> str:
    return datetime.fromtimestamp(instant, UTC).isoformat()


def cron_entity(crons: Sequence[Cron]) -> type[CronEntity]:
    """The cron entity class of one runner: `CronEntity` with its crons
    (same wire name, so every runner's ticks are the same messages)."""
    return type("CronEntity", (CronEntity,), {"crons": {c.name: c for c in crons}})


def cron_singletons(crons: Sequence[Cron], entity: type[CronEntity]) -> list[Singleton]:
    """One bootstrap singleton per cron (see the module docstring); ``entity``
    is the runner's class from `cron_entity`."""
    return [
        Singleton(f"trio_cluster.cron:{cron.name}", _bootstrap(cron, entity))
        for cron in crons
    ]


def _bootstrap(cron: Cron, entity: type[CronEntity]) -> Callable[[], Awaitable[None]]:
    async def bootstrap() -> None:
        runner = runner_context()
        now = datetime.fromtimestamp(runner.clock.now(), UTC)
        instant = cron.schedule.next_after(now).timestamp()
        await runner.client(entity)(cron.name).tick.discard(
            CronTick(cron.name, instant)
        )

    return bootstrap
