"""Cluster authentication on the WebSocket runner port: the challenge-response
of the handshake, secret rotation, impostors on either side, and the refusal
to listen beyond loopback without authentication."""

from __future__ import annotations

import ssl
from typing import Any

import msgpack
import pytest
import trio
import trio_websocket

from trio_cluster import ConfigError, RunnerAddress
from trio_cluster.testing import RecordingHandler
from trio_cluster.transport import WebSocketTransport
from trio_cluster.transport._framing import decode_hello, encode_hello
from trio_cluster.transport._ws_connection import CloseCode

from .test_websocket import (
    LOCALHOST,
    TIMEOUT,
    TestWebSocketConformance,
    closed_with,
    dialing,
    make_transport,
    still_works,
    two_endpoints,
)
from .wire_peers import (
    OTHER_SECRET,
    SECRET,
    NotAccepted,
    handshake,
    raw_peer,
    raw_websocket,
)


def secured(*secrets: bytes, **options: Any) -> WebSocketTransport:
    return make_transport(cluster_secrets=list(secrets or [SECRET]), **options)


class TestAuthenticatedConformance(TestWebSocketConformance):
    """The whole transport contract holds with authentication on."""

    @pytest.fixture
    def transport(self) -> WebSocketTransport:
        return secured(
            max_message_size=self.MAX_MESSAGE_SIZE,
            max_queued_envelopes=self.MAX_QUEUED_ENVELOPES,
            max_queued_bytes=self.MAX_QUEUED_BYTES,
        )


async def test_members_with_the_secret_talk_both_ways():
    with trio.fail_after(TIMEOUT):
        async with two_endpoints(secured()) as (a, ha, b, hb):
            a.send_nowait(b.address, ["to b"])
            await hb.wait_received(1)
            b.send_nowait(a.address, ["to a"])
            await ha.wait_received(1)
            assert hb.envelopes() == [["to b"]]
            assert ha.envelopes() == [["to a"]]
            for endpoint in (a, b):
                assert endpoint.statistics().unauthenticated_peers == 0


async def test_a_rotation_keeps_old_and_new_members_talking():
    old, new = SECRET, OTHER_SECRET
    ha, hb, hc = RecordingHandler(), RecordingHandler(), RecordingHandler()
    with trio.fail_after(TIMEOUT):
        async with (
            secured(old).open_endpoint(LOCALHOST, ha) as a,
            secured(new, old).open_endpoint(LOCALHOST, hb) as b,
            secured(new).open_endpoint(LOCALHOST, hc) as c,
        ):
            # Mid-rotation, b holds both: it talks to a (old) and c (new).
            a.send_nowait(b.address, ["old to both"])
            c.send_nowait(b.address, ["new to both"])
            await hb.wait_received(2)
            b.send_nowait(a.address, ["both to old"])
            b.send_nowait(c.address, ["both to new"])
            await ha.wait_received(1)
            await hc.wait_received(1)
            # A member left behind (a) and one moved on (c) share no secret.
            a.send_nowait(c.address, ["old to new"])
            await ha.wait_lost(c.address)
            assert hc.envelopes() == [["both to new"]]
            assert a.statistics().unauthenticated_peers == 1


async def test_a_peer_with_another_secret_is_refused_and_counted():
    ha, hb = RecordingHandler(), RecordingHandler()
    with trio.fail_after(TIMEOUT):
        async with (
            secured(SECRET).open_endpoint(LOCALHOST, ha) as a,
            secured(OTHER_SECRET).open_endpoint(LOCALHOST, hb) as b,
        ):
            b.send_nowait(a.address, ["let me in"])
            await hb.wait_lost(a.address)
            [(_, reason)] = hb.lost
            # The dialer proves nothing to a listener that failed to prove.
            assert "does not prove the cluster secret" in reason
            assert b.statistics().unauthenticated_peers == 1
            assert ha.envelopes() == []
            assert not a.is_connected(b.address)


@pytest.mark.parametrize(
    ("secrets", "listener_secrets", "refusal", "code", "counter"),
    [
        # No secret at all, to a runner that needs one.
        ((), (SECRET,), "authentication required", 1008, "unauthenticated_peers"),
        # The wrong secret: the proofs are refused, without saying why.
        (
            (OTHER_SECRET,),
            (SECRET,),
            "authentication failed",
            1008,
            "unauthenticated_peers",
        ),
        # A secret, to a runner that has none: a clear mismatch.
        ((SECRET,), (), "this runner has none", 1002, "bad_peers"),
    ],
)
async def test_a_hand_driven_outsider_gets_nothing_through(
    secrets, listener_secrets, refusal, code, counter
):
    handler = RecordingHandler()
    transport = make_transport(cluster_secrets=list(listener_secrets))
    me = RunnerAddress("127.0.0.1", 9)
    with trio.fail_after(TIMEOUT):
        async with transport.open_endpoint(LOCALHOST, handler) as a:
            async with raw_websocket(a.address) as ws:
                with pytest.raises(NotAccepted) as caught:
                    await handshake(ws, me, a.address, secrets, check_listener=False)
                assert str(caught.value).startswith(f"{code} ")
                assert refusal in str(caught.value)
                assert ws.closed is not None
                assert ws.closed.code == code
                # Frames sent anyway are never read.
                with pytest.raises(trio_websocket.ConnectionClosed):
                    await ws.send_message(msgpack.packb([["sneaked in"]]))
            assert getattr(a.statistics(), counter) == 1
            assert handler.envelopes() == []
            assert not a.is_connected(me)


async def test_frames_before_the_proof_are_never_read():
    handler = RecordingHandler()
    me = RunnerAddress("127.0.0.1", 9)
    with trio.fail_after(TIMEOUT):
        async with secured().open_endpoint(LOCALHOST, handler) as a:
            async with raw_websocket(a.address) as ws:
                await ws.send_message(encode_hello(me, b"n" * 32))
                challenge = decode_hello(await ws.get_message())
                assert challenge.nonce is not None
                assert challenge.proofs
                # A frame where the proof belongs: not a proof, refused.
                await ws.send_message(msgpack.packb([["run this"]]))
                reason = await closed_with(ws)
                assert reason.code == CloseCode.PROTOCOL_ERROR
            assert handler.envelopes() == []
            assert a.statistics().bad_peers == 1


async def test_an_impostor_cannot_take_over_a_members_connection():
    # A runner announcing a live member's address replaced that member's
    # connection and got what was sent to it: with authentication, the
    # impostor is refused and the member's connection is untouched.
    with trio.fail_after(TIMEOUT):
        async with two_endpoints(secured()) as (a, ha, b, hb):
            a.send_nowait(b.address, ["before"])
            await hb.wait_received(1)
            for secrets in ((), (OTHER_SECRET,)):
                with pytest.raises(NotAccepted):
                    async with raw_peer(
                        a.address, b.address, secrets, check_listener=False
                    ):
                        pass  # pragma: no cover - refused in the handshake
            assert a.is_connected(b.address)
            assert ha.lost == []
            assert hb.lost == []
            await still_works(a, b, hb)
            assert a.statistics().unauthenticated_peers == 2


async def test_an_impostor_listener_gets_no_envelope():
    # A process listening where a member used to be, without the secret: the
    # dialer refuses it before sending anything.
    received: list[object] = []

    async def impostor(request, address):
        ws = await request.accept()
        hello = decode_hello(await ws.get_message())
        assert hello.nonce is not None
        await ws.send_message(encode_hello(address, b"x" * 32, [b"p" * 32]))
        while True:  # bounded by the endpoint closing the connection
            received.append(await ws.get_message())

    with trio.fail_after(TIMEOUT):
        async with dialing(secured(), impostor) as (where, a, handler):
            a.send_nowait(where, ["for a member"])
            await handler.wait_lost(where)
            [(_, reason)] = handler.lost
            assert "does not prove the cluster secret" in reason
            assert a.statistics().unauthenticated_peers == 1
    assert received == []


async def test_a_listener_that_does_not_authenticate_is_refused():
    async def plain(request, address):
        ws = await request.accept()
        await ws.get_message()
        await ws.send_message(encode_hello(address))
        await ws.get_message()

    with trio.fail_after(TIMEOUT):
        async with dialing(secured(), plain) as (where, a, handler):
            a.send_nowait(where, ["for a member"])
            await handler.wait_lost(where)
            [(_, reason)] = handler.lost
            assert "does not prove the cluster secret" in reason


# ----------------------------------------------------------------------
# Listening beyond loopback


def _mutual_tls_context() -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.verify_mode = ssl.CERT_REQUIRED
    return context


@pytest.mark.parametrize(
    "options",
    [
        {"cluster_secrets": [SECRET]},
        {"allow_unauthenticated": True},
        {
            "server_ssl_context": _mutual_tls_context(),
            "client_ssl_context": ssl.create_default_context(),
        },
    ],
)
async def test_listening_on_every_interface_needs_authentication(options):
    handler = RecordingHandler()
    with trio.fail_after(TIMEOUT):
        with pytest.raises(ConfigError, match="not a loopback address") as caught:
            async with make_transport().open_endpoint(
                RunnerAddress("0.0.0.0", 0), handler
            ):
                pass  # pragma: no cover
        assert "cluster_secrets" in str(caught.value)
        transport = make_transport(listen_at=RunnerAddress("0.0.0.0", 0), **options)
        async with transport.open_endpoint(LOCALHOST, handler) as endpoint:
            assert endpoint.address.port != 0


async def test_loopback_needs_no_authentication():
    async with two_endpoints(make_transport()) as (a, _ha, b, hb):
        a.send_nowait(b.address, ["local"])
        await hb.wait_received(1)


@pytest.mark.parametrize(
    ("secrets", "match"),
    [
        ([b"short"], "at least 16"),
        (["x" * 15], "at least 16"),
        ([SECRET] * 9, "at most 8"),
        ([42], "bytes or str"),
        (SECRET, "not one secret"),
    ],
)
def test_bad_secrets_are_refused_without_showing_them(secrets, match):
    with pytest.raises(ConfigError, match=match) as caught:
        WebSocketTransport(cluster_secrets=secrets)
    assert "short" not in str(caught.value)
    assert "xxx" not in str(caught.value)
    assert SECRET.decode() not in str(caught.value)


def test_the_secrets_never_show_in_a_repr():
    transport = WebSocketTransport(cluster_secrets=[SECRET])
    assert SECRET.decode() not in repr(transport.secrets)
    assert "1 secret" in repr(transport.secrets)
