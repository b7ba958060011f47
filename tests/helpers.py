"""Entity classes and helpers shared by the runtime tests.

* messages and `Counter`, the all-purpose entity, with `config` (few shards);
* `Tracked` (a lifecycle log; the `clear_tracked_log` fixture resets it),
  `Quick` (handlers that cannot suspend), `Elsewhere` (another shard group),
  `Echo` (logs what it is sent), `http_get` and `load_example`;
* persisted entities (`Account`, `Ledger`) on a wall `clock`
  (`open_clocked_runner`), storage faults (`FailFirst` as a fault hook,
  `PatchingStorage` for what a hook cannot fake), and a pair of runners on
  one memory storage (`open_pair`, `remote_id`).

The multi-runner cluster on the memory transport is `tests.memory_cluster`.
"""

from __future__ import annotations

import importlib.util
import logging
import sys
from collections.abc import AsyncIterator, Collection, Sequence
from contextlib import (
    AbstractAsyncContextManager,
    AsyncExitStack,
    asynccontextmanager,
)
from pathlib import Path
from types import ModuleType
from typing import Any

import attrs
import pytest
import trio
import trio.lowlevel
import trio.testing

import trio_cluster as tc
from trio_cluster.abc import RunnerInfo, Storage, StorageSession
from trio_cluster.storage import MemoryStorage


@attrs.frozen
class Add:
    amount: int


@attrs.frozen
class Get:
    pass


@attrs.frozen
class Sleep:
    seconds: float


@attrs.frozen
class Boom:
    text: str


@attrs.frozen
class Count:
    upto: int


@attrs.define(eq=False, kw_only=True)
class TooBig(Exception):
    limit: int


class Counter(tc.Entity):
    type_name = "Counter"
    max_idle = 30.0

    def __init__(self) -> None:
        self.value = 0
        self.started = 0
        self.events: list[str] = []

    async def on_start(self) -> None:
        self.started += 1

    @tc.rpc(errors=[TooBig])
    async def add(self, msg: Add) -> int:
        if msg.amount > 1000:
            raise TooBig(limit=1000)
        self.value += msg.amount
        return self.value

    @tc.rpc
    async def get(self, msg: Get) -> int:
        return self.value

    @tc.rpc
    async def sleep(self, msg: Sleep) -> float:
        await trio.sleep(msg.seconds)
        return trio.current_time()

    @tc.rpc
    async def boom(self, msg: Boom) -> None:
        raise KeyError(msg.text)

    @tc.stream
    async def count(self, msg: Count) -> AsyncIterator[int]:
        for i in range(msg.upto):
            yield i
            await trio.sleep(1)


EXAMPLES = Path(__file__).parent.parent / "examples"


def load_example(name: str, *, module_name: str | None = None) -> ModuleType:
    """Import ``examples/<name>.py`` afresh, as ``module_name`` (default
    ``example_<name>``)."""
    spec = importlib.util.spec_from_file_location(
        module_name or f"example_{name}", EXAMPLES / f"{name}.py"
    )
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # attrs/cattrs resolve annotations through it
    spec.loader.exec_module(module)
    return module


def config(**overrides: object) -> tc.ShardingConfig:
    """A small, fast config for tests (few shards)."""
    values: dict[str, object] = {"shards_per_group": 8}
    values.update(overrides)
    return tc.ShardingConfig(**values)  # type: ignore[arg-type]


class Tracked(tc.Entity):
    type_name = "Tracked"
    max_idle = 10.0

    log: list[str] = []  # shared across incarnations on purpose  # noqa: RUF012

    async def on_start(self) -> None:
        Tracked.log.append(f"start {self.id} {tc.current_entity_address()}")

    async def on_stop(self) -> None:
        Tracked.log.append(f"stop {self.id}")

    @tc.rpc
    async def touch(self, msg: Get) -> str:
        return self.id

    @tc.rpc
    async def hold(self, msg: Get) -> None:
        self.keep_alive()

    @tc.rpc
    async def release(self, msg: Get) -> None:
        self.keep_alive(False)

    @tc.rpc
    async def nap(self, msg: Sleep) -> None:
        await trio.sleep(msg.seconds)


class Elsewhere(tc.Entity):
    type_name = "Elsewhere"
    shard_group = "batch"

    @tc.rpc
    async def ping(self, msg: Get) -> str:
        return "pong"


@attrs.frozen
class Ping:
    text: str


class Echo(tc.Entity):
    type_name = "ops.Echo"

    @tc.rpc
    async def ping(self, msg: Ping) -> str:
        logging.getLogger("trio_cluster.test").warning("pinged with %s", msg.text)
        return msg.text


async def http_get(port: int, path: str, method: str = "GET") -> tuple[int, str]:
    """``method path`` on 127.0.0.1:``port`` (real time, bounded); (status, body)."""
    with trio.fail_after(10):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            await stream.send_all(
                f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode()
            )
            data = b""
            while chunk := await stream.receive_some(65536):
                data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body.decode()


ORIGIN = 1_800_000_000.0


@attrs.frozen
class Deposit:
    tx_id: str
    amount: int


@attrs.frozen
class Later:
    text: str
    at: float


class Account(tc.Entity):
    type_name = "Account"
    concurrency = 2

    def __init__(self) -> None:
        self.balance = 0
        self.applied: list[str] = []

    @tc.rpc(persisted=True, primary_key=lambda m: m.tx_id)
    async def deposit(self, msg: Deposit) -> int:
        self.balance += msg.amount
        self.applied.append(msg.tx_id)
        return self.balance

    @tc.rpc(persisted=True)
    async def slow_deposit(self, msg: Deposit) -> int:
        await trio.sleep(10)
        self.balance += msg.amount
        self.applied.append(msg.tx_id)
        return self.balance

    @tc.rpc(persisted=True)
    async def crash(self, msg: Deposit) -> None:
        await trio.sleep(1)
        raise RuntimeError(f"crash {msg.tx_id}")

    @tc.rpc(persisted=True, deliver_at=lambda m: m.at)
    async def remind(self, msg: Later) -> float:
        from trio_cluster import current_runner

        self.applied.append(msg.text)
        return current_runner().clock.now()

    @tc.rpc
    async def applied_ids(self, msg: Get) -> list[str]:
        return list(self.applied)


class Ledger(tc.Entity):
    """Like Account, one handler at a time (FIFO applies to completion too)."""

    type_name = "Ledger"

    def __init__(self) -> None:
        self.applied: list[str] = []

    @tc.rpc(persisted=True)
    async def slow_append(self, msg: Deposit) -> None:
        await trio.sleep(10)
        self.applied.append(msg.tx_id)

    @tc.rpc
    async def applied_ids(self, msg: Get) -> list[str]:
        return list(self.applied)


def clock() -> tc.TrioWallClock:
    return tc.TrioWallClock(origin=ORIGIN)


def open_clocked_runner(
    entities: Sequence[type[tc.Entity]],
    cfg: tc.ShardingConfig | None = None,
    storage: Storage | None = None,
) -> AbstractAsyncContextManager[tc.Runner]:
    """A runner of ``entities`` on the wall `clock`, with ``cfg`` (else
    `config()`) and ``storage`` (else a private memory storage)."""
    return tc.open_runner(
        entities=entities,
        config=config() if cfg is None else cfg,
        storage=storage,
        clock=clock(),
    )


class FailFirst:
    """A `MemoryStorage.fault_hook`: the first ``times`` calls of ``operation``
    (by any session) raise ``OSError(message)``."""

    def __init__(self, operation: str, times: int, message: str) -> None:
        self.operation = operation
        self.left = times
        """Failures still to come."""
        self.message = message

    async def __call__(self, session: str, operation: str) -> None:
        if operation == self.operation and self.left:
            self.left -= 1
            raise OSError(self.message)


class PatchingStorage(MemoryStorage):
    """MemoryStorage whose sessions a subclass changes as they open (to fake
    what memory storage cannot do by itself)."""

    @asynccontextmanager
    async def open_session(
        self, *, name: str, lease_duration: float
    ) -> AsyncIterator[StorageSession]:
        async with super().open_session(
            name=name, lease_duration=lease_duration
        ) as session:
            self.patch_session(session)
            yield session

    def patch_session(self, session: StorageSession) -> None:
        """Change ``session`` (its methods) before the runner sees it."""
        raise NotImplementedError


class RefreshPatchingStorage(PatchingStorage):
    """MemoryStorage whose lease refreshes (`refresh_and_list`, what the
    runner's lease loop calls) a subclass changes: `refreshed` gets each
    answer storage gave, and returns what the runner gets."""

    def patch_session(self, session: StorageSession) -> None:
        runners = session.runners
        original = runners.refresh_and_list

        async def refresh(
            shards: Collection[tc.ShardId],
        ) -> tuple[set[tc.ShardId], list[RunnerInfo]]:
            return await self.refreshed(await original(shards))

        runners.refresh_and_list = refresh  # type: ignore[method-assign]

    async def refreshed(
        self, answer: tuple[set[tc.ShardId], list[RunnerInfo]]
    ) -> tuple[set[tc.ShardId], list[RunnerInfo]]:
        """What the runner gets for storage's ``answer`` (when it gets it)."""
        raise NotImplementedError


def runner_config(port: int, **overrides: object) -> tc.ShardingConfig:
    return config(runner_address=tc.RunnerAddress("127.0.0.1", port), **overrides)


async def open_pair(
    stack: AsyncExitStack, storage: MemoryStorage, **overrides: object
) -> tuple[tc.Runner, tc.Runner]:
    entities = [Account, Ledger]
    first = await stack.enter_async_context(
        tc.open_runner(
            entities=entities,
            config=runner_config(1, **overrides),
            storage=storage,
            clock=clock(),
        )
    )
    second = await stack.enter_async_context(
        tc.open_runner(
            entities=entities,
            config=runner_config(2, **overrides),
            storage=storage,
            clock=clock(),
        )
    )
    with trio.fail_after(5):
        # Both runners poll membership; wait until the shards are split.
        while first.statistics().shards + second.statistics().shards != 8 or not (  # noqa: ASYNC110
            first.statistics().shards and second.statistics().shards
        ):
            await trio.sleep(0.05)
    return first, second


def remote_id(sender: tc.Runner, cls: type[tc.Entity]) -> str:
    """An entity id whose shard the sender does not serve."""
    client = sender.client(cls)
    for i in range(1000):
        if client.address_of(f"e{i}").shard not in sender.served_shards():
            return f"e{i}"
    raise AssertionError("no remote shard")


class Quick(tc.Entity):
    type_name = "Quick"

    def __init__(self) -> None:
        self.value = 0
        self.address_at_start: tc.EntityAddress | None = None

    async def on_start(self) -> None:
        self.address_at_start = tc.current_entity_address()

    @tc.rpc
    async def add(self, msg: Add) -> int:
        self.value += msg.amount
        return self.value

    @tc.rpc
    async def started_with(self, msg: Get) -> str:
        return str(self.address_at_start)


def session_fixture(name: str, *, lease: float, session: str | None = None) -> Any:
    """The fixture ``name``: a session (named ``session``, default ``name``,
    with lease ``lease``) of the test's ``storage`` fixture."""

    @pytest.fixture(name=name)
    async def opened(storage: Storage) -> AsyncIterator[StorageSession]:
        async with storage.open_session(
            name=session or name, lease_duration=lease
        ) as opened:
            yield opened

    return opened


async def deposit_beside_a_bad_one(runner: tc.Runner, bad_key: str) -> list[object]:
    """100 innocent persisted calls at once with one whose key storage cannot
    hold; returns every outcome (the bad one last)."""
    accounts = runner.client(Account)
    outcomes: list[object] = [None] * 101

    async def deposit(i: int, key: str) -> None:
        try:
            outcomes[i] = await accounts(f"a{i % 7}").deposit(Deposit(key, 1))
        except tc.ClusterError as exc:
            outcomes[i] = exc

    async with trio.open_nursery() as nursery:
        for i in range(100):
            nursery.start_soon(deposit, i, f"tx{i}")
        nursery.start_soon(deposit, 100, bad_key)
    return outcomes


ENTITIES_FOR_CLI = [Counter]
"""What ``trio-cluster run tests.helpers:ENTITIES_FOR_CLI`` hosts."""


class TaskSteps(trio.abc.Instrument):
    """Counts the steps of one task (a step ends where it yields)."""

    def __init__(self, task: trio.lowlevel.Task) -> None:
        self.task = task
        self.steps = 0

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        if task is self.task:
            self.steps += 1
