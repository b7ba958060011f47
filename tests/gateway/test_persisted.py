"""Persisted handlers through the gateway: a request with a primary key
outlives the socket that sent it (neither the socket's end nor a cancel
frame interrupts it), so a client whose socket dropped sends it again and
gets the recorded reply, the handler having run once."""

from __future__ import annotations

import attrs
import pytest
import trio

import trio_cluster as tc
from trio_cluster.gateway import (
    CloseCode,
    Gateway,
    GatewayDisconnectedError,
    GatewayServer,
    expose,
    open_gateway_client,
    serve_gateway,
)

from .app import encode, exchange, open_raw


@attrs.frozen
class Order:
    order_id: str
    amount: int


class Till(tc.Entity):
    type_name = "Till"
    runs: list[str] = []  # noqa: RUF012 - shared on purpose: counts every run
    finished: list[str] = []  # noqa: RUF012
    release = trio.Event()

    @tc.rpc(persisted=True, primary_key=lambda order: order.order_id)
    async def pay(self, msg: Order) -> str:
        Till.runs.append(msg.order_id)
        await Till.release.wait()
        Till.finished.append(msg.order_id)
        return f"paid {msg.amount} for {msg.order_id}"


GATEWAY = Gateway(entities=[expose(Till)])


@pytest.fixture(autouse=True)
def fresh_till() -> None:
    Till.runs, Till.finished, Till.release = [], [], trio.Event()


async def test_a_dropped_socket_leaves_the_request_running() -> None:
    with trio.fail_after(30):
        async with (
            tc.open_runner(entities=[Till]) as runner,
            trio.open_nursery() as nursery,
        ):
            server: GatewayServer = await nursery.start(
                serve_gateway, runner, GATEWAY, "127.0.0.1", 0
            )
            async with open_gateway_client(server.url) as client:
                till = client.entities(Till)("front")
                order = Order("o-1", 30)

                async def drop_when_running() -> None:
                    while not Till.runs:  # noqa: ASYNC110
                        await trio.sleep(0.01)
                    for connection in server.connections():
                        connection.end(CloseCode.GOING_AWAY, "dropped")

                nursery.start_soon(drop_when_running)
                with pytest.raises(GatewayDisconnectedError):
                    await till.pay(order)
                Till.release.set()
                # Sent again on the new socket: the recorded reply, one run.
                assert await till.pay(order) == "paid 30 for o-1"
                assert Till.runs == ["o-1"]
                assert Till.finished == ["o-1"]
            nursery.cancel_scope.cancel()


async def test_a_cancel_frame_answers_but_the_request_goes_on() -> None:
    with trio.fail_after(30):
        async with (
            tc.open_runner(entities=[Till]) as runner,
            trio.open_nursery() as nursery,
        ):
            server: GatewayServer = await nursery.start(
                serve_gateway, runner, GATEWAY, "127.0.0.1", 0
            )
            async with open_raw(server.url) as ws:
                call = {
                    "t": "call",
                    "id": 1,
                    "op": "Till.pay",
                    "key": "back",
                    "msg": {"order_id": "o-2", "amount": 5},
                }
                await ws.send_message(encode(call))
                while not Till.runs:  # noqa: ASYNC110
                    await trio.sleep(0.01)
                cancelled = await exchange(ws, {"t": "cancel", "id": 1})
                assert cancelled["code"] == "cancelled"
                Till.release.set()
                again = await exchange(ws, {**call, "id": 2})
                assert again == {"t": "reply", "id": 2, "v": "paid 5 for o-2"}
                assert Till.runs == ["o-2"]
            nursery.cancel_scope.cancel()
