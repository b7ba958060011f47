"""Conformance tests of listing and counting durable entity state (test support).

What every `StateStorage` must do with labels (`trio_cluster._storage_state`):
a snapshot keeps the label it was last saved with; `list_states` selects by
exact entity type or type prefix and by label, in code-point order of type
then id, page by page after a cursor, committed snapshots only; and
`count_states` counts the same selection per type and label.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest
import trio

from trio_cluster._storage_state import (
    StateCount,
    StateOutcome,
    StateQuery,
    StateWrite,
    StoredState,
)

from ._base import BASE_TIME, SHARD, SHARD2, TIMEOUT, acquire_shard, entity_address
from ._state import states

if TYPE_CHECKING:
    from collections.abc import Sequence

    from trio_cluster._storage_abc import StorageSession
    from trio_cluster._storage_state import ListedState, StateStorage

__all__ = ["StateListingTests"]

WORKFLOWS = "wf."
"""The entity type prefix of the listing tests."""


def _labelled(
    epoch: int, version: int, entity_type: str, entity_id: str, label: str | None
) -> StateWrite:
    """A write of ``entity_type/entity_id`` replacing ``version``, labelled."""
    return StateWrite(
        address=entity_address(entity_id, entity_type=entity_type),
        epoch=epoch,
        expected_version=version,
        payload=f"{entity_id}@{version + 1}".encode(),
        label=label,
    )


async def _save(
    store: StateStorage,
    epoch: int,
    entity_type: str,
    entity_id: str,
    label: str | None,
    *,
    version: int = 0,
    now: float = BASE_TIME,
) -> None:
    write = _labelled(epoch, version, entity_type, entity_id, label)
    assert await store.save_state(write, now=now) is StateOutcome.SAVED


def _keys(rows: Sequence[ListedState]) -> list[tuple[str, str]]:
    return [(row.entity_type, row.entity_id) for row in rows]


class StateListingTests:
    """Mixed into `StorageConformance`."""

    async def test_state_keeps_the_label_it_was_saved_with(
        self, session: StorageSession
    ) -> None:
        with trio.fail_after(TIMEOUT):
            store = states(session)
            epoch = await acquire_shard(session)
            await _save(store, epoch, "wf.a", "x", "running")
            address = entity_address("x", entity_type="wf.a")
            assert await store.load_state(address) == StoredState(
                b"x@1", 1, epoch, "running"
            )
            await _save(store, epoch, "wf.a", "x", None, version=1)
            assert await store.load_state(address) == StoredState(b"x@2", 2, epoch)
            await _save(store, epoch, "wf.a", "x", "done", version=2)
            stored = await store.load_state(address)
            assert stored is not None
            assert stored.label == "done"

    async def test_list_states_by_type_prefix_and_label(
        self, session: StorageSession
    ) -> None:
        with trio.fail_after(TIMEOUT):
            store = states(session)
            epoch = await acquire_shard(session)
            # Types that sort around the prefix and around each other.
            saves = [
                ("wf.b", "2", "failed"),
                ("wf.a", "y", "running"),
                ("wf.a", "x", "failed"),
                ("wf.ab", "a", "running"),
                ("wf", "z", "running"),
                ("wf/", "z", "running"),
                ("other", "x", "failed"),
                ("wf.a", "Z", None),
            ]
            for entity_type, entity_id, label in saves:
                await _save(store, epoch, entity_type, entity_id, label, now=1000.0)
            everything = await store.list_states(
                StateQuery(WORKFLOWS, prefix=True), limit=100
            )
            assert _keys(everything) == [
                ("wf.a", "Z"),
                ("wf.a", "x"),
                ("wf.a", "y"),
                ("wf.ab", "a"),
                ("wf.b", "2"),
            ]
            first = everything[1]
            assert (first.shard, first.saved_at) == (SHARD, 1000.0)
            assert first.state == StoredState(b"x@1", 1, epoch, "failed")
            exact = await store.list_states(StateQuery("wf.a"), limit=100)
            assert _keys(exact) == [("wf.a", "Z"), ("wf.a", "x"), ("wf.a", "y")]
            failed = await store.list_states(
                StateQuery(WORKFLOWS, prefix=True, label="failed"), limit=100
            )
            assert _keys(failed) == [("wf.a", "x"), ("wf.b", "2")]
            one = await store.list_states(
                StateQuery(WORKFLOWS, prefix=True, entity_id="x"), limit=100
            )
            assert _keys(one) == [("wf.a", "x")]
            assert await store.count_states(StateQuery("wf.a", entity_id="y")) == [
                StateCount("wf.a", "running", 1)
            ]
            assert await store.list_states(StateQuery("wf.c"), limit=100) == []
            assert await store.list_states(StateQuery("wf."), limit=100) == []
            every_type = await store.list_states(StateQuery("", prefix=True), limit=100)
            assert len(every_type) == len(saves)
            assert _keys(every_type)[:2] == [("other", "x"), ("wf", "z")]

    async def test_list_states_pages_after_a_cursor(
        self, session: StorageSession
    ) -> None:
        with trio.fail_after(TIMEOUT):
            store = states(session)
            epoch = await acquire_shard(session)
            ids = [f"e{n:02}" for n in range(7)]
            for entity_id in reversed(ids):
                await _save(store, epoch, "wf.p", entity_id, "waiting")
            await _save(store, epoch, "wf.q", "a", "waiting")
            query = StateQuery(WORKFLOWS, prefix=True, label="waiting")
            pages: list[list[tuple[str, str]]] = []
            after: tuple[str, str] | None = None
            for _ in range(10):
                page = await store.list_states(query, after=after, limit=3)
                if not page:
                    break
                pages.append(_keys(page))
                after = (page[-1].entity_type, page[-1].entity_id)
            assert pages == [
                [("wf.p", "e00"), ("wf.p", "e01"), ("wf.p", "e02")],
                [("wf.p", "e03"), ("wf.p", "e04"), ("wf.p", "e05")],
                [("wf.p", "e06"), ("wf.q", "a")],
            ]
            # A cursor that names no stored snapshot works as well.
            later = await store.list_states(query, after=("wf.p", "e035"), limit=2)
            assert _keys(later) == [("wf.p", "e04"), ("wf.p", "e05")]
            assert await store.list_states(query, limit=0) == []

    async def test_count_states_per_type_and_label(
        self, session: StorageSession
    ) -> None:
        with trio.fail_after(TIMEOUT):
            store = states(session)
            epoch = await acquire_shard(session)
            for entity_id, label in [
                ("1", "waiting"),
                ("2", "waiting"),
                ("3", "failed"),
                ("4", None),
            ]:
                await _save(store, epoch, "wf.a", entity_id, label)
            await _save(store, epoch, "wf.b", "1", "completed")
            await _save(store, epoch, "other", "1", "waiting")
            # A save that changes the label moves the snapshot between counts.
            await _save(store, epoch, "wf.a", "2", "completed", version=1)
            assert await store.count_states(StateQuery(WORKFLOWS, prefix=True)) == [
                StateCount("wf.a", None, 1),
                StateCount("wf.a", "completed", 1),
                StateCount("wf.a", "failed", 1),
                StateCount("wf.a", "waiting", 1),
                StateCount("wf.b", "completed", 1),
            ]
            assert await store.count_states(StateQuery("wf.b")) == [
                StateCount("wf.b", "completed", 1)
            ]
            assert await store.count_states(
                StateQuery("", prefix=True, label="waiting")
            ) == [StateCount("other", "waiting", 1), StateCount("wf.a", "waiting", 1)]
            assert await store.count_states(StateQuery("nothing")) == []

    async def test_listing_sees_committed_snapshots_only(
        self, session: StorageSession
    ) -> None:
        with trio.fail_after(TIMEOUT):
            store = states(session)
            epoch = await acquire_shard(session)
            await acquire_shard(session, SHARD2)
            query = StateQuery(WORKFLOWS, prefix=True)
            async with session.messages.open_transaction() as transaction:
                await store.save_state(
                    _labelled(epoch, 0, "wf.t", "e1", "running"),
                    now=BASE_TIME,
                    transaction=transaction,
                )
                assert await store.list_states(query, limit=10) == []
                assert await store.count_states(query) == []
            assert _keys(await store.list_states(query, limit=10)) == [("wf.t", "e1")]
            assert await store.delete_state(entity_address("e1", entity_type="wf.t"))
            assert await store.count_states(query) == []

    async def test_listing_arguments_are_checked(self, session: StorageSession) -> None:
        with trio.fail_after(TIMEOUT):
            store = states(session)
            epoch = await acquire_shard(session)
            query = StateQuery(WORKFLOWS, prefix=True)
            with pytest.raises(TypeError):
                await store.list_states("wf.", limit=1)  # type: ignore[arg-type]
            with pytest.raises(TypeError):
                await store.list_states(StateQuery(1), limit=1)  # type: ignore[arg-type]
            with pytest.raises(TypeError):
                await store.list_states(query, after="wf.a", limit=1)  # type: ignore[arg-type]
            with pytest.raises(ValueError):  # noqa: PT011 - the contract's message
                await store.list_states(query, limit=-1)
            with pytest.raises(TypeError):
                await store.count_states(StateQuery("wf.", label=3))  # type: ignore[arg-type]
            with pytest.raises(TypeError):
                await store.count_states(StateQuery("wf.", entity_id=3))  # type: ignore[arg-type]
            with pytest.raises(ValueError):  # noqa: PT011 - the contract's message
                await store.count_states(StateQuery("wf.", label="x" * 201))
            with pytest.raises(ValueError):  # noqa: PT011 - the contract's message
                await store.save_state(
                    _labelled(epoch, 0, "wf.a", "x", "y" * 201), now=BASE_TIME
                )
            with pytest.raises(TypeError):
                await store.save_state(
                    _labelled(epoch, 0, "wf.a", "x", 5),  # type: ignore[arg-type]
                    now=BASE_TIME,
                )
            assert await store.list_states(query, limit=10) == []
