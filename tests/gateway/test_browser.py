"""The JavaScript client in a real headless Chromium (Debian's package),
against a real gateway: calls, a declared error, streams (with credit, and
left early), an aborted call, a topic, a reconnect after the gateway
dropped the socket (the topic resumes: nothing lost, nothing twice), a
topic's presence shared with a Trio client, and acked pushes to the page's
session. `.ci/run` installs
Chromium; without it this test FAILS (it is never skipped)."""

from __future__ import annotations

import signal
import subprocess
from functools import partial
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio

import trio_cluster as tc
from trio_cluster.gateway import (
    JSON,
    MSGPACK,
    CloseCode,
    Gateway,
    Service,
    Session,
    expose,
    open_gateway_client,
    publish,
    send_reliable,
)

from .app import Blocker, Counter, open_gateway
from .chromium import chromium, open_chromium

PAGE = """<!doctype html>
<script type="module">
import { GatewayClient, GatewayDisconnectedError } from "/gateway.js";
const pushes = [];
const client = new GatewayClient(`ws://${location.host}/ws`, {
  onPush: (push) => pushes.push(push.data),
});
const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));
const report = (lines) => client.call("report.done", { lines: lines.map(String) });
try {
  const seen = [];
  const room = await client.subscribe("room:web", (publication) => seen.push(publication.data));
  const first = [];
  first.push(await client.call("Counter.add", { amount: 2 }, { key: "web" }));
  first.push(await client.call("Counter.add", { amount: 3 }, { key: "web" }));
  try {
    await client.call("Counter.add", { amount: 1000 }, { key: "web" });
  } catch (error) {
    first.push(`${error.code} ${error.type} ${error.data.limit}`);
  }
  try {
    await client.call("Counter.reset", { amount: 1 }, { key: "web" });
  } catch (error) {
    first.push(error.code);
  }
  const counted = [];
  for await (const number of client.stream("Counter.count", { upto: 7 }, { key: "web", credit: 2 })) {
    counted.push(number);
  }
  first.push(counted.join(","));
  for await (const number of client.stream("Counter.count", { upto: 1000 }, { key: "web" })) {
    if (number === 3) break;  // cancels the rest
  }
  const abort = new AbortController();
  setTimeout(() => abort.abort(new Error("aborted")), 100);
  try {
    await client.call("Blocker.wait", {}, { key: "web", signal: abort.signal });
  } catch (error) {
    first.push(error.message);
  }
  await report(["first", ...first]);
  let held = "not dropped";
  try {
    await client.call("report.hold", null);
  } catch (error) {
    held = `${error instanceof GatewayDisconnectedError} ${error.code}`;
  }
  await client.waitConnected();  // reconnects by itself, after a backoff delay
  // The replay comes before the answer to the resubscribe: wait for both.
  while (seen.length < 3 || room.recovered === null) {
    await new Promise((resolve) => setTimeout(resolve, 20));
  }
  await report([
    "second", held, client.state.reconnectCount, client.state.connected,
    seen.join(","), room.recovered,
  ]);
  let people = {};
  await client.subscribe("room:people", () => {}, {
    onPresence: (presence) => { people = { ...presence }; },
  });
  await report(["third", client.session]);
  while (pushes.length < 2 || Object.keys(people).length < 2) await sleep(20);
  const listed = await client.presence("room:people");
  await report([
    "fourth", pushes.join(","),
    Object.values(people).map((entry) => entry.who).sort().join(","),
    Object.keys(listed).length,
  ]);
} catch (error) {
  await report(["failed", error.stack ?? error]);
}
</script>
"""


@attrs.frozen
class Lines:
    lines: list[str]


class Report(Service):
    name = "report"

    def __init__(self) -> None:
        self.reports: list[list[str]] = []
        self.changed = trio.Event()
        self.holding = trio.Event()

    @tc.rpc
    async def done(self, msg: Lines) -> None:
        self.reports.append(msg.lines)
        self.changed.set()
        self.changed = trio.Event()

    @tc.rpc
    async def hold(self, msg: None) -> None:
        self.holding.set()
        await trio.sleep_forever()


async def wait_report(report: Report, count: int) -> list[str]:
    while len(report.reports) < count:
        await report.changed.wait()
    return report.reports[count - 1]


async def test_the_javascript_client_in_headless_chromium(tmp_path: Path) -> None:
    report = Report()
    gateway = Gateway(
        entities=[expose(Counter, "add", "count"), expose(Blocker)],
        services=[report],
        topics=lambda name: name.startswith("room:"),
        presence=lambda client, topic: {"who": client.subprotocol},
        sessions=True,
        pages={"/": PAGE},
    )
    with trio.fail_after(90):
        async with open_gateway(gateway) as server, trio.open_nursery() as nursery:
            command = [
                chromium(),
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--no-first-run",
                f"--user-data-dir={tmp_path / 'profile'}",
                f"http://127.0.0.1:{server.port}/",
            ]
            process: Any = await nursery.start(
                partial(
                    trio.run_process,
                    command,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                    check=False,
                )
            )
            try:
                first = await wait_report(report, 1)
                assert first == [
                    "first",
                    "2",
                    "5",
                    "declared LimitExceededError 100",
                    "not_found",
                    "0,1,2,3,4,5,6",
                    "aborted",
                ]
                await publish(server.runner, "room:web", "a")
                await publish(server.runner, "room:web", "b")
                await report.holding.wait()
                for connection in server.connections():
                    connection.end(CloseCode.GOING_AWAY, "maintenance")
                await publish(server.runner, "room:web", "c")  # while it is away
                second = await wait_report(report, 2)
                assert second == ["second", "true 1001", "1", "true", "a,b,c", "true"]
                assert server.statistics().connections_accepted == 2
                # Presence with a Trio client, and two acked pushes.
                async with (
                    open_gateway_client(server.url) as trio_client,
                    trio_client.subscribe("room:people", presence=True),
                ):
                    _, session = await wait_report(report, 3)
                    runner = server.runner
                    assert await send_reliable(runner, session, "p1") == 1
                    assert await send_reliable(runner, session, "p2") == 2
                    fourth = await wait_report(report, 4)
                assert fourth == ["fourth", "p1,p2", f"{JSON},{MSGPACK}", "2"]
            finally:
                process.send_signal(signal.SIGTERM)


CLOSING_PAGE = """<!doctype html>
<script type="module">
import { GatewayClient } from "/gateway.js";
window.got = [];
window.client = new GatewayClient(`ws://${location.host}/ws`, {
  onPush: (push) => { window.got.push(push.data); window.client.close(); },
});
</script>
"""


async def test_javascript_close_sends_the_acks_first(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A page that closes its client right in ``onPush``: the push is
    acked anyway (the ack goes before the close frame)."""
    monkeypatch.setattr(Session, "ack_timeout", 20.0)
    gateway = Gateway(sessions=True, pages={"/": CLOSING_PAGE})
    with trio.fail_after(90):
        async with (
            open_gateway(gateway) as server,
            open_chromium(tmp_path / "profile") as browser,
        ):
            page = await browser.open_page(f"http://127.0.0.1:{server.port}/")
            session = await page.wait_for(
                "window.client?.state.connected && window.client.session"
            )
            with trio.fail_after(10):  # well before a redelivery (20 s)
                assert await send_reliable(server.runner, session, "bye") == 1
            assert await page.evaluate("window.got") == ["bye"]
            assert await page.evaluate("window.client.state.connected") is False
