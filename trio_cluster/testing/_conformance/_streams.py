"""Conformance tests of remote streams over a transport (test support).

Part of `TransportConformance`: two runners on the transport under test and
one `MemoryStorage`, one hosting the `Streamer` entity and one client-only,
so every stream crosses the transport: items numbered ``STREAM_ITEM``
envelopes, ``STREAM_CREDIT`` from the caller, and ``STREAM_END``. Each item
kind a handler can stream is covered: plain msgpack values (int, float,
bool, str, bytes, list, dict, None), optional values, attrs classes, empty
streams, streams ending with a declared error or an undeclared one
(`RemoteError`), and streams many times longer than the credit window.
"""

from __future__ import annotations

# NOTE: the entity's annotations are read at runtime (they define its wire
# format), so the types they name are runtime imports.
from collections.abc import AsyncIterator, Callable  # noqa: TC003
from contextlib import (
    AbstractAsyncContextManager,
    AsyncExitStack,
    asynccontextmanager,
)
from typing import TYPE_CHECKING, Any, Final

import attrs
import pytest
import trio

from trio_cluster import (
    Entity,
    EntityClient,
    RemoteError,
    Runner,
    RunnerAddress,
    ShardingConfig,
    open_runner,
    rpc,
    stream,
)
from trio_cluster._engine._streams import STREAM_BUFFER
from trio_cluster.storage import MemoryStorage

if TYPE_CHECKING:
    from trio_cluster._transport_abc import Transport

__all__ = ["RemoteStreamTests", "Streamer"]

TIMEOUT: Final = 20.0
"""Guard for one test, in seconds."""
SHARDS: Final = 4
LONG: Final = 40 * STREAM_BUFFER + 3
"""Items of a stream many credit windows long."""


@attrs.frozen
class Items:
    """Ask a `Streamer` stream for ``count`` items."""

    count: int
    fail_after: int | None = None
    """`Streamer.failing`: raise after this many items."""


@attrs.frozen
class Point:
    """An attrs item."""

    x: int
    label: str
    tags: tuple[str, ...] = ()


@attrs.define(eq=False, kw_only=True)
class StreamFailed(Exception):
    """The error `Streamer.failing` declares."""

    after: int
    reason: str


def _int(n: int) -> int:
    big = 2**62 if n % 7 == 3 else 0
    return (n if n % 2 == 0 else -n) * 1_000_003 + big


def _float(n: int) -> float:
    return n / 4 - 1.5


def _bool(n: int) -> bool:
    return n % 3 == 0


def _str(n: int) -> str:
    return "" if n % 5 == 4 else f"item {n} \u2713"


def _bytes(n: int) -> bytes:
    return bytes([n % 256]) * (n % 4)


def _list(n: int) -> list[int]:
    return list(range(n, n + n % 3))


def _dict(n: int) -> dict[str, int]:
    return {} if n % 2 else {"n": n, "square": n * n}


def _maybe(n: int) -> int | None:
    return None if n % 2 else n


def _point(n: int) -> Point:
    return Point(n, f"p{n}", tuple("ab"[: n % 3]))


def _maybe_point(n: int) -> Point | None:
    return None if n % 3 == 1 else _point(n)


PLAIN: Final[dict[str, Callable[[int], object]]] = {
    "ints": _int,
    "floats": _float,
    "bools": _bool,
    "texts": _str,
    "blobs": _bytes,
    "lists": _list,
    "dicts": _dict,
    "nones": lambda n: None,
    "maybe_ints": _maybe,
}
"""Streamer's plain-value streams, by attribute, and the item ``n`` of each."""
ATTRS: Final[dict[str, Callable[[int], object]]] = {
    "points": _point,
    "maybe_points": _maybe_point,
}
"""Streamer's streams of attrs items."""


class Streamer(Entity):
    """One stream handler per item kind; item ``n`` of each is the function
    of the same name in `PLAIN` or `ATTRS` applied to ``n``."""

    type_name = "trio_cluster.testing.Streamer"

    def __init__(self) -> None:
        self.streams = 0

    @stream
    async def ints(self, msg: Items) -> AsyncIterator[int]:
        for n in range(msg.count):
            yield _int(n)

    @stream
    async def floats(self, msg: Items) -> AsyncIterator[float]:
        for n in range(msg.count):
            yield _float(n)

    @stream
    async def bools(self, msg: Items) -> AsyncIterator[bool]:
        for n in range(msg.count):
            yield _bool(n)

    @stream
    async def texts(self, msg: Items) -> AsyncIterator[str]:
        for n in range(msg.count):
            yield _str(n)

    @stream
    async def blobs(self, msg: Items) -> AsyncIterator[bytes]:
        for n in range(msg.count):
            yield _bytes(n)

    @stream
    async def lists(self, msg: Items) -> AsyncIterator[list[int]]:
        for n in range(msg.count):
            yield _list(n)

    @stream
    async def dicts(self, msg: Items) -> AsyncIterator[dict[str, int]]:
        for n in range(msg.count):
            yield _dict(n)

    @stream
    async def nones(self, msg: Items) -> AsyncIterator[None]:
        for _ in range(msg.count):
            yield None

    @stream
    async def maybe_ints(self, msg: Items) -> AsyncIterator[int | None]:
        for n in range(msg.count):
            yield _maybe(n)

    @stream
    async def points(self, msg: Items) -> AsyncIterator[Point]:
        for n in range(msg.count):
            yield _point(n)

    @stream
    async def maybe_points(self, msg: Items) -> AsyncIterator[Point | None]:
        for n in range(msg.count):
            yield _maybe_point(n)

    @stream(errors=[StreamFailed])
    async def failing(self, msg: Items) -> AsyncIterator[int]:
        """``msg.fail_after`` items, then `StreamFailed` if ``msg.count`` is
        even, else an undeclared `KeyError`."""
        self.streams += 1
        for n in range(msg.fail_after or 0):
            yield n
        if msg.count % 2 == 0:
            raise StreamFailed(after=msg.fail_after or 0, reason="declared \u2717")
        raise KeyError("undeclared")

    @rpc
    async def streams_started(self, msg: Items) -> int:
        """How many `failing` streams this incarnation started."""
        return self.streams


def _config() -> ShardingConfig:
    return ShardingConfig(
        runner_address=RunnerAddress("127.0.0.1", 0),
        shards_per_group=SHARDS,
        membership_poll_interval=0.05,
        send_retry_timeout=10.0,
        entity_termination_timeout=1.0,
    )


class RemoteStreamTests:
    """The remote-stream half of `TransportConformance` (see its docstring
    for the ``transport`` and ``clock`` fixtures)."""

    @asynccontextmanager
    async def stream_pair(
        self, transport: Transport
    ) -> AsyncIterator[EntityClient[Streamer]]:
        """A client of `Streamer` on a client-only runner; the entity lives
        on another runner, so every call crosses ``transport``."""
        storage = MemoryStorage()
        async with AsyncExitStack() as stack:
            host = await stack.enter_async_context(
                open_runner(
                    entities=[Streamer],
                    config=_config(),
                    storage=storage,
                    transport=transport,
                )
            )
            client = await stack.enter_async_context(
                open_runner(
                    entities=[],
                    config=attrs.evolve(_config(), shard_groups=()),
                    storage=storage,
                    transport=transport,
                )
            )
            await host.wait_shards_acquired()
            await _wait_until(lambda: _knows(client, host))
            yield client.client(Streamer)

    async def test_remote_streams_of_plain_values(
        self, transport: Transport, clock: trio.abc.Clock | None
    ) -> None:
        with trio.fail_after(TIMEOUT):
            async with self.stream_pair(transport) as streamer:
                for name, item in PLAIN.items():
                    count = 2 * STREAM_BUFFER + 5
                    received = await _collect(streamer("plain"), name, count)
                    expected = [item(n) for n in range(count)]
                    assert received == expected, name
                    # Exactly: a float stays a float, a bool a bool.
                    assert [type(x) for x in received] == [type(x) for x in expected], (
                        name
                    )

    async def test_remote_streams_of_attrs_items(
        self, transport: Transport, clock: trio.abc.Clock | None
    ) -> None:
        with trio.fail_after(TIMEOUT):
            async with self.stream_pair(transport) as streamer:
                for name, item in ATTRS.items():
                    count = STREAM_BUFFER + 5
                    received = await _collect(streamer("attrs"), name, count)
                    assert received == [item(n) for n in range(count)], name

    async def test_empty_remote_streams_of_every_kind(
        self, transport: Transport, clock: trio.abc.Clock | None
    ) -> None:
        with trio.fail_after(TIMEOUT):
            async with self.stream_pair(transport) as streamer:
                for name in [*PLAIN, *ATTRS]:
                    assert await _collect(streamer("empty"), name, 0) == [], name

    async def test_remote_stream_ending_with_a_declared_error(
        self, transport: Transport, clock: trio.abc.Clock | None
    ) -> None:
        with trio.fail_after(TIMEOUT):
            async with self.stream_pair(transport) as streamer:
                entity = streamer("declared")
                for after in (0, 3, STREAM_BUFFER + 1):
                    received: list[int] = []
                    with pytest.raises(StreamFailed) as caught:
                        await _read_into(received, entity.failing(Items(0, after)))
                    assert received == list(range(after))
                    assert (caught.value.after, caught.value.reason) == (
                        after,
                        "declared \u2717",
                    )
                # A declared error does not restart the entity.
                assert await entity.streams_started(Items(0)) == 3

    async def test_remote_stream_ending_with_an_undeclared_error(
        self, transport: Transport, clock: trio.abc.Clock | None
    ) -> None:
        with trio.fail_after(TIMEOUT):
            async with self.stream_pair(transport) as streamer:
                entity = streamer("undeclared")
                for after in (0, 3, STREAM_BUFFER + 1):
                    received: list[int] = []
                    with pytest.raises(RemoteError) as caught:
                        await _read_into(received, entity.failing(Items(1, after)))
                    assert received == list(range(after))
                    assert caught.value.type_name == "KeyError"
                    assert "undeclared" in str(caught.value)
                # The entity restarted after each: a fresh incarnation.
                assert await entity.streams_started(Items(0)) == 0

    async def test_long_remote_stream_crosses_the_credit_window(
        self, transport: Transport, clock: trio.abc.Clock | None
    ) -> None:
        with trio.fail_after(TIMEOUT):
            async with self.stream_pair(transport) as streamer:
                entity = streamer("long")
                assert await _collect(entity, "ints", LONG) == [
                    _int(n) for n in range(LONG)
                ]
                # A consumer that reads in bursts, pausing between them,
                # gets every item once, in order.
                received: list[int] = []
                async with entity.points(Items(LONG)) as points:
                    async for point in points:
                        received.append(point.x)
                        if len(received) % (STREAM_BUFFER + 3) == 0:
                            await trio.sleep(0.01)
                assert received == list(range(LONG))
                # Several long streams at once, from one connection.
                results: dict[int, list[int]] = {}

                async def read(index: int) -> None:
                    results[index] = await _collect(
                        streamer(f"long-{index}"), "ints", LONG
                    )

                async with trio.open_nursery() as nursery:
                    for index in range(4):
                        nursery.start_soon(read, index)
                expected = [_int(n) for n in range(LONG)]
                assert results == dict.fromkeys(range(4), expected)
                # Leaving a long stream early stops it; the entity answers.
                async with entity.ints(Items(LONG)) as items:
                    assert await items.__anext__() == _int(0)
                assert await entity.streams_started(Items(0)) == 0


async def _collect(entity: Any, name: str, count: int) -> list[Any]:
    """Every item of stream ``name`` of ``entity`` for ``Items(count)``."""
    async with getattr(entity, name)(Items(count)) as items:
        return [item async for item in items]


async def _read_into(
    received: list[Any], opened: AbstractAsyncContextManager[AsyncIterator[Any]]
) -> None:
    """Append the items of the stream ``opened`` to ``received`` as they
    come (those before an error stay there)."""
    async with opened as items:
        async for item in items:
            received.append(item)  # noqa: PERF401 - keep them up to an error


def _knows(client: Runner, host: Runner) -> bool:
    """Whether ``client`` sees ``host`` serving every shard."""
    assignment = client.assignment()
    return len(assignment) == SHARDS and set(assignment.values()) == {host.address}


async def _wait_until(condition: Callable[[], bool]) -> None:
    while not condition():  # noqa: ASYNC110 - membership is polled
        await trio.sleep(0.01)
