"""The endpoint handler (`trio_cluster._engine._dispatch`): what a peer sends
is dispatched, and a flood of bad envelopes is counted in full but logged in
a few bounded lines (issue 12, item 8)."""

from __future__ import annotations

import contextvars
import logging
from contextlib import AsyncExitStack

import msgpack
import pytest
import trio

import trio_cluster as tc
from trio_cluster._engine._dispatch import ClusterHandler
from trio_cluster._engine._wire import Mode
from trio_cluster.transport._memory import MemoryEndpoint

from ..helpers import Add
from ..memory_cluster import Tally, open_cluster
from .test_inbound import raw_request
from .test_remote_streams import open_raw_caller

FLOOD = 10_000
REQUESTS = 30
HOSTILE = "<" + "x" * 300_000 + ">"


def cluster_handler(runner: tc.Runner) -> ClusterHandler:
    endpoint = runner._parts.endpoint
    assert isinstance(endpoint, MemoryEndpoint)
    handler = endpoint.handler._target  # type: ignore[attr-defined]
    assert isinstance(handler, ClusterHandler)
    return handler


def logged(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [record.getMessage() for record in caplog.records]


async def test_a_flood_of_malformed_envelopes_is_counted_but_logged_briefly(
    autojump_clock, caplog
):
    # Regression (issue 12, item 8): one frame of unknown envelopes wrote a
    # warning per envelope, each copying what the peer sent.
    async with AsyncExitStack() as stack:
        cluster = await open_cluster(stack, [1])
        owner = cluster.runners[1]
        handler = cluster_handler(owner)
        raw, answers = await open_raw_caller(stack, cluster)
        hostile = msgpack.packb({"amount": HOSTILE})
        with caplog.at_level(logging.DEBUG, "trio_cluster"):
            # An oversized hostile string field, then unknown envelopes.
            oversized = raw_request(owner, 0, Mode.CALL, "add", hostile)
            oversized[3] = HOSTILE  # the entity type
            raw.send_nowait(owner.address, oversized)
            for number in range(1, FLOOD):
                raw.send_nowait(owner.address, [99, number])
                if number % 1000 == 999:
                    await trio.sleep(0.01)  # the send queue drains
            for call_id in range(1, REQUESTS + 1):
                # A hostile string in a request's message: refused, and the
                # refusal names the value.
                raw.send_nowait(
                    owner.address,
                    raw_request(owner, call_id, Mode.CALL, "add", hostile),
                )
                await trio.sleep(0.01)
            await trio.sleep(1)
            assert handler.malformed == FLOOD
            assert len(answers.envelopes()) == REQUESTS  # every one answered
            lines = logged(caplog)
            assert sum("dropped a malformed envelope" in line for line in lines) <= 10
            assert sum("refused a request" in line for line in lines) <= 10
            assert len(lines) <= 25, lines[:30]
            assert sum(map(len, lines)) < 10_000
            assert not any(HOSTILE[:1000] in line for line in lines)
            # After the interval, the next one writes the summary line.
            caplog.clear()
            await trio.sleep(15)
            raw.send_nowait(owner.address, [99, FLOOD])
            raw.send_nowait(
                owner.address,
                raw_request(owner, REQUESTS + 1, Mode.CALL, "add", hostile),
            )
            await trio.sleep(1)
        assert handler.malformed == FLOOD + 1
        summaries = [line for line in logged(caplog) if "more" in line]
        assert any(
            f"and {FLOOD - 10} more malformed envelopes from 127.0.0.1:99" in line
            for line in summaries
        ), summaries
        assert any(
            f"and {REQUESTS - 10} more refused requests from 127.0.0.1:99" in line
            for line in summaries
        ), summaries
        assert len(logged(caplog)) == 2
        # The runner serves on.
        assert (await owner.client(Tally)("m").add(Add(2))).total == 2


async def test_the_summary_is_written_when_the_peer_is_lost(autojump_clock, caplog):
    async with AsyncExitStack() as stack:
        cluster = await open_cluster(stack, [1])
        owner = cluster.runners[1]
        async with AsyncExitStack() as peer:
            raw, _ = await open_raw_caller(peer, cluster)
            with caplog.at_level(logging.WARNING, "trio_cluster"):
                for number in range(100):
                    raw.send_nowait(owner.address, [99, number])
                await trio.sleep(1)
        await trio.sleep(1)
        assert cluster_handler(owner).malformed == 100
        lines = logged(caplog)
        assert sum("dropped a malformed envelope" in line for line in lines) == 10
        assert any(
            "and 90 more malformed envelopes from 127.0.0.1:99" in line
            for line in lines
        ), lines


class _Replies:
    """Stands in for the caller side: records the replies dispatched."""

    def __init__(self) -> None:
        self.replies: list[tuple[object, ...]] = []

    def reply(self, peer: object, call_id: object, payload: object) -> None:
        self.replies.append((peer, call_id, payload))


_REPLY_SHAPED = [
    # Three fields, as a reply has, each refused by `parse`.
    *[[2, call_id, b"reply"] for call_id in (-1, 2**64, True, 1.0, None, "7")],
    *[[2, 7, payload] for payload in ("reply", None, 7, [b"x"], bytearray(b"x"))],
    *[[kind, 7, b"reply"] for kind in (True, 2.0, "2", 99)],
]


async def test_a_well_formed_reply_is_dispatched_without_parse(
    autojump_clock, monkeypatch
):
    # The answer to every remote call is checked in `_dispatch` itself, as
    # `_wire._plain` checks it (no `parse` call, no copy of its fields).
    async with AsyncExitStack() as stack:
        cluster = await open_cluster(stack, [1])
        owner = cluster.runners[1]
        handler = cluster_handler(owner)
        replies = _Replies()
        monkeypatch.setattr(handler, "outbound", replies)

        def no_parse(envelope: object) -> None:
            raise AssertionError(f"parse called for {envelope!r}")

        monkeypatch.setattr("trio_cluster._engine._dispatch.parse", no_parse)
        handler.envelope_received(owner.address, [2, 7, b"reply"])
        handler.envelope_received(owner.address, [2, 2**64 - 1, b""])
        assert replies.replies == [
            (owner.address, 7, b"reply"),
            (owner.address, 2**64 - 1, b""),
        ]


@pytest.mark.parametrize("envelope", _REPLY_SHAPED)
async def test_a_malformed_reply_is_refused_as_parse_refuses_it(
    autojump_clock, monkeypatch, envelope
):
    async with AsyncExitStack() as stack:
        cluster = await open_cluster(stack, [1])
        owner = cluster.runners[1]
        handler = cluster_handler(owner)
        replies = _Replies()
        monkeypatch.setattr(handler, "outbound", replies)
        handler.envelope_received(owner.address, envelope)
        assert replies.replies == []
        assert handler.malformed == 1


async def test_a_slice_of_envelopes_is_dispatched_in_the_runners_context(
    autojump_clock, monkeypatch
):
    from trio_cluster._context import current_runner_var

    async with AsyncExitStack() as stack:
        cluster = await open_cluster(stack, [1])
        owner = cluster.runners[1]
        handler = cluster_handler(owner)
        seen: list[object] = []

        class Outbound(_Replies):
            def reply(self, peer: object, call_id: object, payload: object) -> None:
                seen.append(current_runner_var.get(None))
                super().reply(peer, call_id, payload)

        replies = Outbound()
        monkeypatch.setattr(handler, "outbound", replies)
        transport_task = contextvars.Context()  # no runner in it
        transport_task.run(
            handler.envelopes_received,
            owner.address,
            [[2, 1, b"a"], [99, 1], [2, 2, b"b"]],
        )
        assert transport_task.run(current_runner_var.get, None) is None  # restored
        assert [call_id for _, call_id, _ in replies.replies] == [1, 2]
        assert handler.malformed == 1  # the bad one alone
        assert len(seen) == 2
        assert all(context is handler._context for context in seen)
