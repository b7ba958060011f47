"""The public API: what each public namespace exports, and how it looks."""

from __future__ import annotations

import importlib
import inspect
import pickle

import pytest

import trio_cluster as tc

PUBLIC_NAMESPACES = [
    "trio_cluster",
    "trio_cluster.abc",
    "trio_cluster.gateway",
    "trio_cluster.queues",
    "trio_cluster.storage",
    "trio_cluster.serialization",
    "trio_cluster.testing",
    "trio_cluster.transport",
    "trio_cluster.logs",
    "trio_cluster.contrib.opentelemetry",
]


@pytest.mark.parametrize("name", PUBLIC_NAMESPACES)
def test_all_is_sorted_public_and_resolvable(name):
    module = importlib.import_module(name)
    exported = module.__all__
    assert exported == sorted(exported)
    assert len(set(exported)) == len(exported)
    for symbol in exported:
        assert not symbol.startswith("_") or symbol == "__version__"
        assert getattr(module, symbol) is not None


def test_top_level_api_is_complete():
    expected = {
        "Entity",
        "rpc",
        "stream",
        "open_runner",
        "serve_runner",
        "Runner",
        "ShardingConfig",
        "Singleton",
        "Cron",
        "Snowflake",
        "RunnerStatistics",
        "EntityId",
        "ShardId",
        "EntityAddress",
        "RunnerAddress",
        "current_runner",
        "current_entity_address",
        "with_metadata",
        "current_metadata",
        "InvalidMetadataError",
        "ClusterError",
        "ConfigError",
        "MailboxFullError",
        "EntityNotAssignedError",
        "RunnerUnavailableError",
        "AlreadyProcessingError",
        "PersistenceError",
        "MalformedMessageError",
        "RemoteError",
        "RunnerClosedError",
        "serve_metrics",
        "LatencySnapshot",
    }
    assert expected <= set(tc.__all__)


def test_errors_share_one_root_and_show_the_public_path():
    errors = [
        getattr(tc, name)
        for name in tc.__all__
        if inspect.isclass(getattr(tc, name))
        and issubclass(getattr(tc, name), BaseException)
    ]
    assert len(errors) >= 15
    for error in errors:
        assert issubclass(error, tc.ClusterError), error
        assert error.__module__ == "trio_cluster", error
        assert error.__name__.endswith("Error"), error
    assert issubclass(tc.ConfigError, ValueError)
    assert issubclass(tc.RunnerClosedError, tc.ClusterError)


@pytest.mark.parametrize(
    "error",
    [
        tc.MailboxFullError(address="A/b@default:1"),
        tc.EntityNotAssignedError(address="A/b@default:1"),
        tc.RunnerUnavailableError(runner="10.0.0.1:1"),
        tc.RemoteError(
            type_name="KeyError", message="x", address="A/b@default:1", runner="r"
        ),
        tc.MalformedMessageError(what="m", problems=["bad @ $.x"]),
        tc.StaleEpochError(shard="default:1", epoch=3, current_epoch=4),
    ],
)
def test_wire_errors_pickle(error):
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is type(error)
    assert str(copy) == str(error)


NAMESPACES_WITH_METADATA = [
    "trio_cluster",
    "trio_cluster.abc",
    "trio_cluster.gateway",
    "trio_cluster.storage",
    "trio_cluster.transport",
    "trio_cluster.serialization",
    "trio_cluster.testing",
]
# Not trio_cluster.queues: its generic attrs job class resolves its string
# annotations in its defining module.


@pytest.mark.parametrize("name", NAMESPACES_WITH_METADATA)
def test_public_names_report_their_public_module(name):
    """Classes and functions show the public path (``trio_cluster.X``, not
    ``trio_cluster._runner.X``) in reprs, tracebacks and docs, like trio's
    ``fixup_module_metadata``."""
    module = importlib.import_module(name)
    wrong = [
        f"{name}.{symbol} has __module__ {value.__module__!r}"
        for symbol in module.__all__
        if (
            inspect.isclass(value := getattr(module, symbol))
            or inspect.isfunction(value)
        )
        and value.__module__ != name
    ]
    assert not wrong, "\n".join(wrong)


def test_testing_namespace_is_lazy():
    import sys

    testing = importlib.import_module("trio_cluster.testing")
    assert "StorageConformance" in testing.__all__
    # Importing the namespace does not import pytest-only machinery until used.
    assert hasattr(testing, "StorageConformance")
    assert "trio_cluster.testing._conformance._storage" in sys.modules
