"""Outcomes (`trio_cluster._engine._outcomes`): what a caller sees of a
handler that returned, raised a declared error, crashed or was stopped.
Pure functions: no Trio run needed."""

from __future__ import annotations

from collections.abc import AsyncIterator

import attrs
import pytest

import trio_cluster as tc
from trio_cluster._core._addresses import EntityAddress, EntityId, ShardId
from trio_cluster._core._job import StopReason
from trio_cluster._engine._outcomes import (
    NOT_RUN,
    REQUEUE,
    NotRun,
    Outcome,
    Requeue,
    crashed,
    declared,
    interrupted,
    not_served,
    returned,
    stopped,
    stream_item,
    type_name,
)
from trio_cluster._registry import Handler, resolve_entity_type
from trio_cluster.serialization import make_converter
from trio_cluster.serialization._replies import Exit

ADDRESS = EntityAddress("Shop", EntityId("s1"), ShardId("default", 7))


@attrs.frozen
class Item:
    name: str


@attrs.define(eq=False, kw_only=True)
class SoldOutError(Exception):
    item: str


class Unsendable:
    """No codec can encode this."""


class Shop(tc.Entity):
    type_name = "Shop"

    @tc.rpc(errors=[SoldOutError])
    async def buy(self, item: Item) -> Item:
        return item

    @tc.stream
    async def items(self, item: Item) -> AsyncIterator[Item]:
        yield item


def handler(name: str) -> Handler:
    entity_type = resolve_entity_type(
        Shop, config=tc.ShardingConfig(), converter=make_converter()
    )
    return entity_type.handlers[name]


class Custom(Exception):
    pass


def test_markers_are_singletons_of_their_own_types():
    assert isinstance(REQUEUE, Requeue)
    assert isinstance(NOT_RUN, NotRun)
    assert list(Requeue) == [REQUEUE]
    assert list(NotRun) == [NOT_RUN]


def test_type_name_is_bare_for_builtins_and_qualified_otherwise():
    assert type_name(KeyError("k")) == "KeyError"
    assert type_name(Custom()) == f"{__name__}.Custom"


@pytest.mark.parametrize("serialize", [True, False])
def test_returned_value(serialize):
    item = Item("pen")
    outcome = returned(handler("buy"), item, serialize)
    assert outcome == Exit(value=item)
    # Immutable and unchanged by its round trip: not copied either way.
    assert outcome.value is item


@pytest.mark.parametrize("serialize", [True, False])
def test_returned_value_that_encoding_changes(serialize):
    item = Item("caf\u00e9")  # not ASCII: copied by its codec
    outcome = returned(handler("buy"), item, serialize)
    assert outcome == Exit(value=item)
    assert (outcome.value is item) is not serialize  # a decoded copy


def test_returned_value_that_cannot_travel_is_an_error_when_serializing():
    value = Unsendable()
    assert returned(handler("buy"), value, False) == Exit(value=value)
    outcome = returned(handler("buy"), value, True)
    assert isinstance(outcome.error, tc.MalformedMessageError)


@pytest.mark.parametrize("serialize", [True, False])
def test_declared_error(serialize):
    error = SoldOutError(item="pen")
    outcome = declared(handler("buy"), error, serialize)
    assert isinstance(outcome.error, SoldOutError)
    assert outcome.error.item == "pen"
    assert (outcome.error is error) is not serialize


def test_declared_error_that_cannot_travel_is_an_error_when_serializing():
    error = SoldOutError(item=Unsendable())  # type: ignore[arg-type]
    assert declared(handler("buy"), error, False) == Exit(error=error)
    outcome = declared(handler("buy"), error, True)
    assert isinstance(outcome.error, tc.MalformedMessageError)


def test_crash_is_a_remote_error_caused_by_the_original():
    original = ValueError("bad input")
    outcome = crashed(original, address=ADDRESS, runner="r1")
    error = outcome.error
    assert isinstance(error, tc.RemoteError)
    assert (error.type_name, error.message) == ("ValueError", "bad input")
    assert (error.address, error.runner) == (str(ADDRESS), "r1")
    assert error.__cause__ is original


def test_interrupted_and_not_served():
    error = interrupted(42).error
    assert isinstance(error, tc.RequestInterruptedError)
    assert error.request_id == 42
    error = not_served(ADDRESS).error
    assert isinstance(error, tc.EntityNotAssignedError)
    assert error.address == str(ADDRESS)
    assert "before the request ran" in str(error)


def stop(
    reason: StopReason | None, *, persisted: bool, request_id: int | None = None
) -> Outcome:
    return stopped(
        reason,
        persisted=persisted,
        request_id=request_id,
        address=ADDRESS,
        runner="r1",
    )


@pytest.mark.parametrize("persisted", [True, False])
def test_stopped_by_interruption(persisted):
    outcome = stop(StopReason.INTERRUPTED, persisted=persisted, request_id=9)
    assert isinstance(outcome, Exit)
    assert isinstance(outcome.error, tc.RequestInterruptedError)
    assert outcome.error.request_id == 9


def test_stopped_by_a_crashed_sibling():
    assert stop(StopReason.SIBLING_CRASHED, persisted=True) is REQUEUE
    outcome = stop(StopReason.SIBLING_CRASHED, persisted=False)
    assert isinstance(outcome, Exit)
    assert isinstance(outcome.error, tc.RemoteError)
    assert outcome.error.type_name == "trio_cluster.EntityRestarted"


@pytest.mark.parametrize("reason", [StopReason.SHARD_STOPPED, None])
def test_stopped_with_the_shard(reason):
    assert stop(reason, persisted=True) is NOT_RUN
    outcome = stop(reason, persisted=False)
    assert isinstance(outcome, Exit)
    assert isinstance(outcome.error, tc.EntityNotAssignedError)
    assert "may have partly run" in str(outcome.error)


def test_stream_items_make_the_round_trip_when_serializing():
    item = Item("pen")
    assert stream_item(handler("items"), item, False) is item
    copy = stream_item(handler("items"), item, True)
    assert copy == item
    assert copy is not item


def test_a_crash_message_that_travels_is_cut():
    from trio_cluster._core._addresses import EntityAddress, EntityId, ShardId
    from trio_cluster._engine._outcomes import REMOTE_MESSAGE_LIMIT, crashed

    address = EntityAddress("T", EntityId("e"), ShardId("default", 1))
    exit_ = crashed(ValueError("x" * 50_000), address=address, runner="r:1")
    error = exit_.error
    assert isinstance(error, tc.RemoteError)
    assert error.message.startswith("x" * REMOTE_MESSAGE_LIMIT)
    assert error.message.endswith("(49000 more characters)")
    short = crashed(ValueError("short"), address=address, runner="r:1").error
    assert isinstance(short, tc.RemoteError)
    assert short.message == "short"
