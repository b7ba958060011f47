"""Call metadata and trace context survive ``kill -9`` of the runner running
a persisted request: the runner that takes the request over runs it with the
same metadata and the same trace id (real runner processes, PostgreSQL)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import trio

import trio_cluster as tc

from ..metadata_helpers import RecordingTracer, trace_id
from .entities import Carried, Hold, Holder
from .helpers import FAST_LEASES, MultiCluster

pytestmark = [pytest.mark.postgres, pytest.mark.multiprocess, pytest.mark.slow]


def _lines(path: Path) -> list[str]:
    """The complete lines of ``path`` (none if it does not exist yet)."""
    if not path.exists():
        return []
    text = path.read_text()
    return text[: text.rfind("\n") + 1].splitlines()


async def test_a_persisted_request_keeps_its_metadata_across_kill_9(
    cluster: MultiCluster,
) -> None:
    a, b = await cluster.start("a", "b", env=FAST_LEASES)
    runs = cluster.log_dir / "hold-runs.jsonl"
    tracer = RecordingTracer()
    result: list[Carried] = []
    async with cluster.client(tracer=tracer) as client:

        async def call() -> None:
            with tc.with_metadata(tenant="acme", request="r-9"):
                result.append(await client.client(Holder)("h-1").hold(Hold(str(runs))))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(call)
            with trio.fail_after(20):
                while not _lines(runs):  # noqa: ASYNC110
                    await trio.sleep(0.01)
            first = json.loads(_lines(runs)[0])
            victim, survivor = (a, b) if first["runner"] == a.address else (b, a)
            assert first["runner"] == victim.address
            victim.kill()
            # The survivor takes the shard over (the victim's lock went with
            # its connection) and runs the stored request again.
            with trio.fail_after(30):
                while not result:  # noqa: ASYNC110
                    await trio.sleep(0.05)
        assert await victim.wait_exit() == -9
    [carried] = result
    assert carried.runner == survivor.address
    [caller] = tracer.spans
    assert caller.side == "caller"
    assert caller.call.persisted
    expected = {
        "tenant": "acme",
        "request": "r-9",
        "traceparent": f"00-{caller.trace}-{caller.span}-01",
    }
    [_, second_line] = _lines(runs)
    second = json.loads(second_line)
    assert second["runner"] == survivor.address
    assert first["metadata"] == expected
    assert second["metadata"] == expected
    assert carried.metadata == expected
    assert trace_id(carried.metadata) == caller.trace
