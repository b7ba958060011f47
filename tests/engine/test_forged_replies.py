"""Replies are taken only from whom they are owed (issue 12, item 4).

A runner accepted a final reply of a persisted request pushed by any
connection, for any request id (ids are guessable): a forged reply was
returned to the caller as its result. A pushed reply is now taken only from
the owner the request's notice was sent to, while a caller here waits for it;
storage stays the authority for everything else."""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AsyncExitStack
from typing import Any

import msgpack
import trio

import trio_cluster as tc
from trio_cluster._engine._wire import Kind
from trio_cluster.abc import PersistedRequest, StorageSession, StorageTransaction
from trio_cluster.testing import RecordingHandler
from trio_cluster.transport import MemoryTransport

from ..helpers import Add, PatchingStorage
from ..memory_cluster import Cluster, Tally, Where


class HeldSaves(PatchingStorage):
    """Memory storage whose request saves wait for ``release`` once
    ``hold`` is set, and which records the request ids saved."""

    def __init__(self) -> None:
        super().__init__()
        self.saved: list[int] = []
        self.hold = False
        self.release = trio.Event()

    def patch_session(self, session: StorageSession) -> None:
        messages = session.messages
        save = messages.save_requests

        async def held_save(
            requests: Sequence[PersistedRequest],
            *,
            now: float,
            transaction: StorageTransaction | None = None,
        ) -> Any:
            self.saved.extend(request.request_id for request in requests)
            if self.hold:
                await self.release.wait()
            return await save(requests, now=now, transaction=transaction)

        messages.save_requests = held_save  # type: ignore[method-assign]


def forged(value: object) -> bytes:
    packed: bytes = msgpack.packb([0, value])
    return packed


async def test_a_forged_persisted_reply_is_not_taken(autojump_clock):
    async with AsyncExitStack() as stack:
        cluster = Cluster(stack)
        storage = cluster.storage = HeldSaves()
        for port in (1, 2):
            await cluster.start(port)
        await cluster.settled()
        sender = cluster.runners[1]
        entity = cluster.remote_id(sender)
        forger = await stack.enter_async_context(
            MemoryTransport(cluster.network).open_endpoint(
                tc.RunnerAddress("127.0.0.1", 99), RecordingHandler()
            )
        )
        results: list[Where] = []

        async def call() -> None:
            results.append(await sender.client(Tally)(entity).add_persisted(Add(5)))

        storage.hold = True
        async with trio.open_nursery() as nursery:
            nursery.start_soon(call)
            with trio.fail_after(10):
                while not storage.saved:  # noqa: ASYNC110
                    await trio.sleep(0.01)
            [request_id] = storage.saved
            # A stranger, and then the owner itself before it was asked,
            # push a reply for the request the caller waits for.
            fake = forged({"runner": "forged", "total": 999})
            forger.send_nowait(sender.address, [Kind.PERSISTED_REPLY, request_id, fake])
            await trio.sleep(1)
            storage.hold = False
            storage.release.set()
        [result] = results
        assert result.total == 5
        assert result.runner == str(cluster.owner(entity).address)


async def test_a_pushed_reply_is_taken_from_the_owner_asked_only():
    from trio_cluster._engine._waiters import ReplyWaiters

    owner, other = tc.RunnerAddress("10.0.0.1", 1), tc.RunnerAddress("10.0.0.2", 1)
    waiters = ReplyWaiters(endpoint=None)
    waiters.expect_from(7, owner)  # nobody waits: nothing to expect
    assert not waiters.pushed(owner, 7, b"x")
    waiter = waiters.register(7)
    waiters.expect_from(7, owner)
    assert not waiters.pushed(other, 7, b"forged")
    assert not waiter.event.is_set()
    assert waiters.pushed(owner, 7, b"real")
    assert waiter.payload == b"real"
    # Answered: a second push (a duplicate, or a replay) is not taken.
    assert not waiters.pushed(owner, 7, b"again")
    # A caller that gives up forgets whom it expected.
    gave_up = waiters.register(8)
    waiters.expect_from(8, owner)
    waiters.unregister(8, gave_up)
    assert not waiters.pushed(owner, 8, b"late")
