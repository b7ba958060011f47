"""Conformance tests of durable entity state (test support).

What every backend whose session ``messages`` is a `StateStorage` must do
(`trio_cluster._storage_state`): snapshots keyed by entity type and id,
versions that count the saves, writes refused for a stale epoch (fencing)
or another version (conflict) changing nothing, writes in a transaction
that commit with its replies or vanish with it, a transaction holding off
acquisitions of the shard it wrote under, and `clear_address` deleting the
snapshot too.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest
import trio

from trio_cluster._storage_state import (
    StateOutcome,
    StateStorage,
    StateWrite,
    StoredState,
)

from ._base import (
    BASE_TIME,
    SHARD,
    SHARD2,
    TIMEOUT,
    acquire_shard,
    acquire_shards,
    entity_address,
    final_reply,
    persisted_request,
    replies_of,
    saved_and_claimed,
)

if TYPE_CHECKING:
    from trio_cluster._storage_abc import StorageSession

__all__ = ["StateTests"]

ADDRESS = entity_address("e1")


class _Abort(Exception):
    pass


def states(session: StorageSession) -> StateStorage:
    """The session's `StateStorage` (fails the test if it has none)."""
    messages = session.messages
    assert isinstance(messages, StateStorage), "this backend keeps no entity state"
    return messages


def write(
    epoch: int, expected: int, payload: bytes, *, address: object = ADDRESS
) -> StateWrite:
    return StateWrite(
        address=address,  # type: ignore[arg-type]
        epoch=epoch,
        expected_version=expected,
        payload=payload,
    )


class StateTests:
    """Mixed into `StorageConformance`."""

    async def test_state_saves_count_versions(self, session: StorageSession) -> None:
        with trio.fail_after(TIMEOUT):
            store = states(session)
            assert await store.load_state(ADDRESS) is None
            epoch = await acquire_shard(session)
            saved = StateOutcome.SAVED
            assert (
                await store.save_state(write(epoch, 0, b"one"), now=BASE_TIME) is saved
            )
            assert await store.load_state(ADDRESS) == StoredState(b"one", 1, epoch)
            assert (
                await store.save_state(write(epoch, 1, b"two"), now=BASE_TIME) is saved
            )
            assert await store.load_state(ADDRESS) == StoredState(b"two", 2, epoch)
            # Another entity, and the same entity seen from another shard
            # (shards_per_group changed): keyed by type and id.
            other = entity_address("e2")
            assert await store.load_state(other) is None
            moved = entity_address("e1", SHARD2)
            assert await store.load_state(moved) == StoredState(b"two", 2, epoch)
            other_type = entity_address("e1", entity_type="Other")
            assert await store.load_state(other_type) is None

    async def test_state_write_of_another_version_is_a_conflict(
        self, session: StorageSession
    ) -> None:
        with trio.fail_after(TIMEOUT):
            store = states(session)
            epoch = await acquire_shard(session)
            conflict = StateOutcome.CONFLICT
            # Nothing stored: only version 0 may be replaced.
            assert (
                await store.save_state(write(epoch, 1, b"x"), now=BASE_TIME) is conflict
            )
            assert await store.load_state(ADDRESS) is None
            await store.save_state(write(epoch, 0, b"one"), now=BASE_TIME)
            for expected in (0, 2):
                outcome = await store.save_state(
                    write(epoch, expected, b"lost"), now=BASE_TIME
                )
                assert outcome is conflict
            assert await store.load_state(ADDRESS) == StoredState(b"one", 1, epoch)

    async def test_state_writes_in_one_call_each_stand_alone(
        self, session: StorageSession
    ) -> None:
        with trio.fail_after(TIMEOUT):
            store = states(session)
            epoch = await acquire_shard(session)
            a, b, c, d = (entity_address(name) for name in ("a", "b", "c", "d"))
            other_shard = entity_address("e", SHARD2)
            await store.save_state(write(epoch, 0, b"b1", address=b), now=BASE_TIME)
            await store.save_state(write(epoch, 0, b"c1", address=c), now=BASE_TIME)
            assert await store.save_states([], now=BASE_TIME) == []
            outcomes = await store.save_states(
                [
                    write(epoch, 0, b"a1", address=a),  # new
                    write(epoch, 1, b"b2", address=b),  # replaces version 1
                    write(epoch, 0, b"c?", address=c),  # stale version
                    write(epoch + 1, 0, b"d?", address=d),  # epoch never held
                    write(epoch, 0, b"e?", address=other_shard),  # not acquired
                ],
                now=BASE_TIME,
            )
            saved, conflict = StateOutcome.SAVED, StateOutcome.CONFLICT
            stale = StateOutcome.STALE_EPOCH
            assert outcomes == [saved, saved, conflict, stale, stale]
            assert await store.load_state(a) == StoredState(b"a1", 1, epoch)
            assert await store.load_state(b) == StoredState(b"b2", 2, epoch)
            assert await store.load_state(c) == StoredState(b"c1", 1, epoch)
            assert await store.load_state(d) is None
            assert await store.load_state(other_shard) is None
            # Two writes for one entity: refused whole, nothing stored.
            with pytest.raises(ValueError, match="one write per entity"):
                await store.save_states(
                    [
                        write(epoch, 1, b"a2", address=a),
                        write(epoch, 2, b"a3", address=a),
                    ],
                    now=BASE_TIME,
                )
            with pytest.raises(TypeError):
                await store.save_states([b"x"], now=BASE_TIME)  # type: ignore[list-item]
            assert await store.load_state(a) == StoredState(b"a1", 1, epoch)

    async def test_state_write_of_previous_owner_is_refused(
        self, session: StorageSession, other: StorageSession
    ) -> None:
        with trio.fail_after(TIMEOUT):
            old = await acquire_shard(session)
            await states(session).save_state(write(old, 0, b"old"), now=BASE_TIME)
            await session.runners.release([SHARD])  # e.g. its lease lapsed
            new = await acquire_shard(other)
            assert new > old
            stale = StateOutcome.STALE_EPOCH
            late = await states(session).save_state(
                write(old, 1, b"late"), now=BASE_TIME
            )
            assert late is stale
            async with session.messages.open_transaction() as transaction:
                late = await states(session).save_state(
                    write(old, 1, b"late"), now=BASE_TIME, transaction=transaction
                )
                assert late is stale
            assert await states(other).load_state(ADDRESS) == StoredState(
                b"old", 1, old
            )
            # The new owner continues from the last committed state.
            outcome = await states(other).save_state(
                write(new, 1, b"new"), now=BASE_TIME
            )
            assert outcome is StateOutcome.SAVED
            assert await states(session).load_state(ADDRESS) == StoredState(
                b"new", 2, new
            )
            # An epoch never acquired is stale too.
            never = await states(other).save_state(
                write(new + 5, 2, b"x"), now=BASE_TIME
            )
            assert never is stale

    async def test_state_saved_in_a_transaction_commits_with_its_reply(
        self, session: StorageSession
    ) -> None:
        with trio.fail_after(TIMEOUT):
            store = states(session)
            epoch = await saved_and_claimed(
                session, persisted_request(1), persisted_request(2), claim=False
            )
            async with session.messages.open_transaction() as transaction:
                outcome = await store.save_state(
                    write(epoch, 0, b"one"), now=BASE_TIME, transaction=transaction
                )
                assert outcome is StateOutcome.SAVED
                # Its next write in the same transaction sees it.
                again = await store.save_state(
                    write(epoch, 0, b"lost"), now=BASE_TIME, transaction=transaction
                )
                assert again is StateOutcome.CONFLICT
                await session.messages.save_replies(
                    [final_reply(1, epoch)], now=BASE_TIME, transaction=transaction
                )
            assert await store.load_state(ADDRESS) == StoredState(b"one", 1, epoch)
            assert (await replies_of(session.messages, 1)).final == b"done"

            async def save_then_fail() -> None:
                async with session.messages.open_transaction() as transaction:
                    await store.save_state(
                        write(epoch, 1, b"two"), now=BASE_TIME, transaction=transaction
                    )
                    await session.messages.save_replies(
                        [final_reply(2, epoch)], now=BASE_TIME, transaction=transaction
                    )
                    raise _Abort

            with pytest.raises(_Abort):
                await save_then_fail()
            with trio.CancelScope() as scope:  # cancellation rolls back too
                async with session.messages.open_transaction() as transaction:
                    await store.save_state(
                        write(epoch, 1, b"two"), now=BASE_TIME, transaction=transaction
                    )
                    scope.cancel()
                    await trio.sleep_forever()
            assert await store.load_state(ADDRESS) == StoredState(b"one", 1, epoch)
            assert (await replies_of(session.messages, 2)).final is None

    async def test_open_transaction_with_a_state_holds_off_acquisitions(
        self, session: StorageSession, other: StorageSession
    ) -> None:
        # As for replies: the epoch a state was saved under in a transaction
        # stays current until the transaction ends.
        with trio.fail_after(TIMEOUT):
            epoch = await acquire_shard(session)
            async with session.messages.open_transaction() as transaction:
                outcome = await states(session).save_state(
                    write(epoch, 0, b"in time"), now=BASE_TIME, transaction=transaction
                )
                assert outcome is StateOutcome.SAVED
                await session.runners.release([SHARD])
                assert await other.runners.acquire([SHARD, SHARD2]) == {SHARD2: 1}
            assert await acquire_shards(other.runners, SHARD) == {SHARD: epoch + 1}
            stored = await states(other).load_state(ADDRESS)
            assert stored == StoredState(b"in time", 1, epoch)

    async def test_clear_address_deletes_the_state(
        self, session: StorageSession
    ) -> None:
        with trio.fail_after(TIMEOUT):
            store = states(session)
            epoch = await saved_and_claimed(session, persisted_request(1), claim=False)
            await store.save_state(write(epoch, 0, b"one"), now=BASE_TIME)
            assert await session.messages.clear_address(ADDRESS) == 1
            assert await store.load_state(ADDRESS) is None
            await store.save_state(write(epoch, 0, b"again"), now=BASE_TIME)
            assert await store.delete_state(ADDRESS) is True
            assert await store.delete_state(ADDRESS) is False
            assert await store.load_state(ADDRESS) is None
            # The versions start again from 1.
            await store.save_state(write(epoch, 0, b"anew"), now=BASE_TIME)
            assert await store.load_state(ADDRESS) == StoredState(b"anew", 1, epoch)

    async def test_state_arguments_are_checked(self, session: StorageSession) -> None:
        with trio.fail_after(TIMEOUT):
            store = states(session)
            epoch = await acquire_shard(session)
            with pytest.raises(TypeError):
                await store.load_state("e1")  # type: ignore[arg-type]
            with pytest.raises(TypeError):
                await store.save_state(b"x", now=BASE_TIME)  # type: ignore[arg-type]
            with pytest.raises(TypeError):
                await store.save_state(write(epoch, 0, "text"), now=BASE_TIME)  # type: ignore[arg-type]
            with pytest.raises(ValueError):  # noqa: PT011 - the contract's message
                await store.save_state(write(epoch, -1, b"x"), now=BASE_TIME)
            with pytest.raises(TypeError):
                await store.save_state(
                    write(epoch, 0, b"x", address="e1"), now=BASE_TIME
                )
            assert await store.load_state(ADDRESS) is None
