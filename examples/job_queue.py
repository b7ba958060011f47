"""A durable job queue: order confirmations sent by a rate-limited queue.

Placing an order stores it and enqueues its confirmation in one
transaction (the outbox: a rolled-back order sends nothing); the queue runs
at most two jobs at once, five per second, one at a time per customer, and
retries a failing send before it dead-letters it.

Run it with ``python examples/job_queue.py``.
"""

from __future__ import annotations

import attrs
import trio

import trio_cluster as tc
from trio_cluster.abc import Storage
from trio_cluster.queues import Queue, RateLimit


@attrs.frozen
class Confirmation:
    order_id: str
    customer: str


SENT: list[str] = []
BROKEN_ADDRESSES = {"nobody"}
FLAKY = {"o3": 1}
"""Orders whose first sends fail (a mail server that hiccups)."""


async def send_confirmation(job: Confirmation) -> None:
    if job.customer in BROKEN_ADDRESSES:
        raise ValueError(f"no mailbox for {job.customer}")
    if FLAKY.get(job.order_id, 0) > 0:
        FLAKY[job.order_id] -= 1
        raise ConnectionError("mail server busy")
    await trio.sleep(0.1)  # talking to the mail server
    SENT.append(job.order_id)


emails = Queue(
    "emails",
    send_confirmation,
    Confirmation,
    concurrency=2,
    rate=RateLimit(5.0),
    retry=tc.RetryPolicy(max_attempts=3, backoff=tc.Backoff(0.5, 5.0)),
)


class CheckoutFailed(Exception):
    pass


async def place_order(
    runner: tc.Runner, order_id: str, customer: str, *, fail: bool = False
) -> None:
    """Store the order and enqueue its confirmation, atomically."""
    async with runner.transaction():
        # With PostgreSQL: tc.current_transaction().execute("INSERT INTO orders ...")
        await emails.client(runner).enqueue(
            Confirmation(order_id, customer), key=customer, dedup_id=order_id
        )
        if fail:
            raise CheckoutFailed(order_id)


async def main(storage: Storage | None = None) -> list[str]:
    SENT.clear()
    FLAKY.update({"o3": 1})
    async with tc.open_runner(entities=[emails.worker], storage=storage) as runner:
        for number, customer in enumerate(["ada", "bob", "ada", "cy", "nobody"], 1):
            await place_order(runner, f"o{number}", customer)
        await place_order(runner, "o1", "ada")  # a retried checkout: deduplicated
        try:
            await place_order(runner, "o6", "bob", fail=True)
        except CheckoutFailed:
            print("o6 rolled back: no confirmation")
        with trio.fail_after(60):
            while not await runner.dead_letters.list():  # noqa: ASYNC110
                await trio.sleep(0.5)
            while len(SENT) < 4:  # noqa: ASYNC110
                await trio.sleep(0.1)
        for letter in await runner.dead_letters.list():
            print(f"dead letter {letter.request_id}: {letter.error}")
        print("sent:", ", ".join(sorted(SENT)))
        return sorted(SENT)


if __name__ == "__main__":
    trio.run(main)
