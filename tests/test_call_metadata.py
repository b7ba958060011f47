"""`with_metadata` and `current_metadata`: validation, nesting, and the
metadata handlers see on one runner (inline, task, discard, stream,
persisted)."""

from __future__ import annotations

from types import MappingProxyType
from typing import Any

import pytest
import trio
import trio.testing
from trio.testing import MockClock

import trio_cluster as tc
from trio_cluster._call_metadata import (
    MAX_CARRIED_SIZE,
    MAX_METADATA_ENTRIES,
    MAX_METADATA_KEY_LENGTH,
    MAX_METADATA_SIZE,
    MAX_METADATA_VALUE_LENGTH,
    current_metadata_var,
    metadata_problem,
)

from .helpers import config
from .metadata_helpers import Hop, MetaProbe, Seen, reset_probes

# ----------------------------------------------------------------------
# The context manager


def test_nothing_set_is_an_empty_read_only_mapping() -> None:
    metadata = tc.current_metadata()
    assert metadata == {}
    with pytest.raises(TypeError):
        metadata["x"] = "y"  # type: ignore[index]


def test_blocks_nest_merge_and_restore() -> None:
    with tc.with_metadata(tenant="acme", user="ann"):
        assert tc.current_metadata() == {"tenant": "acme", "user": "ann"}
        with tc.with_metadata(user="bob", request="r1"):
            assert tc.current_metadata() == {
                "tenant": "acme",
                "user": "bob",
                "request": "r1",
            }
        assert tc.current_metadata() == {"tenant": "acme", "user": "ann"}
    assert tc.current_metadata() == {}


def test_the_mapping_is_immutable_and_a_snapshot() -> None:
    with tc.with_metadata(a="1"):
        metadata = tc.current_metadata()
        assert isinstance(metadata, MappingProxyType)
        with pytest.raises(TypeError):
            metadata["a"] = "2"  # type: ignore[index]
        with tc.with_metadata(a="3"):
            pass
        assert metadata == {"a": "1"}


@pytest.mark.parametrize(
    ("values", "match"),
    [
        ({"k": 1}, "must be a str, got int"),
        ({"k": None}, "must be a str, got NoneType"),
        ({"": "v"}, "must not be empty"),
        ({"k" * (MAX_METADATA_KEY_LENGTH + 1): "v"}, "over 64"),
        ({"k": "v" * (MAX_METADATA_VALUE_LENGTH + 1)}, "over 1024"),
        ({"k": "a\x00b"}, "NUL"),
        ({"k\x00": "v"}, "NUL"),
        ({"k": "\udc80"}, "surrogate"),
        ({"traceparent": "00-x"}, "reserved"),
        ({"tracestate": "x"}, "reserved"),
    ],
)
def test_bad_entries_are_refused_when_the_block_is_entered(
    values: dict[str, Any], match: str
) -> None:
    with (
        pytest.raises(tc.InvalidMetadataError, match=match) as caught,
        tc.with_metadata(**values),
    ):
        pytest.fail("entered")
    assert isinstance(caught.value, ValueError)
    assert isinstance(caught.value, tc.ClusterError)
    assert tc.current_metadata() == {}


def test_too_many_entries_or_characters_in_all_are_refused() -> None:
    many = {f"k{i}": "v" for i in range(MAX_METADATA_ENTRIES + 1)}
    with (
        pytest.raises(tc.InvalidMetadataError, match="33 entries, over 32"),
        tc.with_metadata(**many),
    ):
        pass
    # The limit applies to the merged metadata: nested blocks add up.
    half = {f"a{i}": "v" * 300 for i in range(10)}
    other = {f"b{i}": "v" * 300 for i in range(10)}
    with tc.with_metadata(**half):
        with (
            pytest.raises(tc.InvalidMetadataError, match="over 4096"),
            tc.with_metadata(**other),
        ):
            pass
        assert tc.current_metadata() == half
    # Exactly at the limits is fine.
    exact = {f"k{i:02}": "v" * (MAX_METADATA_SIZE // 32 - 3) for i in range(32)}
    with tc.with_metadata(**exact):
        assert len(tc.current_metadata()) == 32


def test_carried_metadata_checks() -> None:
    assert metadata_problem({}) is None
    assert metadata_problem({"traceparent": "00-a-b-01", "k": "v"}) is None
    assert metadata_problem(["k", "v"]) == "expected a map, got list"
    assert metadata_problem({1: "v"}) == "keys must be str, got int"
    assert metadata_problem({"k": b"v"}) == "the value of 'k' must be a str, got bytes"
    too_big = {f"k{i}": "v" * 1000 for i in range(6)}
    problem = metadata_problem(too_big)
    assert problem is not None
    assert f"over {MAX_CARRIED_SIZE}" in problem
    assert "35 entries" in (metadata_problem({f"k{i}": "" for i in range(35)}) or "")


# ----------------------------------------------------------------------
# Handlers on one runner


@pytest.fixture(autouse=True)
def _fresh_probes() -> None:
    reset_probes()


async def test_handlers_see_their_callers_metadata_on_every_local_path(
    autojump_clock: MockClock,
) -> None:
    async with tc.open_runner(entities=[MetaProbe], config=config()) as runner:
        probe = runner.client(MetaProbe)
        with tc.with_metadata(tenant="acme"):
            # One step (cannot suspend), inline in the caller's task.
            assert (await probe("a").look_now(Hop())).hops == [{"tenant": "acme"}]
            # Inline, stepped (suspends).
            assert (await probe("a").look(Hop())).hops == [{"tenant": "acme"}]
            # Nested: a handler's calls carry its metadata onward.
            seen = await probe("a").look(Hop(["b", "c"]))
            assert seen.hops == [{"tenant": "acme"}] * 3
            # Discard: a detached task.
            await probe("a").note.discard(Hop())
            # Stream: a producer task.
            async with probe("a").look_stream(Hop()) as items:
                assert [item async for item in items] == [{"tenant": "acme"}] * 2
            # Persisted, delivered here.
            seen = await probe("a").look_persisted(Hop(["b"]))
            assert seen.hops == [{"tenant": "acme"}] * 2
            await probe("a").note_persisted.discard(Hop())
        await trio.testing.wait_all_tasks_blocked()
        assert MetaProbe.noted == [{"tenant": "acme"}] * 2
        # Nothing set: handlers see nothing.
        assert (await probe("a").look_now(Hop())).hops == [{}]
        assert (await probe("a").look(Hop(["b"]))).hops == [{}, {}]


async def test_a_block_in_a_handler_adds_to_what_it_received(
    autojump_clock: MockClock,
) -> None:
    class Adder(tc.Entity):
        type_name = "meta.Adder"

        @tc.rpc
        async def add(self, msg: Hop) -> Seen:
            with tc.with_metadata(step="2"):
                probe = tc.current_runner().client(MetaProbe)
                return await probe("x").look(Hop())

    async with tc.open_runner(entities=[MetaProbe, Adder], config=config()) as runner:
        with tc.with_metadata(step="1", tenant="acme"):
            seen = await runner.client(Adder)("a").add(Hop())
    assert seen.hops == [{"step": "2", "tenant": "acme"}]


async def test_metadata_around_open_runner_does_not_reach_handlers(
    autojump_clock: MockClock,
) -> None:
    with tc.with_metadata(process="wide"):
        async with tc.open_runner(entities=[MetaProbe], config=config()) as runner:
            probe = runner.client(MetaProbe)
            # The caller's block is carried ...
            assert (await probe("a").look_now(Hop())).hops == [{"process": "wide"}]
            with tc.with_metadata(process="narrow"):
                assert (await probe("a").look(Hop())).hops == [{"process": "narrow"}]
            # ... but a handler's own context (a copy of the context
            # open_runner was entered in) starts without it.
            token = current_metadata_var.set(None)
            try:
                assert (await probe("a").look_now(Hop())).hops == [{}]
                assert (await probe("a").look(Hop())).hops == [{}]
            finally:
                current_metadata_var.reset(token)


async def test_handler_metadata_does_not_leak_into_the_caller(
    autojump_clock: MockClock,
) -> None:
    async with tc.open_runner(entities=[MetaProbe], config=config()) as runner:
        with tc.with_metadata(a="1"):
            await runner.client(MetaProbe)("a").look_now(Hop())
        assert tc.current_metadata() == {}
