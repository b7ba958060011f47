"""Reliable pushes over real sockets: acked pushes, redelivery after the
ack timeout, bounded retries then `PushFailedError`, the session moving to
another runner (what was not acked is delivered there), a session bound to
its user, and the Trio client's inbox (each push once, acked when taken)."""

from __future__ import annotations

from contextlib import AsyncExitStack, suppress
from typing import Any

import attrs
import pytest
import trio
from trio.testing import MockClock
from trio_websocket import ConnectionClosed

import trio_cluster as tc
from trio_cluster.gateway import (
    CloseCode,
    Gateway,
    GatewayConfig,
    GatewayServer,
    Handshake,
    PushFailedError,
    RateLimit,
    Session,
    open_gateway_client,
    send_reliable,
    serve_gateway,
)
from trio_cluster.gateway._pushes import PushInbox
from trio_cluster.storage import MemoryStorage
from trio_cluster.transport import MemoryNetwork, MemoryTransport

from ..helpers import config
from .app import decode, encode, open_raw, read_until_closed

SESSION = "s" * 20


async def by_name(handshake: Handshake) -> object:
    await trio.lowlevel.checkpoint()
    return handshake.headers.get("x-name", "anonymous")


GATEWAY = Gateway(sessions=True, authenticate=by_name, user=str)


async def next_push(ws: Any) -> dict[str, Any]:
    while (frame := decode(await ws.get_message()))["t"] != "push":
        pass
    return frame  # type: ignore[no-any-return]


@pytest.fixture
def quick(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Session, "ack_timeout", 0.3)
    monkeypatch.setattr(Session, "max_redeliveries", 2)


async def test_a_push_is_acked_by_the_client() -> None:
    with trio.fail_after(30):
        async with (
            tc.open_runner(entities=[Session]) as runner,
            trio.open_nursery() as nursery,
        ):
            server: GatewayServer = await nursery.start(
                serve_gateway, runner, GATEWAY, "127.0.0.1", 0
            )
            async with open_gateway_client(server.url, session=SESSION) as client:
                await client.wait_connected()
                got: list[Any] = []

                async def take() -> None:
                    async for push in client.pushes:
                        got.append(push.data)
                        if len(got) == 3:
                            return

                nursery.start_soon(take)
                seqs = [
                    await send_reliable(runner, SESSION, {"n": n}) for n in range(3)
                ]
                assert seqs == [1, 2, 3]
                assert got == [{"n": 0}, {"n": 1}, {"n": 2}]
            nursery.cancel_scope.cancel()


async def test_redelivery_after_the_ack_timeout_then_failure(quick: None) -> None:
    with trio.fail_after(30):
        async with (
            tc.open_runner(entities=[Session]) as runner,
            trio.open_nursery() as nursery,
        ):
            server: GatewayServer = await nursery.start(
                serve_gateway, runner, GATEWAY, "127.0.0.1", 0
            )
            async with open_raw(f"{server.url}?session={SESSION}") as ws:
                # Acked on its second delivery.
                done: list[int] = []

                async def send(data: Any) -> None:
                    done.append(await send_reliable(runner, SESSION, data))

                nursery.start_soon(send, "late ack")
                first = await next_push(ws)
                again = await next_push(ws)  # no ack within 0.3 s
                assert again == first
                assert first["data"] == "late ack"
                await ws.send_message(
                    encode(
                        {"t": "ack", "epoch": first["epoch"], "seqs": [first["seq"]]}
                    )
                )
                while not done:  # noqa: ASYNC110 - the sender's own task
                    await trio.sleep(0.01)
                assert done == [first["seq"]]
                # Never acked: 1 + 2 deliveries, then the sender fails.
                started = trio.current_time()
                failures: list[PushFailedError] = []

                async def lost() -> None:
                    with pytest.raises(PushFailedError) as caught:
                        await send_reliable(runner, SESSION, "lost")
                    failures.append(caught.value)

                async with trio.open_nursery() as inner:
                    inner.start_soon(lost)
                    copies = [await next_push(ws) for _ in range(3)]
                (failure,) = failures
                assert failure.attempts == 3
                assert failure.session == SESSION
                assert trio.current_time() - started >= 0.9 - 0.05
                assert {frame["seq"] for frame in copies} == {first["seq"] + 1}
                # A bad ack is answered; the socket stays.
                await ws.send_message(encode({"t": "ack", "epoch": 1, "seqs": []}))
                assert (await next_frame(ws))["code"] == "bad_frame"
            nursery.cancel_scope.cancel()


async def close_code(ws: Any) -> int | None:
    """Read until the socket closes; its close code."""
    with pytest.raises(ConnectionClosed) as closed:
        await read_until_closed(ws)
    reason = closed.value.reason
    return None if reason is None else reason.code


async def next_frame(ws: Any) -> dict[str, Any]:
    while (frame := decode(await ws.get_message()))["t"] == "ping":
        pass
    return frame  # type: ignore[no-any-return]


async def test_the_session_moves_to_another_runner() -> None:
    storage, network = MemoryStorage(), MemoryNetwork()

    async def serve(
        port: int, *, task_status: trio.TaskStatus[tuple[tc.Runner, GatewayServer]]
    ) -> None:
        async with (
            tc.open_runner(
                entities=[Session],
                config=config(runner_address=tc.RunnerAddress("127.0.0.1", port)),
                storage=storage,
                transport=MemoryTransport(network),
            ) as runner,
            trio.open_nursery() as nursery,
        ):
            server = await nursery.start(serve_gateway, runner, GATEWAY, "127.0.0.1", 0)
            task_status.started((runner, server))
            await trio.sleep_forever()

    with trio.fail_after(60):
        async with AsyncExitStack() as stack:
            nursery = await stack.enter_async_context(trio.open_nursery())
            stack.callback(nursery.cancel_scope.cancel)
            a, server_a = await nursery.start(serve, 7201)
            b, server_b = await nursery.start(serve, 7202)
            await a.wait_shards_acquired()
            await b.wait_shards_acquired()
            results: list[int] = []

            async def send(data: Any) -> None:
                results.append(await send_reliable(b, SESSION, data))

            async with open_raw(f"{server_a.url}?session={SESSION}") as on_a:
                nursery.start_soon(send, "one")
                one = await next_push(on_a)
                await on_a.send_message(
                    encode({"t": "ack", "epoch": one["epoch"], "seqs": [one["seq"]]})
                )
                nursery.start_soon(send, "two")
                two = await next_push(on_a)  # not acked: the client moves
                # The same session on the other runner's gateway: the
                # un-acked push is delivered there; the old socket is closed.
                async with open_raw(f"{server_b.url}?session={SESSION}") as on_b:
                    moved = await next_push(on_b)
                    assert moved == two
                    await on_b.send_message(
                        encode(
                            {"t": "ack", "epoch": two["epoch"], "seqs": [two["seq"]]}
                        )
                    )
                    assert await close_code(on_a) == CloseCode.SESSION_DETACHED
                    while len(results) < 2:  # noqa: ASYNC110
                        await trio.sleep(0.01)
                    assert results == [one["seq"], two["seq"]]
                    # Another user cannot attach to it.
                    async with open_raw(
                        f"{server_b.url}?session={SESSION}",
                        extra_headers=[(b"x-name", b"mallory")],
                    ) as intruder:
                        assert await close_code(intruder) == CloseCode.SESSION_DETACHED


async def test_a_push_taken_as_the_client_leaves_is_acked(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The acks of the pushes taken go before the close frame: a client
    that leaves its block right after taking a push does not get it again
    (and its sender learns it was acked)."""
    monkeypatch.setattr(Session, "ack_timeout", 20.0)
    with trio.fail_after(30):
        async with (
            tc.open_runner(entities=[Session]) as runner,
            trio.open_nursery() as nursery,
        ):
            server: GatewayServer = await nursery.start(
                serve_gateway, runner, GATEWAY, "127.0.0.1", 0
            )
            acked: list[int] = []

            async def send() -> None:
                acked.append(await send_reliable(runner, SESSION, "last"))

            async with open_gateway_client(server.url, session=SESSION) as client:
                nursery.start_soon(send)
                async for push in client.pushes:
                    assert push.data == "last"
                    break  # and leave at once
            with trio.fail_after(10):  # well before a redelivery (20 s)
                while not acked:  # noqa: ASYNC110
                    await trio.sleep(0.01)
            assert acked == [1]
            nursery.cancel_scope.cancel()


async def test_the_inbox_hands_each_push_over_once(autojump_clock: MockClock) -> None:
    sent: list[dict[str, Any]] = []

    async def send(frame: dict[str, Any]) -> None:
        await trio.lowlevel.checkpoint()
        sent.append(frame)

    inbox = PushInbox(send, ack_delay=0.05)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(inbox.send_acks)
        frame = {"t": "push", "epoch": "e", "seq": 1, "data": "x"}
        await inbox.deliver(frame)
        await inbox.deliver(frame)  # queued already: dropped, not acked
        await trio.sleep(1)
        assert sent == []
        push = await anext(aiter(inbox))
        assert (push.epoch, push.seq, push.data) == ("e", 1, "x")
        await trio.sleep(1)
        assert sent == [{"t": "ack", "epoch": "e", "seqs": [1]}]
        await inbox.deliver(frame)  # taken already: acked again, dropped
        # Taken together, acked together: one frame.
        for seq in (2, 3):
            await inbox.deliver({"t": "push", "epoch": "e", "seq": seq, "data": seq})
        assert [(await anext(aiter(inbox))).seq for _ in range(2)] == [2, 3]
        await trio.sleep(1)
        assert sent[1:] == [{"t": "ack", "epoch": "e", "seqs": [1, 2, 3]}]
        assert inbox.duplicates == 2
        inbox.close()
        with pytest.raises(StopAsyncIteration):
            await anext(aiter(inbox))
        nursery.cancel_scope.cancel()


async def test_acks_of_pushes_sent_do_not_count_against_the_message_rate() -> None:
    gateway = attrs.evolve(
        GATEWAY, config=GatewayConfig(message_rate=RateLimit(2.0, burst=5.0))
    )
    with trio.fail_after(30):
        async with (
            tc.open_runner(entities=[Session]) as runner,
            trio.open_nursery() as nursery,
        ):
            server: GatewayServer = await nursery.start(
                serve_gateway, runner, gateway, "127.0.0.1", 0
            )
            async with open_raw(f"{server.url}?session={SESSION}") as ws:
                for n in range(20):  # each acked in its own frame, at once
                    nursery.start_soon(send_reliable, runner, SESSION, n)
                    push = await next_push(ws)
                    ack = {"t": "ack", "epoch": push["epoch"], "seqs": [push["seq"]]}
                    await ws.send_message(encode(ack))
                # Acks of nothing it was sent count: over the rate, closed
                # (perhaps before the last of them is sent).
                with suppress(ConnectionClosed):
                    for _ in range(10):
                        await ws.send_message(encode({**ack, "seqs": [10**6]}))
                assert await close_code(ws) == CloseCode.RATE_LIMITED
            nursery.cancel_scope.cancel()
