"""`ShardTable`: the assignment as the router reads it."""

from __future__ import annotations

import trio_cluster as tc
from trio_cluster._core._addresses import ShardId
from trio_cluster._engine._shard_table import ShardTable
from trio_cluster._engine._wire import _SHARD_IDS, address_of

_HERE = tc.RunnerAddress("127.0.0.1", 7000)
_THERE = tc.RunnerAddress("127.0.0.1", 7001)


def test_remote_owners_leave_out_this_runners_shards():
    table = ShardTable(_HERE)
    table.assign(
        {
            ShardId("default", 1): tc.RunnerAddress("127.0.0.1", 7000),  # equal
            ShardId("default", 2): _THERE,
            ShardId("batch", 1): _HERE,
        }
    )
    assert table.remote_owners == {ShardId("default", 2): _THERE}
    assert len(table.assignment) == 3


def test_remote_owners_are_keyed_by_the_shard_ids_clients_hold():
    table = ShardTable(_HERE)
    held = table.shard_id(ShardId("default", 2))  # what a client handle holds
    table.assign({ShardId("default", 2): _THERE})
    [key] = table.remote_owners
    assert key is held


def test_a_new_assignment_replaces_the_remote_owners():
    table = ShardTable(_HERE)
    table.assign({ShardId("default", 1): _THERE})
    table.assign({ShardId("default", 1): _HERE})
    assert table.remote_owners == {}
    assert table.assignment == {ShardId("default", 1): _HERE}


def test_the_addresses_of_envelopes_hold_the_shard_ids_tables_serve():
    # The owner looks a request's shard up in `hosts` with the address
    # `address_of` makes: with the table's very key object, the lookup
    # compares no shard ids (a Python call per request otherwise).
    table = ShardTable(_HERE)
    served = ShardId("default", 7)
    table.serve(ShardId("default", 7), host=object())  # type: ignore[arg-type]
    [key] = table.hosts
    address = address_of("Tally", "envelope-shard-7", "default", 7)
    assert address.shard is key
    assert address.shard == served


def test_envelopes_never_add_shard_ids():
    # The fields come from a peer: a shard id no table knows is not kept.
    address = address_of("Tally", "unknown-shard", "no-such-group", 3)
    assert address.shard == ShardId("no-such-group", 3)
    assert ShardId("no-such-group", 3) not in _SHARD_IDS
