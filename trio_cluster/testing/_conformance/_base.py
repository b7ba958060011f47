"""Fixtures and helpers shared by the storage conformance tests (test support).

The tests only use the public storage contract (`trio_cluster.abc`), pass
explicit ``now`` values, and wait for asynchronous effects (notifications,
lease expiry) by polling under a deadline, so they pass on a real clock with
a real database as well as on a ``MockClock`` with `MemoryStorage`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest
import trio

from trio_cluster._core._addresses import (
    EntityAddress,
    EntityId,
    RunnerAddress,
    ShardId,
)
from trio_cluster._storage_abc import (
    MessagesAvailable,
    MessageStorage,
    Notification,
    PersistedRequest,
    RepliesAvailable,
    ReplyQuery,
    ReplyRecord,
    RequestsInterrupted,
    RunnerInfo,
    RunnerStorage,
    Storage,
    StorageSession,
    StoredReplies,
)

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Awaitable, Callable

__all__ = [
    "BASE",
    "SHARD",
    "SHARD2",
    "TIMEOUT",
    "ConformanceBase",
    "Seen",
    "acquire",
    "address",
    "collect",
    "final",
    "info",
    "poll_until",
    "replies",
    "request",
    "shard",
]

BASE = 1_800_000_000.0
"""A fixed wall-clock time (2027-01-15): every ``now`` is relative to it."""
TIMEOUT = 20.0
"""Guard for one test; generous for a real database on a slow CI machine."""
GROUP = "conformance"


def shard(number: int) -> ShardId:
    return ShardId(GROUP, number)


SHARD = shard(1)
SHARD2 = shard(2)


def address(
    entity: str = "e1", shard_id: ShardId = SHARD, entity_type: str = "Counter"
) -> EntityAddress:
    return EntityAddress(entity_type, EntityId(entity), shard_id)


def request(
    request_id: int,
    *,
    entity: str = "e1",
    shard_id: ShardId = SHARD,
    tag: str = "increment",
    payload: bytes | None = None,
    primary_key: str | None = None,
    deliver_at: float | None = None,
    stream: bool = False,
    claim_epoch: int | None = None,
    entity_type: str = "Counter",
) -> PersistedRequest:
    """A request with a payload derived from its id unless given."""
    return PersistedRequest(
        request_id=request_id,
        address=address(entity, shard_id, entity_type),
        tag=tag,
        payload=f"payload-{request_id}".encode() if payload is None else payload,
        primary_key=primary_key,
        deliver_at=deliver_at,
        stream=stream,
        claim_epoch=claim_epoch,
    )


def final(
    request_id: int, epoch: int, payload: bytes = b"done", *, shard_id: ShardId = SHARD
) -> ReplyRecord:
    return ReplyRecord(
        request_id=request_id, shard=shard_id, epoch=epoch, payload=payload
    )


def info(
    port: int, *, weight: float = 1.0, groups: tuple[str, ...] = (GROUP,)
) -> RunnerInfo:
    return RunnerInfo(
        address=RunnerAddress("10.0.0.1", port), groups=groups, weight=weight
    )


async def acquire(runners: RunnerStorage, *shards: ShardId) -> dict[ShardId, int]:
    """Acquire shards that nobody holds; fail if one was not acquired."""
    epochs = await runners.acquire(list(shards))
    assert set(epochs) == set(shards), f"could not acquire {set(shards) - set(epochs)}"
    return epochs


async def replies(
    messages: MessageStorage, request_id: int, after: int = -1
) -> StoredReplies:
    [stored] = await messages.replies_for([ReplyQuery(request_id, after)])
    assert stored.request_id == request_id
    return stored


class Seen:
    """Everything a session's notifications mentioned so far."""

    def __init__(self) -> None:
        self.notifications: list[Notification] = []
        self.message_shards: set[ShardId] = set()
        self.reply_ids: set[int] = set()
        self.interrupted_ids: set[int] = set()
        self.interrupted_shards: set[ShardId] = set()

    def add(self, notification: Notification) -> None:
        self.notifications.append(notification)
        if isinstance(notification, MessagesAvailable):
            self.message_shards |= notification.shards
        elif isinstance(notification, RepliesAvailable):
            self.reply_ids |= notification.request_ids
        else:
            assert isinstance(notification, RequestsInterrupted), notification
            self.interrupted_ids |= notification.request_ids
            self.interrupted_shards |= notification.shards


async def collect(messages: MessageStorage, until: Callable[[Seen], bool]) -> Seen:
    """Wait for notifications until ``until(seen)`` holds (fails on the
    test's deadline otherwise)."""
    seen = Seen()
    while not until(seen):
        batch = await messages.wait_notifications()
        assert batch, "wait_notifications returned no notification"
        for notification in batch:
            seen.add(notification)
    return seen


async def poll_until(check: Callable[[], Awaitable[bool]], interval: float) -> None:
    """Await ``check()`` every ``interval`` seconds until it returns True."""
    # Polling is the point: the condition lives in storage, not in an Event.
    while not await check():  # noqa: ASYNC110
        await trio.sleep(interval)


class ConformanceBase:
    """Fixtures of the conformance suite; see `StorageConformance`."""

    @pytest.fixture
    def lease_duration(self) -> float:
        """Lease duration of every session the suite opens, in seconds."""
        return 1.5

    @pytest.fixture
    def clock(self) -> trio.abc.Clock | None:
        """The clock of the few tests that sleep (lease expiry): None for
        real time, or a ``MockClock`` (e.g. pytest-trio's ``autojump_clock``)."""
        return None

    @pytest.fixture
    async def session(
        self, storage: Storage, lease_duration: float
    ) -> AsyncIterator[StorageSession]:
        async with storage.open_session(
            name="conformance-a", lease_duration=lease_duration
        ) as opened:
            yield opened

    @pytest.fixture
    async def other(
        self, storage: Storage, lease_duration: float
    ) -> AsyncIterator[StorageSession]:
        async with storage.open_session(
            name="conformance-b", lease_duration=lease_duration
        ) as opened:
            yield opened
