"""A chat room: members post messages and watch a live stream of them.

``watch`` is a stream handler: it runs alongside the room's other handlers,
so the room keeps accepting posts while members are watching.

Run it with ``python examples/chat_room.py``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import attrs
import trio

import trio_cluster as tc
from trio_cluster.abc import Storage


@attrs.frozen
class Post:
    author: str
    text: str


@attrs.frozen
class Watch:
    pass


@attrs.frozen
class Line:
    author: str
    text: str


class ChatRoom(tc.Entity):
    type_name = "ChatRoom"

    def __init__(self) -> None:
        self.history: list[Line] = []
        self.watchers: list[trio.MemorySendChannel[Line]] = []

    @tc.rpc
    async def post(self, msg: Post) -> int:
        line = Line(msg.author, msg.text)
        self.history.append(line)
        for watcher in list(self.watchers):
            try:
                watcher.send_nowait(line)
            except (trio.WouldBlock, trio.BrokenResourceError):
                self.watchers.remove(watcher)  # too slow, or gone: drop it
        return len(self.history)

    @tc.stream
    async def watch(self, msg: Watch) -> AsyncIterator[Line]:
        send, receive = trio.open_memory_channel[Line](100)
        self.watchers.append(send)
        try:
            for line in list(self.history):
                yield line
            async with receive:
                async for line in receive:
                    yield line
        finally:
            if send in self.watchers:
                self.watchers.remove(send)


async def main(storage: Storage | None = None) -> list[str]:
    seen: list[str] = []
    async with tc.open_runner(entities=[ChatRoom], storage=storage) as runner:
        room = runner.client(ChatRoom)("lobby")
        await room.post(Post("ada", "hello"))

        async def watcher(
            task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
        ) -> None:
            async with room.watch(Watch()) as lines:
                task_status.started()
                async for line in lines:
                    seen.append(f"{line.author}: {line.text}")
                    print(f"[bob sees] {line.author}: {line.text}")
                    if len(seen) == 3:
                        return

        async with trio.open_nursery() as nursery:
            await nursery.start(watcher)
            await room.post(Post("ada", "anyone here?"))
            await room.post(Post("bob", "hi ada!"))
    return seen


if __name__ == "__main__":
    trio.run(main)
