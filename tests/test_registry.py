"""Entity definitions are validated eagerly with errors that say what to do."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

import attrs
import pytest

import trio_cluster as tc
from trio_cluster._registry import EntityType, resolve_entity_type
from trio_cluster.serialization import make_converter

from .helpers import Add, Counter

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


def test_persisted_only_options():
    with pytest.raises(tc.EntityDefinitionError, match="persisted=True"):
        tc.rpc(primary_key=lambda m: "k")
    with pytest.raises(tc.EntityDefinitionError, match="persisted=True"):
        tc.rpc(deliver_at=lambda m: 0.0)
    with pytest.raises(tc.EntityDefinitionError, match="primary_key must be"):
        tc.rpc(persisted=True, primary_key="tx_id")  # type: ignore[call-overload]


def test_declared_errors_must_be_attrs_exceptions():
    class Plain(Exception):
        pass

    with pytest.raises(tc.EntityDefinitionError, match="must be an attrs class"):
        tc.rpc(errors=[Plain])
    with pytest.raises(tc.EntityDefinitionError, match="Exception classes"):
        tc.rpc(errors=[int])  # type: ignore[list-item]


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


def test_wire_name_must_be_sane():
    with pytest.raises(tc.EntityDefinitionError, match="wire name"):

        class BadName(tc.Entity):
            type_name = "BadName"

            @tc.rpc(name="has space")
            async def f(self, msg: Add) -> int:
                return 1


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


def test_subclass_overrides_handlers():
    class Base(tc.Entity):
        type_name = "Base"

        @tc.rpc
        async def f(self, msg: Add) -> int:
            return 1

        @tc.rpc
        async def g(self, msg: Add) -> int:
            return 2

    class Child(Base):
        type_name = "Child"

        @tc.rpc(name="f2")
        async def f(self, msg: Add) -> int:
            return 3

        g = None  # type: ignore[assignment]

    assert set(Child.__tc_handlers__) == {"f2"}
    assert set(Base.__tc_handlers__) == {"f", "g"}


async def test_open_runner_validates_before_starting():
    class NoName(tc.Entity):
        @tc.rpc
        async def f(self, msg: Add) -> int:
            return 1

    with pytest.raises(tc.EntityDefinitionError):
        async with tc.open_runner(entities=[NoName]):
            pytest.fail("must not start")


async def test_duplicate_singleton_names_are_refused():
    async def run() -> None:
        pass

    with pytest.raises(tc.EntityDefinitionError, match="unique"):
        async with tc.open_runner(
            singletons=[tc.Singleton("s", run), tc.Singleton("s", run)]
        ):
            pytest.fail("must not start")
    with pytest.raises(tc.EntityDefinitionError, match="singleton name"):
        tc.Singleton("", run)
