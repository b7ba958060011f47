"""A fake webhook receiver and the runner it receives from, for the
webhook tests (memory storage, virtual time, ``httpx.MockTransport``)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import httpx
import trio

import trio_cluster as tc
from trio_cluster.storage import MemoryStorage
from trio_cluster.webhooks import (
    WebhookClient,
    WebhookEndpoint,
    Webhooks,
    verify_webhook,
)

from ..helpers import open_clocked_runner

__all__ = ["SECRET", "Answer", "Sink", "endpoint", "opened", "settle"]

SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"

Answer = Callable[[int], httpx.Response]
"""What an endpoint answers to its n-th request (1 for the first)."""


class Sink:
    """A fake receiver: verifies every request, records it, answers with
    the endpoint's script."""

    def __init__(self, runner_clock: Callable[[], float]) -> None:
        self.wall = runner_clock
        self.scripts: dict[str, Answer] = {}
        self.delays: dict[str, float] = {}
        self.calls: dict[str, list[tuple[float, str, int]]] = {}
        self.running: dict[str, int] = {}
        self.most: dict[str, int] = {}

    async def handler(self, request: httpx.Request) -> httpx.Response:
        path = request.url.path.strip("/")
        body = await request.aread()
        message_id = verify_webhook(request.headers, body, SECRET, now=self.wall())
        calls = self.calls.setdefault(path, [])
        calls.append((trio.current_time(), message_id, len(calls) + 1))
        self.running[path] = self.running.get(path, 0) + 1
        self.most[path] = max(self.most.get(path, 0), self.running[path])
        try:
            await trio.sleep(self.delays.get(path, 0.01))
        finally:
            self.running[path] -= 1
        script = self.scripts.get(path)
        return httpx.Response(200) if script is None else script(len(calls))

    def times(self, path: str) -> list[float]:
        return [at for at, _, _ in self.calls.get(path, [])]


def endpoint(name: str, **options: object) -> WebhookEndpoint:
    return WebhookEndpoint(name, f"http://sink.test/{name}", SECRET, **options)  # type: ignore[arg-type]


@asynccontextmanager
async def opened(
    webhooks: Webhooks, storage: MemoryStorage | None = None
) -> AsyncIterator[tuple[tc.Runner, WebhookClient, Sink]]:
    storage = MemoryStorage() if storage is None else storage
    async with open_clocked_runner(webhooks.entities, storage=storage) as runner:
        sink = Sink(runner.clock.now)
        transport = httpx.MockTransport(sink.handler)
        async with webhooks.open(runner, storage, transport=transport) as client:
            yield runner, client, sink


async def settle(seconds: float) -> None:
    await trio.sleep(seconds)
