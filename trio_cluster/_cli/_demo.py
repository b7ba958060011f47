"""``trio-cluster demo``: a short, self-contained tour on memory storage.

It shows entities called by id, persisted messages with deduplication and
delayed delivery, a stream, an entity crash and its restart, and a runner
restart that replays a persisted message. Everything runs in this process.
"""

from __future__ import annotations

from collections.abc import AsyncIterator  # noqa: TC003 - read at runtime: wire format
from typing import TYPE_CHECKING

import attrs
import trio

from .._core._config import ShardingConfig
from .._entity import Entity
from .._errors import RemoteError
from .._handlers import rpc, stream
from .._runner import open_runner
from ..storage._memory._storage import MemoryStorage

if TYPE_CHECKING:
    from collections.abc import Callable

__all__ = ["run_demo"]


@attrs.frozen
class Visit:
    page: str


@attrs.frozen
class Deposit:
    tx_id: str
    amount: int


@attrs.frozen
class Reminder:
    text: str
    at: float


@attrs.frozen
class Say:
    author: str
    text: str


@attrs.frozen
class Follow:
    limit: int


@attrs.frozen
class Explode:
    reason: str


@attrs.frozen
class Peek:
    pass


class PageCounter(Entity):
    """A volatile counter per page: state in memory, calls in order."""

    type_name = "demo.PageCounter"

    def __init__(self) -> None:
        self.visits = 0

    @rpc
    async def visit(self, msg: Visit) -> int:
        self.visits += 1
        return self.visits

    @rpc
    async def explode(self, msg: Explode) -> None:
        raise RuntimeError(msg.reason)

    @rpc
    async def peek(self, msg: Peek) -> int:
        return self.visits


class Wallet(Entity):
    """Persisted deposits, deduplicated by transaction id."""

    type_name = "demo.Wallet"

    def __init__(self) -> None:
        self.balance = 0
        self.reminders: list[str] = []

    @rpc(persisted=True, primary_key=lambda m: m.tx_id)
    async def deposit(self, msg: Deposit) -> int:
        self.balance += msg.amount
        return self.balance

    @rpc(persisted=True, deliver_at=lambda m: m.at)
    async def remind(self, msg: Reminder) -> str:
        self.reminders.append(msg.text)
        return f"reminded: {msg.text}"

    @rpc
    async def reminded(self, msg: Peek) -> list[str]:
        return list(self.reminders)


class Room(Entity):
    """A chat room whose followers get a stream of lines."""

    type_name = "demo.Room"

    def __init__(self) -> None:
        self.followers: list[trio.MemorySendChannel[str]] = []

    @rpc
    async def say(self, msg: Say) -> None:
        for follower in self.followers:
            follower.send_nowait(f"{msg.author}: {msg.text}")

    @stream
    async def follow(self, msg: Follow) -> AsyncIterator[str]:
        send, receive = trio.open_memory_channel[str](msg.limit)
        self.followers.append(send)
        try:
            for _ in range(msg.limit):
                yield await receive.receive()
        finally:
            self.followers.remove(send)


ENTITIES: list[type[Entity]] = [PageCounter, Wallet, Room]


async def run_demo(out: Callable[[str], None] = print) -> None:
    """Run the tour, writing readable lines with ``out``."""
    storage = MemoryStorage()

    config = ShardingConfig(entity_restart_backoff=0.2)
    start = trio.current_time()

    def say(text: str) -> None:
        out(f"[{trio.current_time() - start:6.3f}s] {text}")

    out("trio_cluster demo: one runner, memory storage\n")
    async with open_runner(entities=ENTITIES, config=config, storage=storage) as runner:
        await runner.wait_shards_acquired()
        say(f"runner {runner.address} serves {runner.statistics().shards} shards")

        out("\n1. Entities, called by id (each keeps its own state)")
        pages = runner.client(PageCounter)
        for page in ["home", "home", "about", "home"]:
            count = await pages(page).visit(Visit(page))
            say(f"visit {page!r:8} -> {count} visit(s)")

        out("\n2. Persisted messages: stored first, deduplicated by primary key")
        wallet = runner.client(Wallet)("alice")
        say(f"deposit t1 +100 -> balance {await wallet.deposit(Deposit('t1', 100))}")
        say(f"deposit t2 +25  -> balance {await wallet.deposit(Deposit('t2', 25))}")
        again = await wallet.deposit(Deposit("t1", 100))
        say(
            f"deposit t1 again (a retry) -> {again}: the stored reply, not applied twice"
        )

        out("\n3. Delayed delivery: a reminder 0.5 s from now (a timer, not a poll)")
        say(await wallet.remind(Reminder("pay rent", runner.clock.now() + 0.5)))

        out("\n4. A stream: follow a room while people talk")
        room = runner.client(Room)("lobby")
        async with trio.open_nursery() as nursery:

            async def follow(
                task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
            ) -> None:
                async with room.follow(Follow(2)) as lines:
                    task_status.started()
                    async for line in lines:
                        say(f"follower got {line!r}")

            await nursery.start(follow)
            await room.say(Say("ada", "hello"))
            await room.say(Say("bob", "hi ada"))

        out(
            "\n5. A crash: the caller gets RemoteError, the entity restarts with backoff"
        )
        try:
            await pages("home").explode(Explode("disk on fire"))
        except RemoteError as exc:
            say(f"RemoteError: {exc.type_name}: {exc.message}")
        say(
            f"home visits after the restart: {await pages('home').peek(Peek())} (fresh state)"
        )

        out("\n6. A persisted message outlives its runner")
        await runner.client(Wallet)("bob").remind.discard(
            Reminder("water plants", runner.clock.now() + 0.3)
        )
        say("sent a reminder to bob for 0.3 s from now, then shut the runner down")
    async with open_runner(entities=ENTITIES, config=config, storage=storage) as runner:
        say("a new runner on the same storage claims it when it is due ...")
        bob = runner.client(Wallet)("bob")
        with trio.move_on_after(5):
            # The demo watches from outside the entity, so it polls.
            while not (reminded := await bob.reminded(Peek())):  # noqa: ASYNC110
                await trio.sleep(0.05)
            say(f"bob was reminded by the new runner: {reminded}")
    out("\ndone.")
