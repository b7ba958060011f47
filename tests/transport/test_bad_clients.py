"""Bad clients on a runner's WebSocket port (real sockets on 127.0.0.1):
a reset in the middle of the WebSocket handshake, bytes that are not HTTP, a
plain HTTP client, a reset or a close in the middle of a frame. Each ends
its own connection only; the runner keeps serving its peers.

Real sockets, so real time: every test is bounded by ``trio.fail_after``.
"""

from __future__ import annotations

import base64
import logging
import os
import socket
import struct

import trio

import trio_cluster as tc

from ..helpers import Add
from .test_runner_websocket import TIMEOUT, Tally, open_pair, remote_id

LOG = "trio_cluster.transport"


def upgrade_request(port: int) -> bytes:
    key = base64.b64encode(os.urandom(16)).decode()
    return (
        f"GET /trio_cluster HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        "Upgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
    ).encode()


async def connect(runner: tc.Runner) -> trio.socket.SocketType:
    sock = trio.socket.socket()
    await sock.connect((runner.address.host, runner.address.port))
    return sock


def reset(sock: trio.socket.SocketType) -> None:
    """Close ``sock`` with a TCP reset (SO_LINGER 0), not a FIN."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


async def upgraded(runner: tc.Runner) -> trio.socket.SocketType:
    """A raw socket past the WebSocket handshake with ``runner``."""
    sock = await connect(runner)
    await sock.send(upgrade_request(runner.address.port))
    answer = b""
    while b"\r\n\r\n" not in answer:
        chunk = await sock.recv(4096)
        assert chunk, "the runner closed during the handshake"
        answer += chunk
    assert answer.startswith(b"HTTP/1.1 101 ")
    return sock


# A masked binary frame announcing 1000 bytes, of which only 3 are sent.
PARTIAL_FRAME = bytes([0x82, 0x80 | 126]) + struct.pack("!H", 1000) + b"mask" + b"abc"


async def still_serving(first: tc.Runner, second: tc.Runner, n: int) -> None:
    """Calls in both directions succeed, over new and old connections."""
    assert await first.client(Tally)(remote_id(first, skip=n)).add(Add(1)) == 1
    assert await second.client(Tally)(remote_id(second, skip=n)).add(Add(2)) == 2


async def test_resets_and_garbage_end_only_their_connection(caplog):
    with trio.fail_after(TIMEOUT), caplog.at_level(logging.DEBUG, logger=LOG):
        async with open_pair() as (first, second):
            await still_serving(first, second, 0)
            port = first.address.port
            for _ in range(5):
                # a reset in the middle of the handshake request
                sock = await connect(first)
                await sock.send(upgrade_request(port)[:40])
                await trio.sleep(0.01)
                reset(sock)
                # a reset once the whole handshake request is in
                sock = await connect(first)
                await sock.send(upgrade_request(port))
                reset(sock)
                # bytes that are not HTTP, then a close and a reset
                sock = await connect(first)
                await sock.send(b"\x00\xff\x16\x03\x01 not http\r\n\r\n" * 50)
                sock.close()
                sock = await connect(first)
                await sock.send(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03")
                reset(sock)
            # a plain HTTP client gets an answer, or is closed
            async with await trio.open_tcp_stream("127.0.0.1", port) as plain:
                await plain.send_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
                with trio.fail_after(5):
                    while await plain.receive_some(4096):
                        pass
            await trio.sleep(0.2)
            await still_serving(first, second, 1)


async def test_a_reset_or_close_mid_frame_ends_only_that_connection(caplog):
    with trio.fail_after(TIMEOUT), caplog.at_level(logging.DEBUG, logger=LOG):
        async with open_pair() as (first, second):
            await still_serving(first, second, 0)
            for _ in range(5):
                sock = await upgraded(first)
                await sock.send(PARTIAL_FRAME)
                await trio.sleep(0.01)
                reset(sock)
                sock = await upgraded(first)
                await sock.send(PARTIAL_FRAME)
                sock.close()
                sock = await upgraded(first)  # and a reset before any frame
                reset(sock)
            await trio.sleep(0.2)
            await still_serving(first, second, 1)


async def test_a_handshake_header_that_is_not_ascii_ends_only_its_connection(
    caplog,
):
    # wsproto raises UnicodeDecodeError (not one of its protocol errors) in
    # trio-websocket's reader task for this one.
    with trio.fail_after(TIMEOUT), caplog.at_level(logging.DEBUG, logger=LOG):
        async with open_pair() as (first, second):
            await still_serving(first, second, 0)
            request = upgrade_request(first.address.port)
            request = request.replace(b"Host: ", b"Host: \xff\xfe", 1)
            for _ in range(3):
                async with await trio.open_tcp_stream(
                    "127.0.0.1", first.address.port
                ) as stream:
                    await stream.send_all(request)
                    with trio.fail_after(5):
                        while await stream.receive_some(4096):
                            pass
            await still_serving(first, second, 1)
    failed = [
        record
        for record in caplog.records
        if "failed: unexpected UnicodeDecodeError" in record.getMessage()
    ]
    assert len(failed) == 3
    assert all(record.levelno == logging.INFO for record in failed)
    assert all(not record.exc_info for record in failed)
