"""Registration of entity types (`trio_cluster._registry`): eager validation
with errors that say what to do, codecs, and which handlers may suspend."""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING

import attrs
import pytest
import trio
import trio.lowlevel
import trio.testing

import trio_cluster as tc
from trio_cluster._registry import EntityType, may_suspend, resolve_entity_type
from trio_cluster.serialization import make_converter

from .helpers import Add, Counter, Get, Quick, config

if TYPE_CHECKING:
    from .helpers import Get as HiddenGet


def resolve(cls: object) -> EntityType:
    return resolve_entity_type(
        cls, config=tc.ShardingConfig(), converter=make_converter()
    )


def test_valid_entity_resolves():
    entity_type = resolve(Counter)
    assert entity_type.name == "Counter"
    assert set(entity_type.handlers) == {"add", "get", "sleep", "boom", "count"}
    assert entity_type.max_idle == 30.0
    assert entity_type.mailbox_capacity == 4096  # the config's default


def test_missing_type_name():
    class NoName(tc.Entity):
        @tc.rpc
        async def f(self, msg: Add) -> int:
            return 1

    with pytest.raises(tc.EntityDefinitionError, match="set a stable type_name"):
        resolve(NoName)


def test_not_an_entity():
    with pytest.raises(tc.EntityDefinitionError, match="Entity subclasses"):
        resolve(int)


def test_no_handlers():
    class Empty(tc.Entity):
        type_name = "Empty"

    with pytest.raises(tc.EntityDefinitionError, match="at least one"):
        resolve(Empty)


def test_constructor_with_arguments():
    class Needy(tc.Entity):
        type_name = "Needy"

        def __init__(self, x: int) -> None:
            self.x = x

        @tc.rpc
        async def f(self, msg: Add) -> int:
            return 1

    with pytest.raises(
        tc.EntityDefinitionError, match="constructor must take no arguments"
    ):
        resolve(Needy)


@pytest.mark.parametrize(
    ("attribute", "value", "message"),
    [
        ("max_idle", -1, "max_idle"),
        ("mailbox_capacity", 0, "mailbox_capacity"),
        ("concurrency", True, "concurrency"),
        ("shard_group", "", "shard_group"),
        ("defect_retry", 3, "defect_retry must be a RetryPolicy"),
    ],
)
def test_bad_policies(attribute, value, message):
    cls = type("Bad", (Counter,), {"type_name": "Bad", attribute: value})
    with pytest.raises(tc.EntityDefinitionError, match=message):
        resolve(cls)


def test_handler_must_be_async():
    class Sync(tc.Entity):
        type_name = "Sync"

        @tc.rpc  # type: ignore[arg-type]
        def f(self, msg: Add) -> int:
            return 1

    with pytest.raises(tc.EntityDefinitionError, match="async def"):
        resolve(Sync)


def test_stream_must_be_an_async_generator():
    class NotGen(tc.Entity):
        type_name = "NotGen"

        @tc.stream  # type: ignore[arg-type]
        async def f(self, msg: Add) -> AsyncIterator[int]:
            return None  # type: ignore[return-value]

    with pytest.raises(tc.EntityDefinitionError, match="async generator"):
        resolve(NotGen)


def test_handler_takes_one_message():
    class TwoArgs(tc.Entity):
        type_name = "TwoArgs"

        @tc.rpc  # type: ignore[arg-type]
        async def f(self, a: Add, b: Add) -> int:
            return 1

    with pytest.raises(tc.EntityDefinitionError, match="exactly one message"):
        resolve(TwoArgs)


def test_annotations_are_required():
    class Bare(tc.Entity):
        type_name = "Bare"

        @tc.rpc
        async def f(self, msg):
            return 1

    with pytest.raises(tc.EntityDefinitionError, match="annotate"):
        resolve(Bare)


def test_annotations_must_resolve_at_runtime():
    class Hidden(tc.Entity):
        type_name = "Hidden"

        @tc.rpc
        async def f(self, msg: HiddenGet) -> int:
            return 1

    with pytest.raises(tc.EntityDefinitionError, match="importable at runtime"):
        resolve(Hidden)


class Opaque:
    """Not attrs, no hooks: the converter cannot handle it."""


def test_message_type_must_be_encodable():
    class UsesOpaque(tc.Entity):
        type_name = "UsesOpaque"

        @tc.rpc
        async def f(self, msg: Opaque) -> int:
            return 1

    with pytest.raises(tc.EntityDefinitionError, match="cannot encode"):
        resolve(UsesOpaque)


def test_stream_needs_an_element_type():
    class Untyped(tc.Entity):
        type_name = "Untyped"

        @tc.stream  # type: ignore[arg-type]
        async def f(self, msg: Add) -> int:  # type: ignore[misc]
            yield 1

    with pytest.raises(tc.EntityDefinitionError, match=r"AsyncIterator\[T\]"):
        resolve(Untyped)


def test_declared_error_tags_must_be_unique():
    @attrs.define(eq=False)
    class A(Exception):
        type_name = "Same"

    @attrs.define(eq=False)
    class B(Exception):
        type_name = "Same"

    class Clash(tc.Entity):
        type_name = "Clash"

        @tc.rpc(errors=[A, B])
        async def f(self, msg: Add) -> int:
            return 1

    with pytest.raises(tc.EntityDefinitionError, match="tag 'Same'"):
        resolve(Clash)


def test_duplicate_type_names_are_refused():
    class Other(tc.Entity):
        type_name = "Counter"

        @tc.rpc
        async def f(self, msg: Add) -> int:
            return 1

    with pytest.raises(tc.EntityDefinitionError, match="used by both"):
        tc._registry.Registry(
            [Counter, Other], config=tc.ShardingConfig(), converter=make_converter()
        )


async def test_open_runner_validates_before_starting():
    class NoName(tc.Entity):
        @tc.rpc
        async def f(self, msg: Add) -> int:
            return 1

    with pytest.raises(tc.EntityDefinitionError):
        async with tc.open_runner(entities=[NoName]):
            pytest.fail("must not start")


async def test_unencodable_reply_is_a_malformed_message_error(autojump_clock):
    class Liar(tc.Entity):
        type_name = "Liar"

        @tc.rpc
        async def answer(self, msg: Get) -> int:
            return "not an int"  # type: ignore[return-value]

    async with tc.open_runner(entities=[Liar], config=config()) as runner:
        with pytest.raises(tc.MalformedMessageError, match="reply"):
            await runner.client(Liar)("l").answer(Get())
        assert runner.statistics().entity_crashes == 0


async def plain(self: object, msg: object) -> int:
    return 1


async def awaits(self: object, msg: object) -> None:
    await trio.lowlevel.checkpoint()


async def async_with(self: object, msg: trio.Lock) -> None:
    async with msg:
        pass


async def async_for(self: object, msg: trio.MemoryReceiveChannel[int]) -> None:
    async for _ in msg:
        pass


async def comprehension(self: object, msg: trio.MemoryReceiveChannel[int]) -> list[int]:
    return [x async for x in msg]


async def awaits_in_branch(self: object, msg: bool) -> None:
    if msg:
        await trio.lowlevel.checkpoint()


def not_a_coroutine_function(self: object, msg: object) -> Awaitable[None]:
    return awaits(self, msg)


def wrapped(fn: Callable[..., Awaitable[object]]) -> Callable[..., Awaitable[object]]:
    @functools.wraps(fn)
    async def wrapper(*args: object) -> object:
        return await fn(*args)

    return wrapper


@pytest.mark.parametrize(
    ("fn", "expected"),
    [
        (plain, False),
        (awaits, True),
        (async_with, True),
        (async_for, True),
        (comprehension, True),
        (awaits_in_branch, True),
        (not_a_coroutine_function, True),
        (wrapped(plain), True),
        (functools.partial(plain, None), True),
    ],
)
def test_may_suspend(fn: object, expected: bool) -> None:
    assert may_suspend(fn) is expected


def test_registry_marks_the_fast_handlers() -> None:
    from trio_cluster._registry import resolve_entity_type
    from trio_cluster.serialization import make_converter

    entity_type = resolve_entity_type(
        Quick, config=tc.ShardingConfig(), converter=make_converter()
    )
    assert not entity_type.handlers["add"].suspends
    assert not entity_type.start_suspends


def test_retry_policies_resolve_handler_then_type_then_default():
    own = tc.RetryPolicy(max_attempts=7)
    typed = tc.RetryPolicy(max_attempts=2, backoff=tc.Backoff(3.0, 3.0))

    class Policies(tc.Entity):
        type_name = "Policies"
        defect_retry = typed

        @tc.rpc(persisted=True, retry=own)
        async def mine(self, msg: Add) -> int:
            return 1

        @tc.rpc(persisted=True)
        async def theirs(self, msg: Add) -> int:
            return 1

    class Plain(tc.Entity):
        type_name = "Plain"

        @tc.rpc(persisted=True)
        async def f(self, msg: Add) -> int:
            return 1

    policies = resolve(Policies)
    assert policies.handlers["mine"].retry is own
    assert policies.handlers["theirs"].retry is typed
    assert policies.restart_backoff == tc.Backoff(3.0, 3.0)
    plain = resolve(Plain)
    assert plain.handlers["f"].retry == tc.RetryPolicy()
    assert plain.restart_backoff is None


def test_a_stand_in_gives_way_to_the_real_class():
    from trio_cluster._registry import Registry

    stand_in = type(
        "CounterStandIn", (Counter,), {"__tc_stand_in__": True, "__module__": __name__}
    )
    # The real class first: the stand-in uses its type.
    registry = Registry([Counter], config=config(), converter=make_converter())
    assert registry.for_class(stand_in) is registry.for_class(Counter)
    # The stand-in first: the real class, called later, replaces it.
    registry = Registry([], config=config(), converter=make_converter())
    first = registry.for_class(stand_in)
    assert first.cls is stand_in
    real = registry.for_class(Counter)
    assert real.cls is Counter
    assert registry.for_class(stand_in) is first  # its clients keep working
    # Two real classes of one name still clash.
    clash = type("Counter2", (Counter,), {"__module__": __name__})
    with pytest.raises(tc.EntityDefinitionError, match="unique"):
        registry.for_class(clash)
