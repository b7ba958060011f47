"""Conformance tests of `RunnerStorage`: registry, locks, leases, fencing (test support).

Part of `StorageConformance`; see `trio_cluster.testing._conformance._storage`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import attrs
import pytest
import trio

from trio_cluster._storage_abc import (
    ReplyOutcome,
    RunnerInfo,
    ShardOwner,
    Storage,
    StorageSession,
)

from ._base import (
    BASE_TIME,
    SHARD,
    SHARD2,
    TIMEOUT,
    ConformanceBase,
    acquire_shard,
    acquire_shards,
    claim_batch,
    collect,
    conformance_shard,
    final_reply,
    persisted_request,
    poll_until,
    replies_of,
    runner_info,
)

if TYPE_CHECKING:
    from trio_cluster._core._addresses import ShardId

    from ._base import Seen

__all__ = ["RunnerStorageTests"]

SHARD3 = conformance_shard(3)


class RunnerStorageTests(ConformanceBase):
    """The `RunnerStorage` half of `StorageConformance`."""

    # ------------------------------------------------------------------
    # Registry

    async def test_register_assigns_unique_machine_ids(
        self,
        storage: Storage,
        session: StorageSession,
        other: StorageSession,
        lease_duration: float,
    ) -> None:
        with trio.fail_after(TIMEOUT):
            async with storage.open_session(
                name="conformance-c", lease_duration=lease_duration
            ) as third:
                ids = [
                    await session.runners.register(runner_info(7001)),
                    await other.runners.register(runner_info(7002)),
                    await third.runners.register(runner_info(7003)),
                ]
                assert len(set(ids)) == 3
                assert all(0 <= machine_id <= 1023 for machine_id in ids)

    async def test_live_runners_sorted_with_machine_ids(
        self, session: StorageSession, other: StorageSession
    ) -> None:
        with trio.fail_after(TIMEOUT):
            assert await session.runners.live_runners() == []
            second = await other.runners.register(runner_info(7002))
            first = await session.runners.register(
                runner_info(7001, weight=2.5, groups=("conformance", "x"))
            )
            assert await session.runners.live_runners() == [
                attrs.evolve(
                    runner_info(7001, weight=2.5, groups=("conformance", "x")),
                    machine_id=first,
                ),
                attrs.evolve(runner_info(7002), machine_id=second),
            ]

    async def test_unregister_removes_runner(
        self, session: StorageSession, other: StorageSession
    ) -> None:
        with trio.fail_after(TIMEOUT):
            await session.runners.register(runner_info(7001))
            await other.runners.register(runner_info(7002))
            await session.runners.unregister()
            live = await other.runners.live_runners()
            assert [runner.address.port for runner in live] == [7002]

    async def test_register_again_replaces_registration(
        self, session: StorageSession
    ) -> None:
        with trio.fail_after(TIMEOUT):
            await session.runners.register(runner_info(7001))
            machine_id = await session.runners.register(runner_info(7001, weight=3.0))
            [live] = await session.runners.live_runners()
            assert (live.address.port, live.weight, live.machine_id) == (
                7001,
                3.0,
                machine_id,
            )
            await session.runners.register(runner_info(7005))
            assert [r.address.port for r in await session.runners.live_runners()] == [
                7005
            ]

    async def test_registering_again_to_leave_keeps_the_id_and_the_locks(
        self, session: StorageSession
    ) -> None:
        # A runner shutting down registers again with no shard group while
        # its shards drain (`Sharding._leave`): the others stop counting it,
        # it keeps its machine id and holds its locks until it releases them.
        with trio.fail_after(TIMEOUT):
            machine_id = await session.runners.register(runner_info(7001))
            await acquire_shards(session.runners, SHARD)
            again = await session.runners.register(runner_info(7001, groups=()))
            assert again == machine_id
            [live] = await session.runners.live_runners()
            assert (live.groups, live.machine_id) == ((), machine_id)
            assert await session.runners.refresh([SHARD]) == {SHARD}

    async def test_closed_session_is_not_live(
        self, storage: Storage, session: StorageSession, lease_duration: float
    ) -> None:
        with trio.fail_after(TIMEOUT):
            await session.runners.register(runner_info(7001))
            async with storage.open_session(
                name="conformance-c", lease_duration=lease_duration
            ) as third:
                await third.runners.register(runner_info(7003))
                live = await session.runners.live_runners()
                assert [r.address.port for r in live] == [7001, 7003]
            live = await session.runners.live_runners()
            assert [r.address.port for r in live] == [7001]

    # ------------------------------------------------------------------
    # Shard locks

    async def test_acquire_increments_epochs_across_sessions(
        self, session: StorageSession, other: StorageSession
    ) -> None:
        with trio.fail_after(TIMEOUT):
            epochs = await acquire_shards(session.runners, SHARD, SHARD2)
            await session.runners.release([SHARD, SHARD2])
            assert await acquire_shards(other.runners, SHARD) == {
                SHARD: epochs[SHARD] + 1
            }
            await other.runners.release([SHARD])
            assert await acquire_shards(session.runners, SHARD) == {
                SHARD: epochs[SHARD] + 2
            }
            assert await acquire_shards(other.runners, SHARD2) == {
                SHARD2: epochs[SHARD2] + 1
            }

    async def test_acquire_leaves_out_shards_held_by_others(
        self, session: StorageSession, other: StorageSession
    ) -> None:
        with trio.fail_after(TIMEOUT):
            await acquire_shards(session.runners, SHARD)
            assert set(await other.runners.acquire([SHARD, SHARD2])) == {SHARD2}
            assert await other.runners.refresh([SHARD, SHARD2]) == {SHARD2}

    async def test_acquire_held_shard_keeps_its_epoch(
        self, session: StorageSession
    ) -> None:
        with trio.fail_after(TIMEOUT):
            epochs = await acquire_shards(session.runners, SHARD)
            assert await session.runners.acquire([SHARD]) == epochs
            assert await session.runners.acquire([]) == {}

    async def test_release_and_release_all(
        self, session: StorageSession, other: StorageSession
    ) -> None:
        with trio.fail_after(TIMEOUT):
            await acquire_shards(session.runners, SHARD, SHARD2, SHARD3)
            await session.runners.release([SHARD, conformance_shard(99)])
            assert set(await other.runners.acquire([SHARD, SHARD2])) == {SHARD}
            await session.runners.release_all()
            assert set(await other.runners.acquire([SHARD2, SHARD3])) == {
                SHARD2,
                SHARD3,
            }
            assert await session.runners.refresh([SHARD, SHARD2, SHARD3]) == set()

    async def test_session_exit_frees_locks(
        self, storage: Storage, session: StorageSession, lease_duration: float
    ) -> None:
        with trio.fail_after(TIMEOUT):
            held: dict[ShardId, int] = {}

            async def hold(name: str, ending: str, scope: trio.CancelScope) -> None:
                async with storage.open_session(
                    name=name, lease_duration=lease_duration
                ) as s:
                    held.update(await acquire_shards(s.runners, SHARD))
                    if ending == "error":
                        raise RuntimeError("crash in the session body")
                    if ending == "cancel":
                        scope.cancel()
                        await trio.sleep_forever()

            for ending in ("exit", "error", "cancel"):
                name = f"conformance-{ending}"
                with trio.CancelScope() as scope:
                    if ending == "error":
                        with pytest.raises(RuntimeError, match="crash"):
                            await hold(name, ending, scope)
                    else:
                        await hold(name, ending, scope)
                assert scope.cancelled_caught is (ending == "cancel")
                assert await acquire_shards(session.runners, SHARD) == {
                    SHARD: held[SHARD] + 1
                }
                await session.runners.release([SHARD])

    async def test_refresh_reports_the_held_subset(
        self, session: StorageSession, other: StorageSession
    ) -> None:
        with trio.fail_after(TIMEOUT):
            await acquire_shards(session.runners, SHARD, SHARD2)
            await acquire_shards(other.runners, SHARD3)
            assert await session.runners.refresh(
                [SHARD, SHARD2, SHARD3, conformance_shard(9)]
            ) == {
                SHARD,
                SHARD2,
            }
            await session.runners.release([SHARD2])
            assert await session.runners.refresh([SHARD, SHARD2]) == {SHARD}
            assert await session.runners.refresh([]) == set()

    async def test_refresh_and_list_reports_the_held_subset_and_the_live_runners(
        self, storage: Storage, session: StorageSession, lease_duration: float
    ) -> None:
        # What each lease refresh of a runner sees: the runners that joined,
        # left (closed, unregistered or displaced) and changed since.
        def ports(live: list[RunnerInfo]) -> list[int]:
            return [runner.address.port for runner in live]

        with trio.fail_after(TIMEOUT):
            # Not registered yet: nothing to heartbeat, and still a listing.
            assert await session.runners.refresh_and_list([SHARD]) == (set(), [])
            first = await session.runners.register(runner_info(7001))
            await acquire_shards(session.runners, SHARD)
            async with storage.open_session(
                name="conformance-c", lease_duration=lease_duration
            ) as third:
                await third.runners.register(runner_info(7003))
                held, live = await session.runners.refresh_and_list([SHARD, SHARD2])
                assert held == {SHARD}
                assert live == await session.runners.live_runners()
                assert ports(live) == [7001, 7003]
                assert live[0].machine_id == first
                await third.runners.register(runner_info(7003, groups=()))
                _, live = await session.runners.refresh_and_list([SHARD])
                assert live[1].groups == ()
                await third.runners.unregister()
                assert ports((await session.runners.refresh_and_list([]))[1]) == [7001]
                await third.runners.register(runner_info(7004))
            # Closed: no longer live.
            assert await session.runners.refresh_and_list([SHARD]) == (
                {SHARD},
                [attrs.evolve(runner_info(7001), machine_id=first)],
            )

    async def test_registrations_and_unregistrations_are_announced(
        self, session: StorageSession, other: StorageSession
    ) -> None:
        # `RunnersChanged` reaches the other sessions: runners read the live
        # runners at once rather than polling them.
        def announced(seen: Seen) -> bool:
            return seen.runners_changed > 0

        with trio.fail_after(TIMEOUT):
            await session.runners.register(runner_info(7001))
            await collect(other.messages, announced)
            await session.runners.register(runner_info(7001, groups=()))
            await collect(other.messages, announced)
            await session.runners.unregister()
            await collect(other.messages, announced)

    async def test_shard_owners_report_holder_and_epoch(
        self, session: StorageSession, other: StorageSession
    ) -> None:
        with trio.fail_after(TIMEOUT):
            await session.runners.register(runner_info(7001))
            await other.runners.register(runner_info(7002))
            first = await acquire_shards(session.runners, SHARD)
            second = await acquire_shards(other.runners, SHARD2)
            assert sorted(
                await session.runners.shard_owners(), key=lambda o: o.shard
            ) == [
                ShardOwner(SHARD, runner_info(7001).address, first[SHARD]),
                ShardOwner(SHARD2, runner_info(7002).address, second[SHARD2]),
            ]
            await session.runners.release([SHARD])
            owners = {
                owner.shard: owner for owner in await other.runners.shard_owners()
            }
            assert owners[SHARD] == ShardOwner(SHARD, None, first[SHARD])

    # ------------------------------------------------------------------
    # Leases (these tests sleep: real time, or the `clock` fixture's)

    async def test_unrefreshed_session_loses_its_locks(
        self,
        session: StorageSession,
        other: StorageSession,
        lease_duration: float,
        clock: trio.abc.Clock | None,
    ) -> None:
        with trio.fail_after(TIMEOUT + 4 * lease_duration):
            first = await acquire_shards(session.runners, SHARD)

            async def taken() -> bool:
                return SHARD in await other.runners.acquire([SHARD])

            await poll_until(taken, lease_duration / 4)
            assert await other.runners.refresh([SHARD]) == {SHARD}
            assert (await other.runners.acquire([SHARD]))[SHARD] == first[SHARD] + 1
            assert await session.runners.refresh([SHARD]) == set()

    async def test_lost_session_is_reported_by_wait_session_lost(
        self,
        session: StorageSession,
        other: StorageSession,
        lease_duration: float,
        clock: trio.abc.Clock | None,
    ) -> None:
        with trio.fail_after(TIMEOUT + 6 * lease_duration):
            await acquire_shards(session.runners, SHARD)
            lost = trio.Event()

            async def watch() -> None:
                await session.runners.wait_session_lost()
                lost.set()

            async with trio.open_nursery() as nursery:
                nursery.start_soon(watch)
                # Stay silent on `session`; the other session polls the lock,
                # which is also what lets a lazy backend notice the lapse.

                async def taken() -> bool:
                    got = await other.runners.acquire([SHARD])  # always call
                    return lost.is_set() and SHARD in got

                await poll_until(taken, lease_duration / 4)
            # Once reported, waiting again waits for the next session's loss.
            assert await session.runners.refresh([SHARD]) == set()
            with trio.move_on_after(lease_duration / 4) as scope:
                await session.runners.wait_session_lost()
            assert scope.cancelled_caught

    async def test_lapsed_lease_is_reported_by_refresh(
        self,
        session: StorageSession,
        lease_duration: float,
        clock: trio.abc.Clock | None,
    ) -> None:
        with trio.fail_after(TIMEOUT + 4 * lease_duration):
            first = await acquire_shards(session.runners, SHARD)
            await trio.sleep(2 * lease_duration)
            assert await session.runners.refresh([SHARD]) == set()
            assert await acquire_shards(session.runners, SHARD) == {
                SHARD: first[SHARD] + 1
            }
            assert await session.runners.refresh([SHARD]) == {SHARD}

    async def test_registration_is_live_again_after_a_call(
        self,
        session: StorageSession,
        other: StorageSession,
        lease_duration: float,
        clock: trio.abc.Clock | None,
    ) -> None:
        with trio.fail_after(TIMEOUT + 4 * lease_duration):
            await session.runners.register(runner_info(7001))
            await other.runners.register(runner_info(7002))

            async def ports() -> list[int]:
                await other.runners.refresh([])  # keep the observer's own lease
                return [r.address.port for r in await other.runners.live_runners()]

            assert await ports() == [7001, 7002]

            async def lapsed() -> bool:
                return await ports() == [7002]

            await poll_until(lapsed, lease_duration / 4)
            assert await session.runners.refresh([]) == set()
            assert await ports() == [7001, 7002]

    # ------------------------------------------------------------------
    # Fencing, end to end

    async def test_fencing_refuses_replies_of_previous_owner(
        self, session: StorageSession, other: StorageSession
    ) -> None:
        with trio.fail_after(TIMEOUT):
            old = await acquire_shard(session)
            await session.messages.save_requests(
                [persisted_request(1), persisted_request(2, stream=True)], now=BASE_TIME
            )
            claimed = await claim_batch(session, old)
            assert [c.request_id for c in claimed.requests] == [1, 2]
            await session.runners.release([SHARD])  # e.g. its lease lapsed
            new = await acquire_shard(other)
            late = [final_reply(1, old), final_reply(2, old)]
            stale = ReplyOutcome.STALE_EPOCH
            assert await session.messages.save_replies(late, now=BASE_TIME) == [
                stale,
                stale,
            ]
            assert (await replies_of(other.messages, 1)).final is None
            reclaimed = await claim_batch(other, new)
            assert [(c.request_id, c.epoch) for c in reclaimed.requests] == [
                (1, new),
                (2, new),
            ]
            assert await other.messages.save_replies(
                [final_reply(1, new, b"new")], now=BASE_TIME
            ) == [ReplyOutcome.RECORDED]
            assert await session.messages.save_replies(
                [final_reply(2, old)], now=BASE_TIME
            ) == [stale]
            assert (await replies_of(session.messages, 1)).final == b"new"

    async def test_fencing_reports_stale_claims_of_previous_owner(
        self, session: StorageSession, other: StorageSession
    ) -> None:
        with trio.fail_after(TIMEOUT):
            old = await acquire_shard(session)
            await session.messages.save_requests([persisted_request(1)], now=BASE_TIME)
            await session.runners.release([SHARD])
            new = await acquire_shard(other)
            batch = await claim_batch(session, old)
            assert (batch.requests, batch.stale_shards) == ([], frozenset({SHARD}))
            reclaimed = await claim_batch(other, new)
            assert [c.request_id for c in reclaimed.requests] == [1]
