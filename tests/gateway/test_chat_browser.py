"""examples/chat_server.py's page in a real headless Chromium (Debian's
package, driven over CDP): two users, each page attached to the gateway of
a different runner of one cluster, join the default room, see each other in
the user list, exchange messages, and see a join and a leave when one
changes rooms. Without Chromium this test FAILS (`.ci/run` installs it)."""

from __future__ import annotations

import json
from pathlib import Path

import trio

from trio_cluster.gateway import GatewayServer

from ..helpers import load_example
from .chromium import Page, open_chromium

USERS = 'document.getElementById("users").textContent'
LOG = '[...document.querySelectorAll("#log li")].map((li) => li.textContent)'


def say(text: str) -> str:
    return (
        f'document.getElementById("text").value = {json.dumps(text)};'
        ' document.getElementById("say").requestSubmit(); true'
    )


async def wait_line(page: Page, line: str) -> list[str]:
    """Wait until the page's log shows ``line``; the log."""
    log: list[str] = await page.wait_for(
        f"(() => {{ const log = {LOG}; return log.includes({json.dumps(line)}) && log; }})()"
    )
    return log


def connected_users(server: GatewayServer) -> int:
    return len(server.connections())


async def test_two_browsers_chat_through_two_runners(tmp_path: Path) -> None:
    example = load_example("chat_server")
    with trio.fail_after(120):
        async with trio.open_nursery() as nursery:
            servers: list[GatewayServer] = await nursery.start(
                example.serve_chat, (0, 0)
            )
            first, second = servers
            assert first.runner.address != second.runner.address
            async with open_chromium(tmp_path / "profile") as browser:
                ada = await browser.open_page(
                    f"http://127.0.0.1:{first.port}/?name=ada"
                )
                bob = await browser.open_page(
                    f"http://127.0.0.1:{second.port}/?name=bob"
                )
                # Both in the default room, each seeing both names (the
                # presence of the room, across the two runners).
                for page in (ada, bob):
                    await page.wait_for(f'{USERS} === "ada, bob"')
                    assert (await page.evaluate(LOG))[0] == "you are in #general"
                # Each page is attached to its own runner's gateway.
                assert connected_users(first) == 1
                assert connected_users(second) == 1
                await ada.evaluate(say("hello bob"))
                await wait_line(bob, "ada: hello bob")
                await bob.evaluate(say("hi ada, <b>you</b> there?"))
                log = await wait_line(ada, "bob: hi ada, <b>you</b> there?")
                assert "ada: hello bob" in log
                # Markup in a message is shown as text, never parsed.
                assert (
                    await ada.evaluate('document.querySelectorAll("#log b").length')
                    == 0
                )
                # Bob moves to another room: Ada sees him leave.
                await bob.evaluate(
                    'document.getElementById("room").value = "random";'
                    ' document.getElementById("join").click(); true'
                )
                await wait_line(ada, "bob left")
                await ada.wait_for(f'{USERS} === "ada"')
                await bob.wait_for(f'{USERS} === "bob"')
                assert await bob.evaluate(LOG) == ["you are in #random"]
                # A message to the old room no longer reaches him.
                await ada.evaluate(say("still there?"))
                await wait_line(ada, "ada: still there?")
                # Ada joins him: he sees her join, and they talk there.
                await ada.evaluate(
                    'document.getElementById("room").value = "random";'
                    ' document.getElementById("join").click(); true'
                )
                await wait_line(bob, "ada joined")
                await ada.wait_for(f'{USERS} === "ada, bob"')
                await ada.evaluate(say("found you"))
                log = await wait_line(bob, "ada: found you")
                assert "ada: still there?" not in log
                # A message the server refuses is not sent, and says why.
                await bob.evaluate(say("   "))
                await wait_line(bob, "not sent: say 1 to 500 characters")
                # Bob closes his tab: Ada sees him leave.
                await bob.close()
                await wait_line(ada, "bob left")
                await ada.wait_for(f'{USERS} === "ada"')
            nursery.cancel_scope.cancel()
