"""`Listener` reconnects with backoff, and `coalesce` parses payloads (no server)."""

from __future__ import annotations

import pytest
import trio

from trio_cluster import PersistenceError
from trio_cluster._core._addresses import ShardId
from trio_cluster._core._retry import Backoff
from trio_cluster._storage_abc import (
    MessagesAvailable,
    RepliesAvailable,
    RequestsInterrupted,
)
from trio_cluster.storage._postgres._driver._driver import PgConnection, PgNotification
from trio_cluster.storage._postgres._events import ALL, MOVED, parse_heads
from trio_cluster.storage._postgres._notify import Listener, coalesce


async def test_failed_connections_are_retried_after_a_backoff(autojump_clock):
    attempts: list[float] = []

    async def connect() -> PgConnection:
        attempts.append(trio.current_time())
        await trio.lowlevel.checkpoint()
        raise PersistenceError("connection refused")

    listener = Listener(
        connect, "chan", backoff=Backoff(1.0, 4.0), random_unit=lambda: 0.0
    )
    for _ in range(4):
        with pytest.raises(PersistenceError, match="refused"):
            await listener.wait()
    start = attempts[0]
    assert [round(t - start, 6) for t in attempts] == [0.0, 1.0, 3.0, 7.0]
    listener.close()
    with pytest.raises(trio.ClosedResourceError):
        await listener.wait()


def test_coalesce_merges_by_kind_and_skips_foreign_payloads() -> None:
    raw = [
        PgNotification("c", '{"m": [["g", 1]], "d": 5.0}', 1),
        PgNotification("c", "not json", 1),
        PgNotification("c", '{"r": [7, 8]}', 1),
        PgNotification("c", '{"m": [["g", 2]], "d": 3.0}', 1),
        PgNotification("c", '{"i": [9], "s": [["g", 3]]}', 1),
        PgNotification("c", '{"zzz": 1}', 1),
    ]
    shards = frozenset({ShardId("g", 1), ShardId("g", 2), ShardId("g", 3)})
    assert coalesce(raw) == [
        MessagesAvailable(shards, 3.0),
        RepliesAvailable(frozenset({7, 8})),
        RequestsInterrupted(frozenset({9}), frozenset({ShardId("g", 3)})),
    ]


@pytest.mark.parametrize(
    "payload",
    [
        '{"r": [1e999]}',  # an int out of range: OverflowError
        '{"m": [["g", 1e999]]}',
        '{"i": [1], "s": [["g", -Infinity]]}',
        "[" * 7000 + "]" * 7000,  # nested too deep: RecursionError
        '{"r": [NaN]}',
    ],
)
def test_coalesce_skips_a_payload_that_fails_to_parse_in_any_way(payload: str) -> None:
    # Regression (issue 11, item 6): anything on the channel is read back
    # from storage; an error other than ValueError/TypeError/KeyError left
    # the notification loop and killed the runner.
    raw = [PgNotification("c", payload, 1), PgNotification("c", '{"r": [7]}', 1)]
    assert coalesce(raw) == [RepliesAvailable(frozenset({7}))]


def test_bus_heads_name_publications_and_cursor_sets_and_skip_the_rest() -> None:
    raw = [
        PgNotification("b", '[["t", 0, 5], ["t", 1, 2]]', 1),
        PgNotification("b", '{"m": [["t", 3]]}', 1),
        PgNotification("b", '"all"', 1),
        PgNotification("b", '[["t", 0, -4]]', 1),  # not ours: no negative end
        PgNotification("b", '{"x": []}', 1),
        PgNotification("b", '{"m": [["t"]]}', 1),
        PgNotification("b", "[[", 1),
    ]
    assert parse_heads(raw) == [("t", 0, 5), ("t", 1, 2), ("t", 3, MOVED), ALL]
