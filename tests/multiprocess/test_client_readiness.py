"""A client-only ``trio-cluster run`` process (``TRIO_CLUSTER_SHARD_GROUPS=``,
no shard to serve) prints its ready line and answers ``/readyz`` with 200."""

from __future__ import annotations

import re

import pytest

from .helpers import MultiCluster, http_get

pytestmark = [pytest.mark.postgres, pytest.mark.multiprocess, pytest.mark.slow]


async def test_a_client_only_runner_process_is_ready(cluster: MultiCluster) -> None:
    (host,) = await cluster.start("host")
    client = await cluster.spawn(
        "client", metrics=True, env={"TRIO_CLUSTER_SHARD_GROUPS": ""}
    )
    await client.wait_ready()
    assert client.metrics_port is not None
    assert await http_get(client.metrics_port, "/readyz") == (200, "ready\n")
    code, body = await http_get(client.metrics_port, "/metrics")
    assert code == 200
    runner = re.escape(client.address)
    assert re.search(
        rf'^trio_cluster_shards_assigned{{runner="{runner}"}} 0$', body, re.MULTILINE
    )
    client.terminate()
    await client.wait_stopped()
    host.terminate()
    await host.wait_stopped()
