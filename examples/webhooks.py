"""Webhooks: a sender that signs and retries, a receiver that verifies and
deduplicates.

The sender registers the receiver's endpoint and sends three events. The
receiver (a small HTTP server on the loopback interface, written with h11)
checks every request with `verify_webhook` and handles each ``webhook-id``
once: its first answer to ``invoice.paid`` is lost (it processes the event,
then answers 500, as if it crashed before answering), so the sender retries
and the receiver, having seen that ``webhook-id``, answers 200 without
processing it twice. A forged request is refused with 401.

Run it with ``python examples/webhooks.py``.
"""

from __future__ import annotations

import json
from functools import partial

import h11
import httpx
import trio

import trio_cluster as tc
from trio_cluster.storage import MemoryStorage
from trio_cluster.webhooks import (
    RetrySchedule,
    WebhookEndpoint,
    Webhooks,
    WebhookSignatureError,
    new_secret,
    verify_webhook,
)

SECRET = new_secret()
"""Shared with the receiver out of band (e.g. when it registers)."""


class Receiver:
    """The receiving application: verify, deduplicate, process."""

    def __init__(self, secret: str) -> None:
        self.secret = secret
        self.seen: set[str] = set()
        self.processed: list[str] = []
        self.deliveries = 0
        self.lose_first_answer = {"invoice.paid"}

    def handle(self, headers: dict[str, str], body: bytes) -> int:
        """The HTTP status to answer with."""
        try:
            message_id = verify_webhook(headers, body, self.secret)
        except WebhookSignatureError as exc:
            print(f"receiver: refused ({exc})")
            return 401
        self.deliveries += 1
        event = json.loads(body)
        if message_id in self.seen:
            print(f"receiver: {event['type']} {message_id} again: already handled")
            return 200
        self.seen.add(message_id)  # in real life: in the same transaction as
        self.processed.append(event["type"])  # the event's effects
        print(f"receiver: {event['type']} handled: {event['data']}")
        if event["type"] in self.lose_first_answer:
            self.lose_first_answer.discard(event["type"])
            return 500  # the answer is "lost": the sender will retry
        return 200


async def serve_receiver(
    receiver: Receiver, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED
) -> None:
    """Serve ``receiver`` over HTTP/1.1 on 127.0.0.1 until cancelled."""
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    task_status.started(listeners[0].socket.getsockname()[1])
    await trio.serve_listeners(partial(_connection, receiver), listeners)


async def _connection(receiver: Receiver, stream: trio.SocketStream) -> None:
    conn = h11.Connection(h11.SERVER)
    try:
        while True:
            request: h11.Request | None = None
            body = b""
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    data = await stream.receive_some(65536)
                    if not data:
                        return
                    conn.receive_data(bytes(data))
                elif isinstance(event, h11.Request):
                    request = event
                elif isinstance(event, h11.Data):
                    body += event.data
                elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
                    break
            if request is None:
                return
            headers = {k.decode(): v.decode() for k, v in request.headers}
            status = receiver.handle(headers, body)
            reply = conn.send(
                h11.Response(status_code=status, headers=[("content-length", "0")])
            )
            await stream.send_all(reply + conn.send(h11.EndOfMessage()))
            if conn.our_state is not h11.DONE:
                return
            conn.start_next_cycle()
    except (h11.ProtocolError, trio.BrokenResourceError):
        return
    finally:
        await stream.aclose()


webhooks = Webhooks(schedule=RetrySchedule((0, 0.5, 1, 2), jitter=0))


async def main() -> list[str]:
    receiver = Receiver(SECRET)
    storage = MemoryStorage()
    async with trio.open_nursery() as nursery:
        port = await nursery.start(serve_receiver, receiver)
        url = f"http://127.0.0.1:{port}/hooks"
        async with (
            tc.open_runner(entities=webhooks.entities, storage=storage) as runner,
            webhooks.open(runner, storage) as hooks,
        ):
            await hooks.register(WebhookEndpoint("billing", url, SECRET))
            paid = await hooks.send("invoice.paid", {"invoice": 1, "amount": 250})
            await hooks.send("invoice.sent", {"invoice": 2})
            await hooks.send("customer.created", {"customer": "ada"})
            async with httpx.AsyncClient() as forger:
                answer = await forger.post(
                    url,
                    content=b'{"type":"invoice.paid"}',
                    headers={
                        "webhook-id": "msg_forged",
                        "webhook-timestamp": str(int(runner.clock.now())),
                        "webhook-signature": "v1,AAAA",
                    },
                )
                print(f"forged request: HTTP {answer.status_code}")
            with trio.fail_after(30):
                # Every event handled, and the redelivered one's success
                # recorded by the sender (after the receiver answered it).
                while receiver.deliveries < 4 or not any(  # noqa: ASYNC110
                    attempt.outcome == "success"
                    for attempt in await hooks.attempts(message_id=paid.message_id)
                ):
                    await trio.sleep(0.05)
            for attempt in await hooks.attempts(message_id=paid.message_id):
                print(
                    f"attempt {attempt.attempt} of {paid.message_id}:"
                    f" {attempt.outcome} (HTTP {attempt.status})"
                )
        nursery.cancel_scope.cancel()
    print("processed:", ", ".join(receiver.processed))
    return receiver.processed


if __name__ == "__main__":
    trio.run(main)
