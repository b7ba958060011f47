"""Durable job queues on persisted messages (delivery part).

Define a `Queue`, host its workers on the runners that should run its jobs,
and enqueue through any runner::

    emails = Queue("emails", send_email, Email, concurrency=5,
                   rate=RateLimit(50), retry=tc.RetryPolicy(max_attempts=8))

    async with tc.open_runner(entities=[*ENTITIES, emails.worker]) as runner:
        await emails.client(runner).enqueue(Email(...), key=customer_id)

See `Queue` for what a job may count on.
"""

from __future__ import annotations

from .._core._ratelimit import RateLimit
from ._client import QueueClient
from ._queue import Queue, QueuedJob

__all__ = ["Queue", "QueueClient", "QueuedJob", "RateLimit"]
