"""Call metadata across runners: remote calls (the ``REQUEST`` envelope),
nested hops, streams, discards, persisted requests and their redelivery
after a crash (memory storage and network, virtual time)."""

from __future__ import annotations

import logging

import pytest
import trio
import trio.testing
from trio.testing import MockClock

import trio_cluster as tc

from ..metadata_helpers import Hop, MetaProbe, open_probe_cluster

PORTS = [7101, 7102, 7103]


async def test_metadata_survives_a_runner_hop_and_nested_hops(
    autojump_clock: MockClock,
) -> None:
    async with open_probe_cluster(PORTS) as cluster:
        a, b, c = (cluster.runners[port] for port in PORTS)
        [on_b] = cluster.ids_on(b)
        [on_c] = cluster.ids_on(c)
        [on_a] = cluster.ids_on(a)
        probe = a.client(MetaProbe)
        with tc.with_metadata(tenant="acme", user="ann"):
            # A (caller) -> B, fast path and task path on the owner.
            seen = await probe(on_b).look_now(Hop())
            assert seen.hops == [{"tenant": "acme", "user": "ann"}]
            assert seen.runners == [str(b.address)]
            seen = await probe(on_b).look(Hop())
            assert seen.hops == [{"tenant": "acme", "user": "ann"}]
            # A -> B -> C -> A: every hop sees the caller's metadata.
            seen = await probe(on_b).look(Hop([on_c, on_a]))
        assert seen.runners == [str(b.address), str(c.address), str(a.address)]
        assert seen.hops == [{"tenant": "acme", "user": "ann"}] * 3
        # No metadata: nothing arrives (and nothing is sent).
        seen = await probe(on_b).look(Hop([on_c]))
        assert seen.hops == [{}, {}]


async def test_metadata_reaches_remote_streams_and_discards(
    autojump_clock: MockClock,
) -> None:
    async with open_probe_cluster(PORTS[:2]) as cluster:
        a, b = (cluster.runners[port] for port in PORTS[:2])
        [on_b] = cluster.ids_on(b)
        probe = a.client(MetaProbe)
        with tc.with_metadata(tenant="acme"):
            async with probe(on_b).look_stream(Hop()) as items:
                assert [item async for item in items] == [{"tenant": "acme"}] * 2
            await probe(on_b).note.discard(Hop())
            await probe(on_b).note_persisted.discard(Hop())
        with trio.fail_after(5):
            while len(MetaProbe.noted) < 2:  # noqa: ASYNC110
                await trio.sleep(0.01)
        assert MetaProbe.noted == [{"tenant": "acme"}] * 2


async def test_persisted_calls_carry_metadata_through_storage(
    autojump_clock: MockClock,
) -> None:
    async with open_probe_cluster(PORTS[:2]) as cluster:
        a, b = (cluster.runners[port] for port in PORTS[:2])
        [on_a] = cluster.ids_on(a)
        [on_b] = cluster.ids_on(b)
        probe = a.client(MetaProbe)
        with tc.with_metadata(tenant="acme"):
            # Stored by A, claimed and run by B, which calls A's probe
            # (persisted too) from its handler.
            seen = await probe(on_b).look_persisted(Hop([on_a]))
        assert seen.runners == [str(b.address), str(a.address)]
        assert seen.hops == [{"tenant": "acme"}] * 2


async def test_a_redelivered_request_runs_with_its_metadata_after_a_crash(
    autojump_clock: MockClock,
) -> None:
    async with open_probe_cluster(PORTS[:2]) as cluster:
        a, b = (cluster.runners[port] for port in PORTS[:2])
        [on_b] = cluster.ids_on(b)
        result: list[object] = []

        async def call() -> None:
            with tc.with_metadata(tenant="acme", request="r-1"):
                result.append(await a.client(MetaProbe)(on_b).hold(Hop()))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(call)
            with trio.fail_after(5):
                while not MetaProbe.held:  # noqa: ASYNC110
                    await trio.sleep(0.01)
            # B crashes with the handler in flight; A takes the shard over
            # when B's lease lapses and runs the stored request again.
            b.abort()
            del cluster.runners[PORTS[1]]
            cluster.storage.kill_session(str(b.address))
            cluster.network.kill(b.address)
            with trio.fail_after(60):
                while not result:  # noqa: ASYNC110
                    await trio.sleep(0.1)
        [seen] = result
        assert seen.runners == [str(a.address)]  # type: ignore[attr-defined]
        assert MetaProbe.held == [{"tenant": "acme", "request": "r-1"}] * 2
        assert seen.hops == [{"tenant": "acme", "request": "r-1"}]  # type: ignore[attr-defined]


async def test_bad_metadata_from_a_peer_is_dropped_and_the_connection_stays(
    autojump_clock: MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    async with open_probe_cluster(PORTS[:2]) as cluster:
        a, b = (cluster.runners[port] for port in PORTS[:2])
        [on_b] = cluster.ids_on(b)
        endpoint = a._parts.endpoint
        assert endpoint is not None
        address = b.client(MetaProbe).address_of(on_b)
        bad = [
            1,  # REQUEST
            999_999,
            0,
            address.entity_type,
            address.entity_id.value,
            address.shard.group,
            address.shard.number,
            "look_now",
            b"",
            None,
            {"k": 1},
        ]
        with caplog.at_level(logging.WARNING, "trio_cluster"):
            endpoint.send_nowait(b.address, bad)
            await trio.testing.wait_all_tasks_blocked()
        [line] = [
            r.getMessage() for r in caplog.records if "malformed" in r.getMessage()
        ]
        assert "field 10 (metadata): the value of 'k' must be a str" in line
        # The connection is still up: the next call goes through.
        with tc.with_metadata(k="v"):
            seen = await a.client(MetaProbe)(on_b).look_now(Hop())
        assert seen.hops == [{"k": "v"}]
