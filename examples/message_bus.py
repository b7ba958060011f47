"""A message bus between services, with offline queueing and acked delivery.

``python examples/message_bus.py`` runs a runner with the gateway on
127.0.0.1:8765, then two services as gateway clients: ``orders`` sends
``billing`` three messages while billing is offline; billing connects,
gets them in order, each once, and answers.

* **Sending**: a service calls ``bus.send`` with a message id of its own;
  the bus stamps the sender (the authenticated service: no spoofing) and
  stores the message in the recipient's `Mailbox` as a persisted request
  keyed by that id, so a sender that retries after a dropped connection
  queues it once.
* **Queueing**: the mailbox hands its messages over one at a time, in
  order, each as a reliable push (`send_reliable`) to the recipient's
  session. While the recipient is offline the push waits in its session;
  if it is not acked in time (the session's ack timeout and redeliveries),
  the mailbox pushes it again, for as long as it takes. On PostgreSQL the
  queue (persisted requests) survives restarts of every runner.
* **Acks**: the recipient's client acks a push when the service takes it
  (``async for push in client.pushes``); one it received but did not take
  is sent again when it reconnects, to any gateway of the cluster.
  Delivery is at least once: a service drops a message id it has seen
  (a push can come again after its ack was lost with the connection).
* **Who is who**: a service authenticates with its token and must use its
  own session (``session_for(name)``): nobody else can read its mailbox.
  Liveness is the gateway's heartbeats (a silent socket is closed within
  ``ping_interval + ping_timeout``).
"""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import attrs
import trio

import trio_cluster as tc
from trio_cluster.gateway import (
    Gateway,
    GatewayClient,
    GatewayServer,
    Handshake,
    PushFailedError,
    Service,
    Session,
    UnauthorizedError,
    current_client,
    open_gateway_client,
    send_reliable,
    serve_gateway,
)

TOKENS = {"orders-secret": "orders", "billing-secret": "billing"}
"""Service tokens (in a real deployment: a secret store)."""
SERVICES = frozenset(TOKENS.values())
RETRY = tc.Backoff(0.5, 10.0, jitter=0.5)
"""Waits after a failed push that did not wait for its ack."""


def session_for(service: str) -> str:
    """The session a service's client must use."""
    return f"message-bus-inbox-{service}"


@attrs.frozen
class Send:
    """What a service asks the bus to deliver."""

    id: str
    """Unique per message, chosen by the sender (retries reuse it)."""
    to: str
    kind: str
    payload: Any


@attrs.frozen
class Envelope:
    """A message as the recipient gets it."""

    id: str
    sender: str
    to: str
    kind: str
    payload: Any


@attrs.define(eq=False, kw_only=True)
class UnknownServiceError(Exception):
    service: str


class Mailbox(tc.Entity):
    """The messages to one service, delivered in order and acked."""

    type_name = "Mailbox"

    @tc.rpc(persisted=True, primary_key=lambda envelope: envelope.id)
    async def deliver(self, msg: Envelope) -> None:
        """Returns once the recipient acked it (the next waits till then)."""
        runner = tc.current_runner()
        failures = 0
        while True:
            try:
                await send_reliable(runner, session_for(self.id), attrs.asdict(msg))
                return
            except PushFailedError as exc:
                if exc.attempts > 0:
                    continue  # not acked in time (offline): push it again
            except tc.ClusterError:
                pass  # the session's runner is gone, say: a new one takes over
            failures += 1
            await trio.sleep(RETRY.delay(failures - 1, secrets.randbelow(1000) / 1000))


class Bus(Service):
    name = "bus"

    @tc.rpc(errors=[UnknownServiceError])
    async def send(self, msg: Send) -> None:
        """Queue ``msg`` for its recipient; returns once it is stored."""
        if msg.to not in SERVICES:
            raise UnknownServiceError(service=msg.to)
        sender = str(current_client().principal)
        envelope = Envelope(msg.id, sender, msg.to, msg.kind, msg.payload)
        await tc.current_runner().client(Mailbox)(msg.to).deliver.discard(envelope)


async def authenticate(handshake: Handshake) -> str:
    """A service's name, from its bearer token; it must use its session."""
    await trio.lowlevel.checkpoint()
    token = handshake.headers.get("authorization", "").removeprefix("Bearer ")
    service = TOKENS.get(token)
    if service is None:
        raise UnauthorizedError(reason="unknown service token")
    if handshake.query.get("session") != session_for(service):
        raise UnauthorizedError(reason="use your own session", status=403)
    return service


GATEWAY = Gateway(
    services=[Bus()],
    authenticate=authenticate,
    sessions=True,
    user=lambda principal: str(principal),
)
APP = {"entities": [Mailbox], "gateway": GATEWAY}
"""For ``trio-cluster run examples.message_bus:APP --gateway HOST:PORT``."""


@asynccontextmanager
async def connect(url: str, token: str) -> AsyncIterator[GatewayClient]:
    """A service's connection to the bus."""
    async with open_gateway_client(
        url, token=token, session=session_for(TOKENS[token])
    ) as client:
        yield client


async def send(client: GatewayClient, to: str, kind: str, payload: Any) -> str:
    """Send a message; its id."""
    message_id = secrets.token_hex(8)
    await client.service(Bus).send(Send(message_id, to, kind, payload))
    return message_id


async def receive(client: GatewayClient, seen: set[str], count: int) -> list[Envelope]:
    """Take ``count`` new messages (each acked as it is taken), dropping
    the ids in ``seen``."""
    received: list[Envelope] = []
    async for push in client.pushes:
        envelope = Envelope(**push.data)
        if envelope.id not in seen:
            seen.add(envelope.id)
            received.append(envelope)
            if len(received) == count:
                break
    return received


async def main(port: int = 0, *, offline_for: float = 0.5) -> list[str]:
    lines: list[str] = []
    async with (
        tc.open_runner(entities=[Mailbox, Session]) as runner,
        trio.open_nursery() as nursery,
    ):
        server: GatewayServer = await nursery.start(
            serve_gateway, runner, GATEWAY, "127.0.0.1", port
        )
        async with connect(server.url, "orders-secret") as orders:
            for number in (1, 2, 3):
                await send(orders, "billing", "order-placed", {"order": number})
            lines.append("orders: sent 3 messages to billing, which is offline")
            await trio.sleep(offline_for)
            async with connect(server.url, "billing-secret") as billing:
                for envelope in await receive(billing, set(), 3):
                    lines.append(f"billing got {envelope.kind} {envelope.payload}")
                    await send(
                        billing, envelope.sender, "invoice-sent", envelope.payload
                    )
            answers = await receive(orders, set(), 3)
            lines += [f"orders got {a.kind} {a.payload}" for a in answers]
        nursery.cancel_scope.cancel()
    print(*lines, sep="\n")
    return lines


if __name__ == "__main__":
    trio.run(main, 8765)
