"""Fixtures and helpers shared by the storage conformance tests (test support).

The helpers build storage records and run the steps most tests start with;
those a backend's own tests need too are public in `trio_cluster.testing`
(`persisted_request`, `final_reply`, `runner_info`, `entity_address`,
`conformance_shard`, `SHARD`, `SHARD2`, `BASE_TIME`, `acquire_shards`,
`replies_of`, `saved_and_claimed`).

The tests only use the public storage contract (`trio_cluster.abc`), pass
explicit ``now`` values, and wait for asynchronous effects (notifications,
lease expiry) by polling under a deadline, so they pass on a real clock with
a real database as well as on a ``MockClock`` with `MemoryStorage`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pytest
import trio

from trio_cluster._core._addresses import (
    EntityAddress,
    EntityId,
    RunnerAddress,
    ShardId,
)
from trio_cluster._storage_abc import (
    ClaimBatch,
    MessagesAvailable,
    MessageStorage,
    Notification,
    NotificationsMissed,
    PersistedRequest,
    RepliesAvailable,
    ReplyQuery,
    ReplyRecord,
    RequestsInterrupted,
    RunnerInfo,
    RunnersChanged,
    RunnerStorage,
    Storage,
    StorageSession,
    StoredReplies,
)

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Awaitable, Callable

__all__ = [
    "BASE_TIME",
    "SHARD",
    "SHARD2",
    "TIMEOUT",
    "ConformanceBase",
    "Seen",
    "acquire_shard",
    "acquire_shards",
    "claim_batch",
    "collect",
    "conformance_shard",
    "entity_address",
    "final_reply",
    "persisted_request",
    "poll_until",
    "replies_of",
    "runner_info",
    "saved_and_claimed",
]

BASE_TIME = 1_800_000_000.0
"""A fixed wall-clock time (2027-01-15): every ``now`` is relative to it."""
TIMEOUT = 20.0
"""Guard for one test; generous for a real database on a slow CI machine."""
GROUP = "conformance"


def conformance_shard(number: int) -> ShardId:
    """Shard ``number`` of the conformance tests' shard group."""
    return ShardId(GROUP, number)


SHARD = conformance_shard(1)
"""The shard of most conformance tests' requests."""
SHARD2 = conformance_shard(2)
"""A second shard, for tests that need two."""


def entity_address(
    entity: str = "e1", shard_id: ShardId = SHARD, entity_type: str = "Counter"
) -> EntityAddress:
    """The address of entity ``entity_type/entity`` in ``shard_id``."""
    return EntityAddress(entity_type, EntityId(entity), shard_id)


def persisted_request(
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
    """A `PersistedRequest` to entity ``e1`` of `SHARD` (unless told
    otherwise), with a payload derived from its id unless given."""
    return PersistedRequest(
        request_id=request_id,
        address=entity_address(entity, shard_id, entity_type),
        tag=tag,
        payload=f"payload-{request_id}".encode() if payload is None else payload,
        primary_key=primary_key,
        deliver_at=deliver_at,
        stream=stream,
        claim_epoch=claim_epoch,
    )


def final_reply(
    request_id: int, epoch: int, payload: bytes = b"done", *, shard_id: ShardId = SHARD
) -> ReplyRecord:
    """The final reply to request ``request_id``, under ``epoch``."""
    return ReplyRecord(
        request_id=request_id, shard=shard_id, epoch=epoch, payload=payload
    )


def runner_info(
    port: int, *, weight: float = 1.0, groups: tuple[str, ...] = (GROUP,)
) -> RunnerInfo:
    """A runner at ``10.0.0.1:<port>`` hosting the conformance shard group."""
    return RunnerInfo(
        address=RunnerAddress("10.0.0.1", port), groups=groups, weight=weight
    )


async def acquire_shards(
    runners: RunnerStorage, *shards: ShardId
) -> dict[ShardId, int]:
    """Acquire shards that nobody holds; fail if one was not acquired."""
    epochs = await runners.acquire(list(shards))
    assert set(epochs) == set(shards), f"could not acquire {set(shards) - set(epochs)}"
    return epochs


async def acquire_shard(session: StorageSession, shard: ShardId = SHARD) -> int:
    """Acquire ``shard`` (nobody holds it) for ``session``; return its epoch."""
    return (await acquire_shards(session.runners, shard))[shard]


async def claim_batch(
    session: StorageSession,
    epoch: int,
    *,
    shard: ShardId = SHARD,
    now: float = BASE_TIME,
    limit: int = 10,
) -> ClaimBatch:
    """Claim the ready requests of ``shard``, held under ``epoch``."""
    return await session.messages.claim({shard: epoch}, now=now, limit=limit)


async def replies_of(
    messages: MessageStorage, request_id: int, after: int = -1
) -> StoredReplies:
    """The stored replies of one request (chunks after ``after``)."""
    [stored] = await messages.replies_for([ReplyQuery(request_id, after)])
    assert stored.request_id == request_id
    return stored


async def saved_and_claimed(
    session: StorageSession,
    *requests: PersistedRequest,
    now: float = BASE_TIME,
    claim: bool = True,
) -> int:
    """Acquire `SHARD`, save ``requests`` (all of `SHARD`) and claim them.

    The steps most message tests start with. With ``claim=False`` the
    requests are only saved.

    Returns:
        The epoch at which the session holds `SHARD`.
    """
    assert all(r.address.shard == SHARD for r in requests), "requests of SHARD only"
    epoch = await acquire_shard(session)
    if requests:
        await session.messages.save_requests(list(requests), now=now)
    if claim:
        batch = await claim_batch(session, epoch, now=now, limit=1000)
        claimed = [r.request_id for r in batch.requests]
        assert claimed == [r.request_id for r in requests], claimed
    return epoch


class Seen:
    """Everything a session's notifications mentioned so far."""

    def __init__(self) -> None:
        self.notifications: list[Notification] = []
        self.message_shards: set[ShardId] = set()
        self.reply_ids: set[int] = set()
        self.interrupted_ids: set[int] = set()
        self.interrupted_shards: set[ShardId] = set()
        self.runners_changed = 0

    def add(self, notification: Notification) -> None:
        self.notifications.append(notification)
        if isinstance(notification, MessagesAvailable):
            self.message_shards |= notification.shards
        elif isinstance(notification, RepliesAvailable):
            self.reply_ids |= notification.request_ids
        elif isinstance(notification, RequestsInterrupted):
            self.interrupted_ids |= notification.request_ids
            self.interrupted_shards |= notification.shards
        elif isinstance(notification, RunnersChanged):
            self.runners_changed += 1
        else:
            assert isinstance(notification, NotificationsMissed), notification


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


def _session_fixture(name: str) -> Any:
    """A fixture: a session named ``name`` of the `storage` fixture's backend."""

    @pytest.fixture
    async def opened(
        self: ConformanceBase, storage: Storage, lease_duration: float
    ) -> AsyncIterator[StorageSession]:
        async with storage.open_session(
            name=name, lease_duration=lease_duration
        ) as session:
            yield session

    return opened


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

    session = _session_fixture("conformance-a")
    """A session of the backend under test."""
    other = _session_fixture("conformance-b")
    """A second session of the same backend (another runner's)."""
