"""``trio-cluster run --gateway``: a runner process serves the target's
gateway, its series join ``/metrics``, and SIGTERM closes its sockets with
1001 (going away) before the runner stops."""

from __future__ import annotations

import pytest
import trio
from trio_websocket import ConnectionClosed

from trio_cluster.gateway import open_gateway_client

from ..gateway.app import open_raw, read_until_closed
from ..helpers import load_example
from .helpers import MultiCluster, http_get

pytestmark = [pytest.mark.postgres, pytest.mark.multiprocess, pytest.mark.slow]


async def test_run_serves_the_gateway_of_its_target(cluster: MultiCluster) -> None:
    example = load_example("gateway_counter")
    Add, Counter, TooMuchError = example.Add, example.Counter, example.TooMuchError

    runner = await cluster.spawn(
        "g",
        metrics=True,
        target="examples.gateway_counter:APP",
        args=["--gateway", "127.0.0.1:0"],
    )
    await runner.wait_ready()
    ready = runner.event("ready")
    assert ready is not None
    port = ready["gateway_port"]
    assert isinstance(port, int)
    url = f"ws://127.0.0.1:{port}/ws"
    with trio.fail_after(60):
        async with open_gateway_client(url) as client:
            counter = client.entities(Counter)("process")
            assert await counter.add(Add(4)) == 4
            with pytest.raises(TooMuchError):
                await counter.add(Add(500))
            assert runner.metrics_port is not None
            code, body = await http_get(runner.metrics_port, "/metrics")
            assert code == 200
            assert (
                f'trio_cluster_gateway_connections{{runner="{runner.address}"}} 1'
                in body
            )
            assert "trio_cluster_gateway_requests_total" in body
            code, page = await http_get(port, "/")
            assert code == 200
            assert "GatewayClient" in page
            async with open_raw(url) as ws:
                runner.terminate()
                with pytest.raises(ConnectionClosed) as caught:
                    await read_until_closed(ws)
                assert caught.value.reason is not None
                assert caught.value.reason.code == 1001
            await runner.wait_stopped()
