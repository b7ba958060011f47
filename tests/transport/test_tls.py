"""Tests of `tls_contexts`: the files it refuses, the contexts it builds, and
`WebSocketTransport` endpoints on 127.0.0.1 using them, with certificates
of a test authority (``pki``, from `tests.tls_fixture`), mutual TLS included.

Real sockets and so real time; each test is bounded by ``fail_after``.
"""

from __future__ import annotations

import ssl
import subprocess
from typing import TYPE_CHECKING

import pytest
import trio

from trio_cluster import ConfigError, RunnerAddress
from trio_cluster.testing import RecordingHandler
from trio_cluster.transport import tls_contexts

from .test_websocket import LOCALHOST, TIMEOUT, make_transport, two_endpoints

if TYPE_CHECKING:
    from tests.tls_fixture import Pki


# ----------------------------------------------------------------------
# Files


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory: pytest.TempPathFactory, pki: Pki) -> dict[str, str]:
    folder = tmp_path_factory.mktemp("bad-tls")
    junk = folder / "junk.pem"
    junk.write_text("not a PEM file\n")
    encrypted = folder / "encrypted.key"
    subprocess.run(
        [
            "openssl", "pkey", "-in", pki.key, "-aes256",
            "-passout", "pass:secret", "-out", str(encrypted),
        ],
        check=True, capture_output=True, timeout=30,
    )  # fmt: skip
    return {
        "junk": str(junk),
        "encrypted": str(encrypted),
        "missing": str(folder / "missing.pem"),
    }


@pytest.mark.parametrize(
    ("cert", "key", "ca", "names", "says"),
    [
        ("missing", "key", "ca", "missing", "cannot be read"),
        ("cert", "missing", "ca", "missing", "cannot be read"),
        ("cert", "key", "missing", "missing", "cannot be read"),
        ("junk", "key", "ca", "junk", "holds no valid PEM certificate"),
        ("cert", "key", "junk", "junk", "holds no valid PEM certificate"),
        ("cert", "junk", "ca", "junk", "not a valid private key"),
        ("cert", "cert", "ca", "cert", "not a valid private key"),
        ("cert", "ca_key", "ca", "ca_key", "not a valid private key"),
        ("cert", "encrypted", "ca", "encrypted", "is encrypted"),
    ],
)
def test_bad_files_are_a_config_error_naming_the_file(
    pki, bad_files, cert, key, ca, names, says
):
    files = {
        **bad_files,
        "cert": pki.cert,
        "key": pki.key,
        "ca": pki.ca,
        "ca_key": pki.ca.replace("ca.pem", "ca.key"),
    }
    with pytest.raises(ConfigError) as caught:
        tls_contexts(files[cert], files[key], ca_file=files[ca], mutual=True)
    message = str(caught.value)
    assert repr(files[names]) in message
    assert says in message
    assert "\n" not in message
    assert caught.value.__cause__ is None
    assert caught.value.__suppress_context__


def test_a_directory_is_a_file_that_cannot_be_read(pki, tmp_path):
    with pytest.raises(ConfigError, match="cannot be read"):
        tls_contexts(pki.cert, pki.key, ca_file=str(tmp_path))


def test_mutual_needs_a_ca(pki):
    with pytest.raises(ConfigError, match="ca_file"):
        tls_contexts(pki.cert, pki.key, mutual=True)


@pytest.mark.parametrize("mutual", [False, True])
def test_contexts_verify_what_they_should(pki, mutual):
    server, client = tls_contexts(pki.cert, pki.key, ca_file=pki.ca, mutual=mutual)
    assert server.minimum_version == client.minimum_version == ssl.TLSVersion.TLSv1_2
    assert server.verify_mode == (ssl.CERT_REQUIRED if mutual else ssl.CERT_NONE)
    assert client.verify_mode == ssl.CERT_REQUIRED
    assert client.check_hostname
    # Client certificates are checked against the CA alone, never the
    # system's trust store.
    assert len(server.get_ca_certs()) == (1 if mutual else 0)
    assert len(client.get_ca_certs()) == 1


def test_without_a_ca_the_system_trust_store_checks_peers(pki):
    _, client = tls_contexts(pki.cert, pki.key)
    assert client.verify_mode == ssl.CERT_REQUIRED
    assert client.check_hostname


# ----------------------------------------------------------------------
# Endpoints using the contexts


async def test_round_trip_with_a_ca_signed_certificate(pki):
    server, client = tls_contexts(pki.cert, pki.key, ca_file=pki.ca)
    transport = make_transport(server_ssl_context=server, client_ssl_context=client)
    with trio.fail_after(TIMEOUT):
        async with two_endpoints(transport) as (a, ha, b, hb):
            a.send_nowait(b.address, ["over TLS"])
            await hb.wait_received(1)
            b.send_nowait(a.address, ["reply"])
            await ha.wait_received(1)
            assert hb.envelopes() == [["over TLS"]]
            assert ha.envelopes() == [["reply"]]


async def test_a_peer_whose_certificate_does_not_name_its_address_is_refused(pki):
    # The certificate names 127.0.0.1 only: dialed at 127.0.0.2, the peer
    # fails the host name check.
    server, client = tls_contexts(pki.cert, pki.key, ca_file=pki.ca)
    transport = make_transport(server_ssl_context=server, client_ssl_context=client)
    ha, hb = RecordingHandler(), RecordingHandler()
    with trio.fail_after(TIMEOUT):
        async with (
            transport.open_endpoint(LOCALHOST, ha) as a,
            transport.open_endpoint(RunnerAddress("127.0.0.2", 0), hb) as b,
        ):
            a.send_nowait(b.address, ["to the wrong name"])
            await ha.wait_lost(b.address)
            assert hb.received == []
            [(_, reason)] = ha.lost
            # The certificate error itself, at once, not a timeout.
            assert "CERTIFICATE_VERIFY_FAILED" in reason, reason


def ca_only_client(pki: Pki) -> ssl.SSLContext:
    """Checks the server against ``pki``'s CA but has no certificate."""
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client.load_verify_locations(cafile=pki.ca)
    return client


@pytest.mark.parametrize("intruder", ["no client certificate", "another CA's"])
async def test_mutual_tls_refuses_peers_without_a_trusted_certificate(
    pki, other_pki, intruder
):
    server, client = tls_contexts(pki.cert, pki.key, ca_file=pki.ca, mutual=True)
    cluster = make_transport(server_ssl_context=server, client_ssl_context=client)
    if intruder == "no client certificate":
        bad_server, _ = tls_contexts(pki.cert, pki.key, ca_file=pki.ca)
        bad_client = ca_only_client(pki)
    else:
        # Trusts the cluster's CA (so the cluster's server passes its
        # checks) but presents a certificate the cluster does not trust.
        bad_server, bad_client = tls_contexts(
            other_pki.cert, other_pki.key, ca_file=pki.ca
        )
    outsider = make_transport(
        server_ssl_context=bad_server, client_ssl_context=bad_client
    )
    hx = RecordingHandler()
    with trio.fail_after(TIMEOUT):
        async with (
            two_endpoints(cluster) as (a, ha, b, hb),
            outsider.open_endpoint(LOCALHOST, hx) as x,
        ):
            x.send_nowait(a.address, ["let me in"])
            await hx.wait_lost(a.address)
            # Members talk to each other, both ways; the outsider's envelope
            # was never delivered.
            a.send_nowait(b.address, ["member"])
            await hb.wait_received(1)
            b.send_nowait(a.address, ["member too"])
            await ha.wait_received(1)
            assert ha.envelopes() == [["member too"]]
            assert hb.envelopes() == [["member"]]
