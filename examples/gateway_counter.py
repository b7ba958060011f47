"""A realtime gateway exposing one entity, used from Trio and from a browser.

``python examples/gateway_counter.py`` runs a runner with the gateway on
127.0.0.1:8765, calls it from the Trio client, and keeps serving: open
http://127.0.0.1:8765/ in a browser to call it from the page below (the
JavaScript client is served by the gateway at ``/gateway.js``). In a
cluster, ``trio-cluster run examples.gateway_counter:APP --gateway
0.0.0.0:8765 ...`` serves the same definition.
"""

from __future__ import annotations

import attrs
import trio

import trio_cluster as tc
from trio_cluster.gateway import (
    Gateway,
    GatewayServer,
    expose,
    open_gateway_client,
    serve_gateway,
)


@attrs.frozen
class Add:
    amount: int


@attrs.define(eq=False, kw_only=True)
class TooMuchError(Exception):
    """Declared: clients get it back typed."""

    most: int


class Counter(tc.Entity):
    type_name = "Counter"

    def __init__(self) -> None:
        self.value = 0

    @tc.rpc(errors=[TooMuchError])
    async def add(self, msg: Add) -> int:
        if msg.amount > 100:
            raise TooMuchError(most=100)
        self.value += msg.amount
        return self.value

    @tc.rpc
    async def reset(self, msg: Add) -> int:
        """Not exposed: clients of the gateway cannot reach it."""
        self.value = 0
        return 0


PAGE = """<!doctype html>
<title>Counter</title>
<button id="add">add 1</button> <span id="value">?</span> <span id="state"></span>
<script type="module">
import { GatewayClient } from "/gateway.js";
const client = new GatewayClient(`ws://${location.host}/ws`, {
  onStateChange: (state) => {
    document.getElementById("state").textContent = state.connected ? "" : "reconnecting...";
  },
});
document.getElementById("add").onclick = async () => {
  const value = await client.call("Counter.add", { amount: 1 }, { key: "shared" });
  document.getElementById("value").textContent = value;
};
</script>
"""

GATEWAY = Gateway(entities=[expose(Counter, "add")], pages={"/": PAGE})
APP = {"entities": [Counter], "gateway": GATEWAY}
"""For ``trio-cluster run examples.gateway_counter:APP --gateway HOST:PORT``."""


async def main(port: int = 0, *, serve_forever: bool = False) -> list[object]:
    async with (
        tc.open_runner(entities=[Counter]) as runner,
        trio.open_nursery() as nursery,
    ):
        server: GatewayServer = await nursery.start(
            serve_gateway, runner, GATEWAY, "127.0.0.1", port
        )
        seen: list[object] = []
        async with open_gateway_client(server.url) as client:
            counter = client.entities(Counter)("shared")
            seen.append(await counter.add(Add(2)))
            seen.append(await counter.add(Add(3)))
            try:
                await counter.add(Add(1000))
            except TooMuchError as exc:
                seen.append(f"refused: at most {exc.most}")
        print(*seen, sep="\n")
        if serve_forever:
            print(f"open http://127.0.0.1:{server.port}/ in a browser")
            await trio.sleep_forever()
        nursery.cancel_scope.cancel()
        return seen


if __name__ == "__main__":
    trio.run(lambda: main(8765, serve_forever=True))
