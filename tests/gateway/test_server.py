"""The gateway server over real sockets on 127.0.0.1: what clients may do,
and how each kind of bad input is answered (the socket at fault only)."""

from __future__ import annotations

from contextlib import suppress
from typing import Any

import pytest
import trio
from trio_websocket import ConnectionClosed, ConnectionRejected
from wsproto import ConnectionType, WSConnection
from wsproto.events import CloseConnection, Request

from trio_cluster.gateway import (
    JSON,
    MSGPACK,
    CloseCode,
    Gateway,
    RateLimit,
    UnauthorizedError,
    WindowLimit,
    expose,
)

from .app import (
    Blocker,
    Counter,
    Whoami,
    decode,
    encode,
    exchange,
    open_gateway,
    open_raw,
    open_websocket,
    read_until_closed,
)
from .test_frames import client_frame

pytestmark = pytest.mark.parametrize("subprotocol", [JSON, MSGPACK])


async def test_exposed_handlers_and_services_answer(subprotocol: str) -> None:
    with trio.fail_after(30):
        async with open_gateway() as server, open_raw(server.url, subprotocol) as ws:
            call = {
                "t": "call",
                "id": 1,
                "op": "Counter.add",
                "key": "a",
                "msg": {"amount": 2},
            }
            assert await exchange(ws, call, subprotocol) == {
                "t": "reply",
                "id": 1,
                "v": 2,
            }
            call = {"t": "call", "id": 2, "op": "whoami.get", "msg": None}
            assert await exchange(ws, call, subprotocol) == {
                "t": "reply",
                "id": 2,
                "v": "None",
            }


async def test_declared_errors_are_typed_and_others_say_nothing(
    subprotocol: str,
) -> None:
    with trio.fail_after(30):
        async with open_gateway() as server, open_raw(server.url, subprotocol) as ws:
            call = {
                "t": "call",
                "id": 1,
                "op": "Counter.add",
                "key": "a",
                "msg": {"amount": 101},
            }
            answer = await exchange(ws, call, subprotocol)
            assert answer["code"] == "declared"
            assert answer["type"] == "LimitExceededError"
            assert answer["data"] == {"limit": 100}
            call = {
                "t": "call",
                "id": 2,
                "op": "Counter.crash",
                "key": "a",
                "msg": {"amount": 1},
            }
            answer = await exchange(ws, call, subprotocol)
            assert answer == {
                "t": "error",
                "id": 2,
                "code": "internal",
                "message": "internal error",
            }
            assert server.statistics().requests_failed == 2


@pytest.mark.parametrize(
    ("frame", "code"),
    [
        (
            {
                "t": "call",
                "id": 1,
                "op": "Counter.reset",
                "key": "a",
                "msg": {"amount": 1},
            },
            "not_found",
        ),
        (
            {"t": "call", "id": 1, "op": "Nothing.here", "key": "a", "msg": {}},
            "not_found",
        ),
        (
            {
                "t": "stream",
                "id": 1,
                "op": "Counter.add",
                "key": "a",
                "msg": {},
                "credit": 1,
            },
            "not_found",
        ),
        (
            {"t": "call", "id": 1, "op": "Counter.add", "msg": {"amount": 1}},
            "bad_request",
        ),
        (
            {
                "t": "call",
                "id": 1,
                "op": "Counter.add",
                "key": " a",
                "msg": {"amount": 1},
            },
            "bad_request",
        ),
        (
            {"t": "call", "id": 1, "op": "whoami.get", "key": "a", "msg": None},
            "bad_request",
        ),
        (
            {
                "t": "call",
                "id": 1,
                "op": "Counter.add",
                "key": "a",
                "msg": {"amount": "x"},
            },
            "bad_request",
        ),
        (
            {"t": "call", "id": 1, "op": "Counter.add", "key": "a", "msg": [1, 2]},
            "bad_request",
        ),
        (
            {"t": "call", "id": -1, "op": "Counter.add", "key": "a", "msg": {}},
            "bad_frame",
        ),
        ({"t": "call", "id": 1, "op": 7, "msg": {}}, "bad_frame"),
        ({"t": "credit", "id": 1, "n": -3}, "bad_frame"),
        ({"t": "publish", "id": 1, "topic": "x"}, "unknown_kind"),
    ],
)
async def test_a_wrong_frame_is_answered_and_the_socket_stays_up(
    subprotocol: str, frame: dict[str, object], code: str
) -> None:
    with trio.fail_after(30):
        async with open_gateway() as server, open_raw(server.url, subprotocol) as ws:
            answer = await exchange(ws, frame, subprotocol)
            assert answer["t"] == "error"
            assert answer["code"] == code
            call = {
                "t": "call",
                "id": 9,
                "op": "Counter.add",
                "key": "a",
                "msg": {"amount": 1},
            }
            assert (await exchange(ws, call, subprotocol))["v"] == 1


def _code(closed: ConnectionClosed) -> int:
    assert closed.reason is not None
    return closed.reason.code


def _garbage(subprotocol: str) -> list[tuple[bytes | str, int]]:
    wrong_type: bytes | str = b"\x81" if subprotocol == JSON else "{}"
    unreadable: bytes | str = "{not json" if subprotocol == JSON else b"\xc1"
    not_a_map: bytes | str = "[1]" if subprotocol == JSON else b"\x91\x01"
    return [
        (wrong_type, CloseCode.UNSUPPORTED_DATA),
        (unreadable, CloseCode.INVALID_PAYLOAD),
        (not_a_map, CloseCode.INVALID_PAYLOAD),
    ]


async def test_unreadable_frames_close_only_that_socket(subprotocol: str) -> None:
    """Garbage closes the socket that sent it with a close code; a call in
    flight on another socket is answered all the same."""
    with trio.fail_after(30):
        async with open_gateway() as server, open_raw(server.url, subprotocol) as good:
            call = {"t": "call", "id": 1, "op": "Blocker.wait", "key": "b", "msg": {}}
            await good.send_message(encode(call, subprotocol))
            for message, code in _garbage(subprotocol):
                async with open_raw(server.url, subprotocol) as bad:
                    await bad.send_message(message)
                    with pytest.raises(ConnectionClosed) as caught:
                        await bad.get_message()
                    assert _code(caught.value) == code
            # The first socket's request is still running: cancel it.
            answer = await exchange(good, {"t": "cancel", "id": 1}, subprotocol)
            assert answer == {
                "t": "error",
                "id": 1,
                "code": "cancelled",
                "message": "cancelled",
            }
            assert server.statistics().closed == {"bad_frame": 3}


async def test_an_oversized_message_closes_1009(subprotocol: str) -> None:
    with trio.fail_after(30):
        async with (
            open_gateway(max_message_size=1000) as server,
            open_raw(server.url, subprotocol) as ws,
        ):
            big = {
                "t": "call",
                "id": 1,
                "op": "Counter.add",
                "key": "a",
                "msg": {"pad": "x" * 2000},
            }
            await ws.send_message(encode(big, subprotocol))
            with pytest.raises(ConnectionClosed) as caught:
                await ws.get_message()
            assert _code(caught.value) == CloseCode.MESSAGE_TOO_BIG


class _CallTasks(trio.abc.Instrument):
    """Counts the tasks spawned for calls (`ClientConnection._call`)."""

    def __init__(self) -> None:
        self.spawned = 0

    def task_spawned(self, task: trio.lowlevel.Task) -> None:
        if task.name.endswith("ClientConnection._call"):
            self.spawned += 1


async def test_a_call_that_cannot_wait_is_answered_without_a_task(
    subprotocol: str,
) -> None:
    tasks = _CallTasks()
    with trio.fail_after(30):
        async with open_gateway() as server, open_raw(server.url, subprotocol) as ws:
            trio.lowlevel.add_instrument(tasks)
            try:
                for n in (1, 2, 3):
                    call: dict[str, object] = {
                        "t": "call",
                        "id": n,
                        "op": "Counter.add",
                        "key": "a",
                        "msg": {"amount": 1},
                    }
                    answer = await exchange(ws, call, subprotocol)
                    assert answer == {"t": "reply", "id": n, "v": n}
                call = {
                    "t": "call",
                    "id": 4,
                    "op": "Counter.add",
                    "key": "a",
                    "msg": {"amount": 101},
                }
                answer = await exchange(ws, call, subprotocol)
                assert (answer["id"], answer["code"]) == (4, "declared")
                assert answer["data"] == {"limit": 100}
                call = {
                    "t": "call",
                    "id": 5,
                    "op": "Counter.crash",
                    "key": "c",
                    "msg": {"amount": 1},
                }
                answer = await exchange(ws, call, subprotocol)
                assert (answer["id"], answer["code"]) == (5, "internal")
                assert tasks.spawned == 0
                # A handler that suspends runs in its own task, which a
                # ``cancel`` frame cancels.
                call = {
                    "t": "call",
                    "id": 6,
                    "op": "Blocker.wait",
                    "key": "b",
                    "msg": {},
                }
                await ws.send_message(encode(call, subprotocol))
                answer = await exchange(ws, {"t": "cancel", "id": 6}, subprotocol)
                assert (answer["id"], answer["code"]) == (6, "cancelled")
                assert tasks.spawned == 1
            finally:
                trio.lowlevel.remove_instrument(tasks)
            statistics = server.statistics()
            assert (statistics.requests, statistics.requests_failed) == (6, 2)


async def test_cancel_cancels_that_request_only(subprotocol: str) -> None:
    Blocker.cancelled = 0
    with trio.fail_after(30):
        async with open_gateway() as server, open_raw(server.url, subprotocol) as ws:
            for request_id in (1, 2):
                call: dict[str, object] = {
                    "t": "call",
                    "id": request_id,
                    "op": "Blocker.wait",
                    "key": f"b{request_id}",
                    "msg": {},
                }
                await ws.send_message(encode(call, subprotocol))
            answer = await exchange(ws, {"t": "cancel", "id": 2}, subprotocol)
            assert answer["id"] == 2
            assert answer["code"] == "cancelled"
            assert Blocker.cancelled == 1
            duplicate = {
                "t": "call",
                "id": 1,
                "op": "Counter.add",
                "key": "a",
                "msg": {"amount": 1},
            }
            assert (await exchange(ws, duplicate, subprotocol))[
                "code"
            ] == "duplicate_id"
        # Closing the socket cancels the rest of its work.
        with trio.fail_after(5):
            while Blocker.cancelled < 2:  # noqa: ASYNC110 - set in another runner task
                await trio.sleep(0.01)


async def test_concurrent_requests_are_bounded_per_socket(subprotocol: str) -> None:
    with trio.fail_after(30):
        async with (
            open_gateway(max_concurrent_requests=2) as server,
            open_raw(server.url, subprotocol) as ws,
        ):
            for request_id in (1, 2):
                call: dict[str, object] = {
                    "t": "call",
                    "id": request_id,
                    "op": "Blocker.wait",
                    "key": "b",
                    "msg": {},
                }
                await ws.send_message(encode(call, subprotocol))
            call = {
                "t": "call",
                "id": 3,
                "op": "Counter.add",
                "key": "a",
                "msg": {"amount": 1},
            }
            assert (await exchange(ws, call, subprotocol))[
                "code"
            ] == "too_many_requests"
            async with open_raw(server.url, subprotocol) as other:  # its own bound
                assert (await exchange(other, call, subprotocol))["v"] == 1


async def test_streams_send_no_more_than_the_credit(subprotocol: str) -> None:
    with trio.fail_after(30):
        async with open_gateway() as server, open_raw(server.url, subprotocol) as ws:
            frame = {
                "t": "stream",
                "id": 1,
                "op": "Counter.count",
                "key": "a",
                "msg": {"upto": 5},
                "credit": 2,
            }
            assert await exchange(ws, frame, subprotocol) == {
                "t": "item",
                "id": 1,
                "v": 0,
            }
            assert decode(await ws.get_message()) == {"t": "item", "id": 1, "v": 1}
            with trio.move_on_after(0.3):
                extra = decode(await ws.get_message())
                pytest.fail(f"sent beyond the credit: {extra}")
            await ws.send_message(
                encode({"t": "credit", "id": 1, "n": 10}, subprotocol)
            )
            items = [decode(await ws.get_message()) for _ in range(4)]
            assert [item.get("v") for item in items[:3]] == [2, 3, 4]
            assert items[3] == {"t": "end", "id": 1}


async def test_authentication_refuses_before_the_upgrade(subprotocol: str) -> None:
    async def authenticate(handshake: object) -> str:
        token = handshake.query.get("token") or handshake.headers.get("authorization")  # type: ignore[attr-defined]
        if token == "banned":
            raise UnauthorizedError(reason="banned", status=403)
        if token not in ("s3cret", "Bearer s3cret"):
            raise UnauthorizedError(reason="bad token")
        return "alice"

    gateway = Gateway(
        entities=[expose(Counter)], services=[Whoami()], authenticate=authenticate
    )
    with trio.fail_after(30):
        async with open_gateway(gateway) as server:
            for query, status in (
                ("", 401),
                ("?token=nope", 401),
                ("?token=banned", 403),
            ):
                with pytest.raises(ConnectionRejected) as caught:
                    async with open_websocket(
                        server.url + query, subprotocols=[subprotocol]
                    ):
                        pass
                assert caught.value.status_code == status
            async with open_raw(server.url + "?token=s3cret", subprotocol) as ws:
                call = {"t": "call", "id": 1, "op": "whoami.get", "msg": None}
                assert (await exchange(ws, call, subprotocol))["v"] == "alice"
            assert server.statistics().refused_unauthorized == 3


async def test_authorization_is_asked_per_operation(subprotocol: str) -> None:
    asked: list[tuple[object, str, str | None]] = []

    async def authorize(principal: object, operation: object) -> bool:
        asked.append((principal, operation.name, operation.key))  # type: ignore[attr-defined]
        return bool(operation.key != "private")  # type: ignore[attr-defined]

    gateway = Gateway(entities=[expose(Counter)], authorize=authorize)
    with trio.fail_after(30):
        async with (
            open_gateway(gateway) as server,
            open_raw(server.url, subprotocol) as ws,
        ):
            call = {
                "t": "call",
                "id": 1,
                "op": "Counter.add",
                "key": "private",
                "msg": {"amount": 1},
            }
            assert (await exchange(ws, call, subprotocol))["code"] == "forbidden"
            call["key"] = "public"
            assert (await exchange(ws, call, subprotocol))["v"] == 1
            assert asked == [
                (None, "Counter.add", "private"),
                (None, "Counter.add", "public"),
            ]


async def test_connects_over_the_rate_get_429_then_a_block(subprotocol: str) -> None:
    with trio.fail_after(30):
        async with open_gateway(
            connect_rate=WindowLimit(2, per=60.0, block_for=300.0)
        ) as server:
            for _ in range(2):
                async with open_raw(server.url, subprotocol):
                    pass
            with pytest.raises(ConnectionRejected) as caught:
                async with open_websocket(server.url, subprotocols=[subprotocol]):
                    pass
            assert caught.value.status_code == 429
            headers = dict(caught.value.headers or [])
            assert headers[b"retry-after"] == b"300"
            assert server.statistics().refused_rate_limited == 1
            # Blocked: answered at once, before the client says anything
            # (no task waits for its request), the client file included.
            async with await trio.open_tcp_stream("127.0.0.1", server.port) as raw:
                answer = b""
                while chunk := await raw.receive_some():
                    answer += chunk
            assert answer.startswith(b"HTTP/1.1 429 ")
            assert b"\r\nRetry-After: 300\r\n" in answer
            assert answer.endswith(b"\r\n\r\ntoo many connections\n")
            with pytest.raises(ConnectionRejected) as caught:
                async with open_websocket(server.url, subprotocols=[subprotocol]):
                    pass
            assert caught.value.status_code == 429
            assert server.statistics().refused_rate_limited == 3


async def test_a_flooding_socket_is_closed_and_others_are_served(
    subprotocol: str,
) -> None:
    with trio.fail_after(30):
        async with (
            open_gateway(message_rate=RateLimit(10.0, burst=20.0)) as server,
            open_raw(server.url, subprotocol) as calm,
            open_raw(server.url, subprotocol) as flood,
        ):
            with suppress(ConnectionClosed):  # closed before the last, perhaps
                for _ in range(1000):
                    await flood.send_message(encode({"t": "ping"}, subprotocol))
            with pytest.raises(ConnectionClosed) as caught:
                await read_until_closed(flood)
            assert _code(caught.value) == CloseCode.RATE_LIMITED
            call = {
                "t": "call",
                "id": 1,
                "op": "Counter.add",
                "key": "a",
                "msg": {"amount": 1},
            }
            assert (await exchange(calm, call, subprotocol))["v"] == 1
            assert server.statistics().closed == {"rate_limited": 1}


async def test_a_flooding_socket_is_closed_without_reading_on(
    subprotocol: str,
) -> None:
    """Closed 4008, a flooding client gets the close frame and then the end
    of the stream at once, though it never answers the close: what it
    sends after is read and dropped unparsed, not waited on."""
    with trio.fail_after(20):
        async with (
            open_gateway(
                message_rate=RateLimit(10.0, burst=20.0), close_timeout=60.0
            ) as server,
            await trio.open_tcp_stream("127.0.0.1", server.port) as stream,
        ):
            client = WSConnection(ConnectionType.CLIENT)
            await stream.send_all(
                client.send(
                    Request(host="127.0.0.1", target="/ws", subprotocols=[subprotocol])
                )
            )
            frames: list[Any] = []
            ping = encode({"t": "ping"}, subprotocol)
            opcode = 0x1 if isinstance(ping, str) else 0x2
            raw = ping.encode() if isinstance(ping, str) else ping
            flood = client_frame(opcode, raw) * 500
            with suppress(trio.BrokenResourceError):
                await stream.send_all(flood)
            while chunk := await stream.receive_some():
                client.receive_data(chunk)
                frames.extend(client.events())
            closes = [f for f in frames if isinstance(f, CloseConnection)]
            assert [(c.code, c.reason) for c in closes] == [
                (CloseCode.RATE_LIMITED, "message rate limit exceeded")
            ]
            with suppress(trio.BrokenResourceError):
                await stream.send_all(flood)  # dropped, or refused
            assert server.statistics().closed == {"rate_limited": 1}


async def test_wrong_path_subprotocol_or_plain_http_are_refused(
    subprotocol: str,
) -> None:
    with trio.fail_after(30):
        async with open_gateway() as server:
            with pytest.raises(ConnectionRejected) as caught:
                async with open_websocket(server.url + "x", subprotocols=[subprotocol]):
                    pass
            assert caught.value.status_code == 404
            with pytest.raises(ConnectionRejected) as caught:
                async with open_websocket(server.url, subprotocols=["chat.v2"]):
                    pass
            assert caught.value.status_code == 400
            async with await trio.open_tcp_stream("127.0.0.1", server.port) as stream:
                await stream.send_all(b"GET /gateway.js HTTP/1.1\r\nHost: x\r\n\r\n")
                response = b""
                while chunk := await stream.receive_some():
                    response += chunk
            assert response.startswith(b"HTTP/1.1 200 OK")
            assert b"export class GatewayClient" in response
            assert server.statistics().refused_other == 2


async def test_a_batch_of_frames_is_handled_in_order(subprotocol: str) -> None:
    calls = [
        {
            "t": "call",
            "id": n,
            "op": "Counter.add",
            "key": "batch",
            "msg": {"amount": 1},
        }
        for n in range(1, 4)
    ]
    with trio.fail_after(30):
        async with open_gateway() as server, open_raw(server.url, subprotocol) as ws:
            await ws.send_message(encode([*calls, {"t": "nope", "id": 9}], subprotocol))
            answers: list[dict[str, Any]] = []
            while len(answers) < 4:
                message = decode(await ws.get_message())
                answers += message if isinstance(message, list) else [message]
            # The calls run concurrently: each is answered once, in any order.
            replies = {a["id"]: a["v"] for a in answers if a["t"] == "reply"}
            assert sorted(replies) == [1, 2, 3]
            assert sorted(replies.values()) == [1, 2, 3]
            (refused,) = [a for a in answers if a["t"] == "error"]
            assert (refused["id"], refused["code"]) == (9, "unknown_kind")
            assert server.statistics().frames_received == 4


async def test_a_fragmented_message_among_plain_ones_keeps_its_place(
    subprotocol: str,
) -> None:
    # The reader loop takes whole data messages itself and leaves the rest
    # to trio-websocket: a message in fragments (a ping among them), then a
    # plain one, all in one write, are answered in order.
    opcode = 0x1 if subprotocol == JSON else 0x2

    def call(request_id: int) -> bytes:
        message = encode(call_frame(request_id), subprotocol)
        return message.encode() if isinstance(message, str) else message

    first, second = call(1), call(2)
    data = (
        client_frame(opcode, first[:5], fin=False)
        + client_frame(0x9, b"hello")
        + client_frame(0x0, first[5:])
        + client_frame(opcode, second)
    )
    with trio.fail_after(30):
        async with open_gateway() as server, open_raw(server.url, subprotocol) as ws:
            await ws._stream.send_all(data)
            answers = [decode(await ws.get_message()) for _ in range(2)]
            assert answers == [
                {"t": "reply", "id": 1, "v": 1},
                {"t": "reply", "id": 2, "v": 3},
            ]
            assert (await exchange(ws, call_frame(3), subprotocol))["v"] == 6


def call_frame(request_id: int) -> dict[str, object]:
    return {
        "t": "call",
        "id": request_id,
        "op": "Counter.add",
        "key": "f",
        "msg": {"amount": request_id},
    }
