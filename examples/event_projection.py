"""An event projection pushed to interested sockets, in batches.

``python examples/event_projection.py`` publishes user events on the
durable event bus, projects them into a directory per organisation, and
shows what a browser or service watching one organisation gets: a batch
of the changes (at most 100, at most 5 seconds after the first), then the
directory itself.

* **Projection**: the subscription ``user-directory`` hands each event of
  the bus topic ``users`` (keyed by organisation: one organisation's events
  stay in order) to that organisation's `Directory` entity. Delivery is at
  least once, and applying an event twice changes nothing.
* **Interest**: a client watches one organisation by subscribing to the
  gateway topic ``directory:<org>``; it reads the whole directory once
  (the exposed ``Directory.snapshot``, after subscribing so that it misses
  nothing) and applies the batches after it. Other organisations' changes
  never reach it.
* **Batches**: the entity collects its changes and publishes them as one
  publication when it has ``batch_size`` of them, or ``batch_window``
  seconds after the first (a persisted message to itself, delivered at
  that time), as the seed's ``groupedWithin(100, "5 seconds")``: one
  delivery per socket per batch, not per change.
* The directory lives in the entity's memory: replay the subscription
  from ``"earliest"`` to rebuild it, or keep it as durable state
  (docs/state.md).
"""

from __future__ import annotations

from typing import Any, ClassVar

import attrs
import trio

import trio_cluster as tc
from trio_cluster.events import Event, Subscription, Topic as BusTopic, event_bus
from trio_cluster.gateway import (
    Gateway,
    GatewayServer,
    Topic,
    expose,
    open_gateway_client,
    publish,
    serve_gateway,
)


@attrs.frozen
class UserEvent:
    kind: str
    """``"registered"`` or ``"email-updated"``."""
    org: str
    user_id: str
    email: str


USERS = BusTopic("users", UserEvent, partitions=4)


@attrs.frozen
class Flush:
    batch: int
    at: float
    """When to publish the batch (Unix seconds, the runner's clock)."""


class Directory(tc.Entity):
    """The users of one organisation (the entity id): a projection of the
    ``users`` events, pushed in batches to ``directory:<org>``."""

    type_name = "Directory"
    batch_size: ClassVar[int] = 100
    batch_window: ClassVar[float] = 5.0

    def __init__(self) -> None:
        self.emails: dict[str, str] = {}
        self.pending: list[dict[str, str]] = []
        self.batch = 0

    @tc.rpc
    async def apply(self, msg: UserEvent) -> None:
        self.emails[msg.user_id] = msg.email
        self.pending.append({"kind": msg.kind, "user": msg.user_id, "email": msg.email})
        if len(self.pending) >= self.batch_size:
            await self._publish()
        elif len(self.pending) == 1:  # the first of a batch: time it
            at = tc.current_runner().clock.now() + self.batch_window
            await self.flush.discard(Flush(self.batch, at))

    @tc.rpc(persisted=True, deliver_at=lambda flush: flush.at)
    async def flush(self, msg: Flush) -> None:
        if msg.batch == self.batch:  # not published already for its size
            await self._publish()

    async def _publish(self) -> None:
        changes, self.pending = self.pending, []
        self.batch += 1
        if changes:
            summary = {
                "count": len(changes),
                "kinds": sorted({change["kind"] for change in changes}),
                "changes": changes,
            }
            await publish(tc.current_runner(), f"directory:{self.id}", summary)

    @tc.rpc
    async def snapshot(self, msg: None) -> dict[str, str]:
        """``{user id: email}``."""
        return dict(self.emails)


async def project(event: Event[UserEvent]) -> None:
    directory = tc.current_runner().client(Directory)(event.value.org)
    await directory.apply(event.value)


DIRECTORY = Subscription(USERS, "user-directory", project, start="earliest")
GATEWAY = Gateway(
    entities=[expose(Directory, "snapshot")],
    topics=lambda name: name.startswith("directory:"),
)
APP = {
    "entities": [Directory],
    "singletons": DIRECTORY.consumers,
    "gateway": GATEWAY,
}
"""For ``trio-cluster run examples.event_projection:APP --gateway HOST:PORT``."""


async def main(port: int = 0) -> tuple[list[dict[str, Any]], dict[str, str]]:
    """The batches a client watching ``acme`` got, and the directory."""
    async with (
        tc.open_runner(
            entities=[Directory, Topic], singletons=DIRECTORY.consumers
        ) as runner,
        trio.open_nursery() as nursery,
    ):
        server: GatewayServer = await nursery.start(
            serve_gateway, runner, GATEWAY, "127.0.0.1", port
        )
        async with (
            open_gateway_client(server.url) as client,
            client.subscribe("directory:acme") as updates,
        ):
            bus = event_bus(runner)
            for user in ("ada", "bob", "cy"):
                event = UserEvent("registered", "acme", user, f"{user}@acme.test")
                await bus.publish(USERS, event, key="acme")
            other = UserEvent("registered", "globex", "dee", "dee@globex.test")
            await bus.publish(USERS, other, key="globex")
            moved = UserEvent("email-updated", "acme", "bob", "bob@acme.example")
            await bus.publish(USERS, moved, key="acme")
            batches: list[dict[str, Any]] = []
            async for publication in updates:  # one batch of the 4 changes
                batches.append(publication.data)
                print(f"batch of {publication.data['count']}:")
                for change in publication.data["changes"]:
                    print(f"  {change['kind']} {change['user']} {change['email']}")
                break
            directory = client.entities(Directory)("acme")
            emails = await directory.snapshot(None)
            print(f"acme's directory: {emails}")
        nursery.cancel_scope.cancel()
    return batches, emails


if __name__ == "__main__":
    trio.run(main)
