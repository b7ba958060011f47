"""The single-process demo tour (`trio_cluster._cli._demo`)."""

from __future__ import annotations

from trio_cluster._cli._demo import run_demo


async def test_demo_tour(autojump_clock):
    lines: list[str] = []
    await run_demo(lines.append)
    text = "\n".join(lines)
    assert "visit 'home'   -> 3 visit(s)" in text
    assert "deposit t1 again (a retry) -> 100" in text
    assert "reminded: pay rent" in text
    assert "follower got 'bob: hi ada'" in text
    assert "RemoteError: RuntimeError: disk on fire" in text
    assert "home visits after the restart: 0" in text
    assert "bob was reminded by the new runner: ['water plants']" in text
