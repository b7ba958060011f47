"""Tests of trio_cluster._core._addresses: identifiers, string forms, parsing."""

from __future__ import annotations

import pytest
from hypothesis import given, strategies as st

from trio_cluster._core._addresses import (
    MAX_ENTITY_ID_LENGTH,
    EntityAddress,
    EntityId,
    RunnerAddress,
    ShardId,
)

# --------------------------------------------------------------------------
# EntityId


def test_entity_id_string_form():
    assert str(EntityId("alice")) == "alice"
    assert EntityId("a") < EntityId("b")


def test_entity_id_may_be_as_long_as_the_limit():
    assert EntityId("x" * MAX_ENTITY_ID_LENGTH).value == "x" * 255


@pytest.mark.parametrize("value", ["", " ", " alice", "alice\n", "\u00a0alice"])
def test_entity_id_must_be_non_empty_and_trimmed(value):
    with pytest.raises(ValueError, match="non-empty without surrounding whitespace"):
        EntityId(value)


def test_entity_id_length_limit():
    with pytest.raises(ValueError, match="entity id is 256 characters, over 255"):
        EntityId("x" * 256)


@pytest.mark.parametrize("value", [42, b"alice", None])
def test_entity_id_must_be_a_str(value):
    with pytest.raises(TypeError, match="entity id must be a str"):
        EntityId(value)


# --------------------------------------------------------------------------
# ShardId


def test_shard_id_string_form_and_order():
    assert str(ShardId("default", 17)) == "default:17"
    assert ShardId("a", 2) < ShardId("a", 10) < ShardId("b", 1)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("default:17", ShardId("default", 17)),
        ("a:b:3", ShardId("a:b", 3)),  # the last colon separates, as in effect
        ("g:0", ShardId("g", 0)),
    ],
)
def test_shard_id_parse(text, expected):
    assert ShardId.parse(text) == expected


@pytest.mark.parametrize("text", ["default", ":5", "g:", "g:x", "g:-1", "g:+1", "g: 1"])
def test_shard_id_parse_refuses_malformed_text(text):
    with pytest.raises(ValueError, match="not a shard id"):
        ShardId.parse(text)


@given(
    group=st.text(min_size=1),
    number=st.integers(0, 10**6),
)
def test_shard_id_round_trip(group, number):
    shard = ShardId(group, number)
    assert ShardId.parse(str(shard)) == shard


# --------------------------------------------------------------------------
# EntityAddress


def test_entity_address_string_form():
    address = EntityAddress("Account", EntityId("alice"), ShardId("default", 3))
    assert str(address) == "Account/alice@default:3"


# --------------------------------------------------------------------------
# RunnerAddress


def test_runner_address_string_forms():
    assert str(RunnerAddress("10.0.0.5", 34431)) == "10.0.0.5:34431"
    assert str(RunnerAddress("::1", 34431)) == "[::1]:34431"
    assert str(RunnerAddress("runner-a.internal", 1)) == "runner-a.internal:1"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("10.0.0.5:34431", RunnerAddress("10.0.0.5", 34431)),
        ("[::1]:34431", RunnerAddress("::1", 34431)),
        ("[fe80::1%eth0]:0", RunnerAddress("fe80::1%eth0", 0)),
        ("localhost:65535", RunnerAddress("localhost", 65535)),
    ],
)
def test_runner_address_parse(text, expected):
    assert RunnerAddress.parse(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "localhost",
        ":80",
        "[]:80",
        "host:",
        "host:http",
        "host:65536",
        "host:-1",
        "[::1]",
    ],
)
def test_runner_address_parse_refuses_malformed_text(text):
    with pytest.raises(ValueError, match="not a runner address"):
        RunnerAddress.parse(text)


@pytest.mark.parametrize(
    ("parse", "text", "match"),
    [
        (ShardId.parse, "g:\u0663", "not a shard id"),
        (ShardId.parse, "g:\u00b2", "not a shard id"),
        (RunnerAddress.parse, "host:\u0668\u0660", "not a runner address"),
        (RunnerAddress.parse, "host:\u00b2", "not a runner address"),
    ],
)
def test_parse_refuses_non_ascii_digits(parse, text, match):
    # int() accepts any Unicode digit; an address or shard id takes ASCII only.
    with pytest.raises(ValueError, match=match):
        parse(text)


hosts = st.one_of(
    st.from_regex(r"[a-z0-9][a-z0-9.-]{0,30}", fullmatch=True),
    st.ip_addresses().map(str),
)


@given(host=hosts, port=st.integers(0, 65535))
def test_runner_address_round_trip(host, port):
    address = RunnerAddress(host, port)
    assert RunnerAddress.parse(str(address)) == address


@pytest.mark.parametrize("port", [-1, 65536, True, "80"])
def test_runner_address_refuses_bad_ports(port):
    with pytest.raises(ValueError, match="port must be an integer"):
        RunnerAddress("host", port)


def test_runner_address_parse_refuses_stray_brackets():
    with pytest.raises(ValueError, match="not a runner address"):
        RunnerAddress.parse("[::1:80")
