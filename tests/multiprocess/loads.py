"""The load the multi-process tests put on a cluster (test support).

* `Load`: one caller task per entity calling ``where()`` in a loop, recording
  who answered, at which epoch and when; its checks find a shard served by two
  runners at once (`Load.check_single_owner`).
* `PersistedLoad`: callers sending persisted requests with primary keys; its
  check finds lost requests and duplicate replies in the tables.
* `warm_up` and `wait_owned_by`: call every entity once, or until a rebalance
  has settled.

Real time; every loop is bounded in time.
"""

from __future__ import annotations

from collections import defaultdict
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

import attrs
import trio

import trio_cluster as tc

from .entities import Ping, Probe, Record, Served

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Iterable

    from .helpers import MultiCluster, RunnerProcess

RETRIED = (tc.RunnerUnavailableError, tc.EntityNotAssignedError)
"""Errors a caller expects while ownership moves (it tries again)."""


@attrs.define
class Success:
    at: float
    """`trio.current_time` when the reply arrived."""
    served: Served


class Load:
    """One caller per entity id, calling ``where()`` in a loop with a 1 s
    per-attempt deadline, ``pause`` seconds between successful calls.

    Errors of moving ownership (`RETRIED`) and attempts past their deadline
    are tried again at once; anything else is kept in ``unexpected``.
    """

    def __init__(
        self, client: tc.Runner, ids: Iterable[str], *, pause: float = 0.05
    ) -> None:
        self.client = client.client(Probe)
        self.ids = list(ids)
        self.pause = pause
        self.successes: dict[str, list[Success]] = defaultdict(list)
        self.failures: list[tuple[float, str, str]] = []
        """Attempts that failed as expected: (started at, entity, why)."""
        self.unexpected: list[tuple[str, BaseException]] = []

    def shard(self, entity: str) -> tc.ShardId:
        return self.client.address_of(entity).shard

    @asynccontextmanager
    async def running(self) -> AsyncIterator[Load]:
        async with trio.open_nursery() as nursery:
            for entity in self.ids:
                nursery.start_soon(self._caller, entity)
            try:
                yield self
            finally:
                nursery.cancel_scope.cancel()

    async def _caller(self, entity: str) -> None:
        ref = self.client(entity)
        ping = Ping()
        while True:
            served = None
            started = trio.current_time()
            try:
                with trio.move_on_after(1.0):
                    served = await ref.where(ping)
            except RETRIED as exc:
                self.failures.append((started, entity, repr(exc)))
                await trio.sleep(0.01)
            except Exception as exc:
                self.unexpected.append((entity, exc))
                await trio.sleep(0.1)
            else:
                if served is None:
                    self.failures.append((started, entity, "no answer within 1 s"))
            if served is None:
                continue
            self.successes[entity].append(Success(trio.current_time(), served))
            await trio.sleep(self.pause)

    def owner(self, entity: str, before: float = float("inf")) -> str | None:
        """The runner that last answered for ``entity`` before ``before``."""
        answered = [s for s in self.successes[entity] if s.at < before]
        return answered[-1].served.runner if answered else None

    def owners(self, before: float = float("inf")) -> dict[str, str | None]:
        return {entity: self.owner(entity, before) for entity in self.ids}

    def first_success(
        self, entity: str, after: float, *, not_from: str | None = None
    ) -> float | None:
        for success in self.successes[entity]:
            if success.at > after and success.served.runner != not_from:
                return success.at
        return None

    async def wait_all_answer(
        self,
        entities: Iterable[str],
        *,
        after: float,
        not_from: str | None = None,
        seconds: float,
    ) -> float:
        """Wait until every entity answered after ``after`` (from a runner
        other than ``not_from``); return the latest of those first answers,
        minus ``after``.

        Raises:
            AssertionError: some did not answer within ``seconds``.
        """
        entities = list(entities)
        with trio.move_on_after(seconds):
            while True:
                firsts = [
                    self.first_success(e, after, not_from=not_from) for e in entities
                ]
                if all(first is not None for first in firsts):
                    return max(firsts) - after  # type: ignore[type-var,operator]
                await trio.sleep(0.01)
        missing = [
            e
            for e in entities
            if self.first_success(e, after, not_from=not_from) is None
        ]
        raise AssertionError(
            f"{len(missing)} of {len(entities)} entities did not answer within"
            f" {seconds} s (e.g. {missing[:5]}); {self.failures_after(after)[-5:]};"
            f" unexpected errors: {self.unexpected[:3]}"
        )

    def failures_after(
        self, after: float, entities: Iterable[str] | None = None
    ) -> list[tuple[float, str, str]]:
        """Failed attempts started after ``after`` (relative times)."""
        wanted = None if entities is None else set(entities)
        return [
            (round(at - after, 3), entity, why)
            for at, entity, why in self.failures
            if at >= after and (wanted is None or entity in wanted)
        ]

    def check_single_owner(self) -> None:
        """Every (shard, epoch) was served by one runner only, epochs are
        positive, and each entity's epochs never went down."""
        served_by: dict[tuple[tc.ShardId, int], set[str]] = defaultdict(set)
        for entity, successes in self.successes.items():
            shard = self.shard(entity)
            previous = 0
            for success in successes:
                epoch = success.served.epoch
                assert epoch > 0, (entity, success)
                assert epoch >= previous, (
                    f"{entity} was served at epoch {epoch} after epoch {previous}:"
                    f" {successes}"
                )
                previous = epoch
                served_by[(shard, epoch)].add(success.served.runner)
        doubles = {
            key: runners for key, runners in served_by.items() if len(runners) > 1
        }
        assert not doubles, f"shards served by two runners at one epoch: {doubles}"


async def warm_up(
    client: tc.Runner, ids: Iterable[str], *, seconds: float = 20.0
) -> dict[str, Served]:
    """Call every entity once (retrying while shards move); their answers."""
    probe = client.client(Probe)
    answers: dict[str, Served] = {}
    with trio.fail_after(seconds):
        for entity in ids:
            while entity not in answers:
                try:
                    answers[entity] = await probe(entity).where(Ping())
                except RETRIED:
                    await trio.sleep(0.02)
    return answers


async def wait_owned_by(
    client: tc.Runner,
    ids: Iterable[str],
    runners: Iterable[str],
    *,
    seconds: float = 20.0,
) -> dict[str, Served]:
    """Wait until the entities are served by exactly the set ``runners``
    (a rebalance has settled); return the last answers."""
    wanted = set(runners)
    ids = list(ids)
    answers: dict[str, Served] = {}
    with trio.move_on_after(seconds):
        while True:
            answers = await warm_up(client, ids, seconds=seconds)
            if {served.runner for served in answers.values()} == wanted:
                return answers
            await trio.sleep(0.1)
    raise AssertionError(
        f"entities not served by {sorted(wanted)} within {seconds} s:"
        f" {sorted({served.runner for served in answers.values()})}"
    )


def entity_ids(count: int) -> list[str]:
    return [f"probe-{i}" for i in range(count)]


class PersistedLoad:
    """``callers`` tasks sending persisted ``record`` requests, each with a
    fresh primary key, one after another, round-robin over ``ids``. A request
    that fails while ownership moves is sent again with the same key (so it is
    deduplicated), for at most ``give_up`` seconds."""

    def __init__(
        self,
        client: tc.Runner,
        ids: Iterable[str],
        *,
        callers: int = 8,
        give_up: float = 30.0,
    ) -> None:
        self.client = client.client(Probe)
        self.ids = list(ids)
        self.callers = callers
        self.give_up = give_up
        self.entity_of: dict[str, str] = {}
        """Entity of every key sent."""
        self.results: dict[str, Served] = {}
        self.retries = 0
        self.failed: list[tuple[str, BaseException]] = []
        self._stopping = False

    @asynccontextmanager
    async def running(self, *, drain: float = 30.0) -> AsyncIterator[PersistedLoad]:
        """Run the callers; on exit, let each finish its current request
        (within ``drain`` seconds) and stop."""
        async with trio.open_nursery() as nursery:
            for number in range(self.callers):
                nursery.start_soon(self._caller, number)
            try:
                yield self
            finally:
                self._stopping = True
                nursery.cancel_scope.deadline = trio.current_time() + drain

    async def _caller(self, number: int) -> None:
        sent = 0
        while not self._stopping:
            key = f"k{number}-{sent}"
            entity = self.ids[(number * 7 + sent) % len(self.ids)]
            self.entity_of[key] = entity
            sent += 1
            ref = self.client(entity)
            with trio.move_on_after(self.give_up) as scope:
                while True:
                    try:
                        self.results[key] = await ref.record(Record(key))
                        break
                    except (*RETRIED, tc.PersistenceError):
                        self.retries += 1
                        await trio.sleep(0.05)
                    except Exception as exc:
                        self.failed.append((key, exc))
                        return  # reported by check_storage
            if scope.cancelled_caught:
                self.failed.append((key, TimeoutError(f"no reply in {self.give_up} s")))
                return

    async def check_storage(self, cluster: MultiCluster) -> None:
        """Nothing lost, no duplicate: one request and one final reply per key
        in storage, every request processed, and asking again (same key)
        returns the reply the caller got."""
        assert not self.failed, self.failed[:5]
        assert set(self.results) == set(self.entity_of)
        [(requests, keys, unprocessed)] = await cluster.sql(
            "SELECT count(*), count(DISTINCT primary_key),"
            " count(*) FILTER (WHERE processed_at IS NULL) FROM {p}_messages"
        )
        assert (requests, keys, unprocessed) == (len(self.results),) * 2 + (0,)
        [(finals, answered)] = await cluster.sql(
            "SELECT count(*), count(DISTINCT request_id) FROM {p}_replies"
            " WHERE sequence IS NULL"
        )
        assert finals == answered == len(self.results)
        for key in sorted(self.results)[:: max(1, len(self.results) // 100)]:
            again = await self.client(self.entity_of[key]).record(Record(key))
            assert again == self.results[key], (key, again, self.results[key])


@asynccontextmanager
async def running_load(
    cluster: MultiCluster, ids: list[str], *names: str
) -> AsyncIterator[tuple[list[RunnerProcess], Load]]:
    """Start the runner processes ``names``, wait until ``ids`` are spread
    over them (seen from a client runner), and run a `Load` on ``ids`` for
    half a second; yield the processes and the load."""
    runners = await cluster.start(*names)
    async with cluster.client() as client:
        await wait_owned_by(client, ids, [runner.address for runner in runners])
        async with Load(client, ids).running() as load:
            await trio.sleep(0.5)
            yield runners, load
