"""Runner processes that authenticate each other: on mutual TLS
(``trio-cluster run --tls-mutual`` with the certificate, key and CA from
``TRIO_CLUSTER_TLS_*`` variables) and with a cluster secret
(``TRIO_CLUSTER_SECRET``): a call from an entity on one runner to an entity
on the other, and no call from a runner without a certificate or with
another secret."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest
import trio

from trio_cluster import RunnerUnavailableError
from trio_cluster.transport import WebSocketTransport, tls_contexts

from ..transport.test_tls import ca_only_client
from .entities import Ping, Probe, Relay
from .loads import entity_ids, wait_owned_by

if TYPE_CHECKING:
    from tests.tls_fixture import Pki

    from .helpers import MultiCluster

pytestmark = [pytest.mark.postgres, pytest.mark.multiprocess, pytest.mark.slow]


async def test_runners_on_mutual_tls_call_each_other(
    cluster: MultiCluster, pki: Pki
) -> None:
    env = {
        "TRIO_CLUSTER_TLS_CERT": pki.cert,
        "TRIO_CLUSTER_TLS_KEY": pki.key,
        "TRIO_CLUSTER_TLS_CA": pki.ca,
    }
    a, b = await cluster.start("a", "b", env=env, args=["--tls-mutual"])
    server, client = tls_contexts(pki.cert, pki.key, ca_file=pki.ca, mutual=True)
    transport = WebSocketTransport(server_ssl_context=server, client_ssl_context=client)
    with trio.fail_after(30):
        async with cluster.client(transport) as runner:
            owners = await wait_owned_by(runner, entity_ids(20), [a.address, b.address])
            on_a = next(e for e, s in owners.items() if s.runner == a.address)
            on_b = next(e for e, s in owners.items() if s.runner == b.address)
            probe = runner.client(Probe)
            # The relay runs on one runner and calls the probe on the other.
            assert (await probe(on_a).relay(Relay(on_b))).runner == b.address
            assert (await probe(on_b).relay(Relay(on_a))).runner == a.address

        # A runner that checks their certificates but has none of its own
        # does not get through.
        outsider = WebSocketTransport(
            server_ssl_context=server, client_ssl_context=ca_only_client(pki)
        )
        async with cluster.client(outsider) as runner:
            with trio.move_on_after(3) as waited:
                await runner.client(Probe)(on_a).where(Ping())
            assert waited.cancelled_caught


async def test_runners_with_a_cluster_secret_call_each_other(
    cluster: MultiCluster,
) -> None:
    secret = "a-cluster-secret-for-the-processes"
    a, b = await cluster.start("a", "b", env={"TRIO_CLUSTER_SECRET": secret})
    with trio.fail_after(30):
        async with cluster.client(
            WebSocketTransport(cluster_secrets=[secret])
        ) as runner:
            owners = await wait_owned_by(runner, entity_ids(20), [a.address, b.address])
            on_a = next(e for e, s in owners.items() if s.runner == a.address)
            on_b = next(e for e, s in owners.items() if s.runner == b.address)
            probe = runner.client(Probe)
            assert (await probe(on_a).relay(Relay(on_b))).runner == b.address

        # A runner with another secret does not get through, and is told why.
        other = WebSocketTransport(cluster_secrets=["another-secret-not-theirs"])
        async with cluster.client(other) as runner:
            with pytest.raises(RunnerUnavailableError, match="cluster secret"):
                await runner.client(Probe)(on_a).where(Ping())
