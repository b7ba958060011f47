"""A chat server as a web page: rooms, join and leave, the user list from
presence, a default room.

``python examples/chat_server.py`` starts two runners of one cluster, each
serving the gateway and this page (on 127.0.0.1:8765 and :8766). Open
http://127.0.0.1:8765/?name=ada and http://127.0.0.1:8766/?name=bob in two
browser tabs: the two users talk through different runners. In a real
deployment each process runs ``trio-cluster run examples.chat_server:APP
--gateway 0.0.0.0:8765 --dsn ...``.

* A room is a gateway topic, ``room:<name>``: the page subscribes to it to
  join, unsubscribes to leave; everybody starts in ``general``.
* Posting goes through the ``chat.say`` service, which checks the message
  and publishes it with the poster's name: clients cannot publish directly,
  nor speak for somebody else.
* The user list is the topic's presence (one entry per socket, with the
  user's name): the page shows who is in the room and says who joined or
  left. Entries of a runner that dies go within the failover time.
* The name is the client's token (``?token=``) here; check a real token
  in ``authenticate`` instead.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import attrs
import trio

import trio_cluster as tc
from trio_cluster.gateway import (
    ClientInfo,
    Gateway,
    GatewayServer,
    Handshake,
    Service,
    Topic,
    UnauthorizedError,
    current_client,
    publish,
    serve_gateway,
)
from trio_cluster.storage import MemoryStorage
from trio_cluster.transport import WebSocketTransport

NAME = re.compile(r"[A-Za-z0-9_-]{1,20}")
ROOM = re.compile(r"[a-z0-9-]{1,32}")
DEFAULT_ROOM = "general"


@attrs.frozen
class Say:
    room: str
    text: str


@attrs.define(eq=False, kw_only=True)
class RefusedError(Exception):
    """Declared: the page shows ``reason``."""

    reason: str


class Chat(Service):
    name = "chat"

    @tc.rpc(errors=[RefusedError])
    async def say(self, msg: Say) -> int:
        if not ROOM.fullmatch(msg.room):
            raise RefusedError(reason=f"no room {msg.room!r}")
        text = msg.text.strip()
        if not 1 <= len(text) <= 500:
            raise RefusedError(reason="say 1 to 500 characters")
        user = current_client().principal
        line = {"user": user, "text": text}
        position = await publish(tc.current_runner(), f"room:{msg.room}", line)
        return position.offset


async def authenticate(handshake: Handshake) -> str:
    """The user's name, from ``?token=`` (browsers) or a bearer token."""
    await trio.lowlevel.checkpoint()
    token = handshake.query.get("token") or handshake.headers.get(
        "authorization", ""
    ).removeprefix("Bearer ")
    if not NAME.fullmatch(token):
        raise UnauthorizedError(reason="pick a name: 1-20 letters, digits, _ or -")
    return token


def present_as(client: ClientInfo, topic: str) -> object:
    """Each socket in a room is listed with its user's name."""
    return {"user": client.principal}


PAGE = """<!doctype html>
<meta charset="utf-8">
<title>Chat</title>
<style>
  body { font: 15px sans-serif; margin: 1em; }
  #users { color: #555; } .info { color: #888; font-style: italic; }
</style>
<p>room <input id="room" size="12"> <button id="join">join</button>
  <span id="state">connecting...</span></p>
<p>here: <span id="users"></span></p>
<ul id="log"></ul>
<form id="say"><input id="text" size="50" autocomplete="off"> <button>send</button></form>
<script type="module">
import { GatewayClient } from "/gateway.js";
const $ = (id) => document.getElementById(id);
const name = new URLSearchParams(location.search).get("name") ?? prompt("Your name?");
const client = new GatewayClient(`ws://${location.host}/ws`, {
  token: name,
  onStateChange: (state) => {
    $("state").textContent = state.connected ? `connected as ${name}` : "reconnecting...";
  },
});
function line(text, kind) {
  const item = document.createElement("li");
  item.textContent = text;  // text, never HTML: a message cannot inject markup
  item.className = kind;
  $("log").append(item);
}
let room = null;
let subscription = null;
async function join(next) {
  subscription?.unsubscribe();
  room = next;
  $("room").value = room;
  $("log").replaceChildren();
  line(`you are in #${room}`, "info");
  let here = null;  // the users in the room, as last seen
  subscription = await client.subscribe(
    `room:${room}`,
    (publication) => line(`${publication.data.user}: ${publication.data.text}`, "message"),
    {
      onPresence: (presence) => {
        const now = new Set(Object.values(presence).map((entry) => entry.user));
        if (here !== null) {
          for (const user of now) if (!here.has(user)) line(`${user} joined`, "info");
          for (const user of here) if (!now.has(user)) line(`${user} left`, "info");
        }
        here = now;
        $("users").textContent = [...now].sort().join(", ");
      },
    },
  );
}
$("join").onclick = () => join($("room").value.trim().toLowerCase());
$("say").onsubmit = async (event) => {
  event.preventDefault();
  const text = $("text").value;
  $("text").value = "";
  try {
    await client.call("chat.say", { room, text });
  } catch (error) {
    line(`not sent: ${error.data?.reason ?? error.message}`, "info");
  }
};
join("general");
</script>
"""

GATEWAY = Gateway(
    services=[Chat()],
    authenticate=authenticate,
    topics=lambda name: name.startswith("room:") and bool(ROOM.fullmatch(name[5:])),
    presence=present_as,
    pages={"/": PAGE},
)
APP = {"gateway": GATEWAY}
"""For ``trio-cluster run examples.chat_server:APP --gateway HOST:PORT``
(the CLI adds the `Topic` entity rooms need)."""


async def serve_chat(
    ports: Sequence[int] = (8765, 8766),
    *,
    task_status: trio.TaskStatus[list[GatewayServer]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run one runner per port, all in one cluster (a shared memory storage,
    WebSocket between runners), each serving the gateway on 127.0.0.1 at
    its port (0: any free one); started with the gateway servers."""
    storage = MemoryStorage()
    servers: list[GatewayServer] = []

    async def serve_one(port: int, *, task_status: trio.TaskStatus[None]) -> None:
        async with (
            tc.open_runner(
                entities=[Topic],
                config=tc.ShardingConfig(
                    runner_address=tc.RunnerAddress("127.0.0.1", 0)
                ),
                storage=storage,
                transport=WebSocketTransport(),
            ) as runner,
            trio.open_nursery() as nursery,
        ):
            servers.append(
                await nursery.start(serve_gateway, runner, GATEWAY, "127.0.0.1", port)
            )
            await runner.wait_shards_acquired()
            task_status.started()
            await trio.sleep_forever()

    async with trio.open_nursery() as nursery:
        for port in ports:
            await nursery.start(serve_one, port)
        task_status.started(servers)


async def main() -> None:
    async with trio.open_nursery() as nursery:
        servers: list[GatewayServer] = await nursery.start(serve_chat)
        for server, user in zip(servers, ("ada", "bob"), strict=False):
            print(f"open http://127.0.0.1:{server.port}/?name={user}")


if __name__ == "__main__":
    trio.run(main)
