"""The JavaScript client in a real headless Chromium (Debian's package),
against a real gateway: calls, a declared error, streams (with credit, and
left early), an aborted call, a topic, and a reconnect after the gateway
dropped the socket (the topic resumes: nothing lost, nothing twice). `.ci/run` installs
Chromium; without it this test FAILS (it is never skipped)."""

from __future__ import annotations

import shutil
import signal
import subprocess
from functools import partial
from pathlib import Path
from typing import Any

import attrs
import trio

import trio_cluster as tc
from trio_cluster.gateway import CloseCode, Gateway, Service, expose, publish

from .app import Blocker, Counter, open_gateway

PAGE = """<!doctype html>
<script type="module">
import { GatewayClient, GatewayDisconnectedError } from "/gateway.js";
const client = new GatewayClient(`ws://${location.host}/ws`);
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


def chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    assert path is not None, (
        "Chromium is not installed: `apt-get install -y chromium` (.ci/run does it)"
    )
    return path


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
            finally:
                process.send_signal(signal.SIGTERM)
