"""Tests of trio_cluster._core._config: validation and the environment loader."""

from __future__ import annotations

import math

import attrs
import pytest

from trio_cluster import ConfigError
from trio_cluster._core._addresses import RunnerAddress
from trio_cluster._core._config import ENV_PREFIX, ShardingConfig


def test_defaults_are_valid():
    config = ShardingConfig()
    assert config.shards_per_group == 300
    assert config.shard_groups == ("default",)
    assert config.runner_address == RunnerAddress("127.0.0.1", 34431)
    assert config.lease_refresh_interval * 3 <= config.lease_duration
    assert config.max_resident_entities == 500_000


def test_config_is_frozen_and_keyword_only():
    config = ShardingConfig()
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        config.shards_per_group = 5  # type: ignore[misc]
    with pytest.raises(TypeError):
        ShardingConfig(300)  # type: ignore[call-arg]


def test_valid_values_are_kept():
    config = ShardingConfig(
        shards_per_group=65_536,
        shard_groups=["default", "batch.v2", "gpu_A-1"],
        runner_address=RunnerAddress("::1", 1),
        runner_weight=1000,
        lease_duration=3,
        lease_refresh_interval=1,
        max_resident_entities=None,
        serialize_local_calls=False,
        entity_restart_backoff=10.0,
        entity_restart_backoff_max=10.0,
    )
    # A list of groups becomes a tuple.
    assert config.shard_groups == ("default", "batch.v2", "gpu_A-1")
    assert config.max_resident_entities is None
    assert config.lease_duration == 3


# --------------------------------------------------------------------------
# Field validation


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("lease_duration", 0, "lease_duration must be a positive, finite number"),
        ("lease_duration", -1.0, "lease_duration must be a positive, finite number"),
        ("lease_duration", math.nan, "lease_duration must be a positive, finite"),
        ("lease_duration", math.inf, "lease_duration must be a positive, finite"),
        ("lease_duration", "5", "lease_duration must be a number, got '5'"),
        ("entity_max_idle", True, "entity_max_idle must be a number, got True"),
        (
            "entity_mailbox_capacity",
            0,
            "entity_mailbox_capacity must be an integer >= 1",
        ),
        ("entity_mailbox_capacity", 1.5, "must be an integer >= 1, got 1.5"),
        ("persisted_batch_size", True, "persisted_batch_size must be an integer >= 1"),
        ("max_resident_entities", 0, "max_resident_entities must be an integer >= 1"),
        ("shards_per_group", 0, "shards_per_group must be an integer >= 1"),
        ("shards_per_group", 65_537, "shards_per_group is 65537; use at most 65536"),
        ("shard_groups", "default", "shard_groups must be a tuple"),
        ("shard_groups", (1,), "shard group names are 1-64 characters"),
        ("shard_groups", ("a b",), "shard group names are 1-64 characters"),
        ("shard_groups", ("",), "shard group names are 1-64 characters"),
        ("shard_groups", ("x" * 65,), "shard group names are 1-64 characters"),
        ("shard_groups", ("a", "b", "a"), "shard_groups lists a group twice"),
        ("runner_address", "127.0.0.1:1", "runner_address must be a RunnerAddress"),
        ("runner_weight", 0, "runner_weight must be a positive, finite number"),
        (
            "runner_weight",
            1000.5,
            r"runner_weight is 1000.5; use a weight in \(0, 1000\]",
        ),
    ],
)
def test_invalid_fields_are_config_errors(field, value, message):
    with pytest.raises(ConfigError, match=message):
        ShardingConfig(**{field: value})


def test_a_non_bool_serialize_local_calls_is_a_config_error():
    with pytest.raises(ConfigError, match="serialize_local_calls"):
        ShardingConfig(serialize_local_calls=1)  # type: ignore[arg-type]


def test_config_error_is_a_value_error():
    with pytest.raises(ValueError, match="shards_per_group"):
        ShardingConfig(shards_per_group=-1)


def test_refresh_interval_must_be_at_most_a_third_of_the_lease():
    ShardingConfig(lease_duration=3.0, lease_refresh_interval=1.0)
    with pytest.raises(
        ConfigError, match=r"must be\s+at most a third of lease_duration"
    ):
        ShardingConfig(lease_duration=3.0, lease_refresh_interval=1.01)


def test_an_interval_of_exactly_a_third_is_accepted():
    config = ShardingConfig(lease_duration=0.3, lease_refresh_interval=0.1)
    assert config.lease_refresh_interval == 0.1


def test_restart_backoff_must_not_exceed_its_maximum():
    with pytest.raises(ConfigError, match="entity_restart_backoff must not exceed"):
        ShardingConfig(entity_restart_backoff=2.0, entity_restart_backoff_max=1.0)


# --------------------------------------------------------------------------
# from_env


def test_from_env_reads_every_kind_of_field():
    environ = {
        "TRIO_CLUSTER_SHARDS_PER_GROUP": " 600 ",
        "TRIO_CLUSTER_SHARD_GROUPS": "default, batch,,gpu ",
        "TRIO_CLUSTER_RUNNER_ADDRESS": "[::1]:7001",
        "TRIO_CLUSTER_RUNNER_WEIGHT": "2.5",
        "TRIO_CLUSTER_SERIALIZE_LOCAL_CALLS": "off",
        "TRIO_CLUSTER_MAX_RESIDENT_ENTITIES": "1000",
        "PATH": "/usr/bin",  # not ours: ignored
    }
    config = ShardingConfig.from_env(environ)
    assert config.shards_per_group == 600
    assert config.shard_groups == ("default", "batch", "gpu")
    assert config.runner_address == RunnerAddress("::1", 7001)
    assert config.runner_weight == 2.5
    assert config.serialize_local_calls is False
    assert config.max_resident_entities == 1000


@pytest.mark.parametrize("raw", ["none", "None", "", "  "])
def test_from_env_clears_optional_fields(raw):
    config = ShardingConfig.from_env({"TRIO_CLUSTER_MAX_RESIDENT_ENTITIES": raw})
    assert config.max_resident_entities is None


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("1", True),
        ("TRUE", True),
        ("yes", True),
        ("On", True),
        ("0", False),
        ("false", False),
        ("no", False),
        ("off", False),
    ],
)
def test_from_env_booleans(raw, expected):
    config = ShardingConfig.from_env({"TRIO_CLUSTER_SERIALIZE_LOCAL_CALLS": raw})
    assert config.serialize_local_calls is expected


def test_every_field_can_be_set_from_the_environment():
    # Guards the type-name table in _config: a new field whose type has no
    # parser would otherwise fail with a KeyError only when set by env.
    defaults = ShardingConfig()
    for field in attrs.fields(ShardingConfig):
        value = getattr(defaults, field.name)
        if isinstance(value, tuple):
            raw = ",".join(value)
        elif isinstance(value, bool):
            raw = "yes" if value else "no"
        else:
            raw = str(value)
        key = ENV_PREFIX + field.name.upper()
        config = ShardingConfig.from_env({key: raw})
        assert getattr(config, field.name) == value, field.name


def test_from_env_overrides_win():
    config = ShardingConfig.from_env(
        {"TRIO_CLUSTER_SHARDS_PER_GROUP": "600"}, shards_per_group=50
    )
    assert config.shards_per_group == 50


def test_from_env_ignores_known_application_variables():
    environ = {
        "TRIO_CLUSTER_DSN": "postgresql://x",
        "TRIO_CLUSTER_TEST_DSN": "postgresql://y",
        "TRIO_CLUSTER_LOG_LEVEL": "debug",
        "TRIO_CLUSTER_MY_FLAG": "1",
    }
    config = ShardingConfig.from_env(environ, ignore=frozenset({"MY_FLAG"}))
    assert config == ShardingConfig()


def test_from_env_ignore_accepts_full_variable_names():
    environ = {"TRIO_CLUSTER_MY_FLAG": "1"}
    config = ShardingConfig.from_env(
        environ, ignore=frozenset({"TRIO_CLUSTER_MY_FLAG"})
    )
    assert config == ShardingConfig()


def test_from_env_refuses_unknown_variables():
    with pytest.raises(
        ConfigError, match="unknown variable TRIO_CLUSTER_SHARDS_PER_GRUOP"
    ):
        ShardingConfig.from_env({"TRIO_CLUSTER_SHARDS_PER_GRUOP": "5"})
    with pytest.raises(
        ConfigError, match=r"known ones are .*TRIO_CLUSTER_LEASE_DURATION"
    ):
        ShardingConfig.from_env({"TRIO_CLUSTER_": "5"})


@pytest.mark.parametrize(
    ("key", "raw", "message"),
    [
        (
            "SHARDS_PER_GROUP",
            "1.5",
            "TRIO_CLUSTER_SHARDS_PER_GROUP='1.5' does not parse as int",
        ),
        ("LEASE_DURATION", "soon", "does not parse as float"),
        ("SERIALIZE_LOCAL_CALLS", "maybe", "does not parse as bool: expected one of"),
        ("RUNNER_ADDRESS", "localhost", "does not parse as RunnerAddress"),
        ("MAX_RESIDENT_ENTITIES", "many", r"does not parse as int: "),
    ],
)
def test_from_env_parse_errors(key, raw, message):
    with pytest.raises(ConfigError, match=message) as info:
        ShardingConfig.from_env({ENV_PREFIX + key: raw})
    assert info.value.__cause__ is None


def test_from_env_values_are_validated_too():
    with pytest.raises(ConfigError, match="lease_duration must be a positive"):
        ShardingConfig.from_env({"TRIO_CLUSTER_LEASE_DURATION": "-1"})
    with pytest.raises(ConfigError, match="shard group names are 1-64"):
        ShardingConfig.from_env({"TRIO_CLUSTER_SHARD_GROUPS": "a,b c"})


def test_no_shard_groups_is_a_client_only_runner():
    assert ShardingConfig(shard_groups=()).shard_groups == ()
    assert ShardingConfig.from_env({"TRIO_CLUSTER_SHARD_GROUPS": ""}).shard_groups == ()


@pytest.mark.parametrize("host", ["0.0.0.0", "::", ""])
def test_a_listen_anywhere_address_is_not_a_runner_address(host):
    with pytest.raises(ConfigError, match="not an address other runners can dial"):
        ShardingConfig(runner_address=RunnerAddress(host, 34431))
