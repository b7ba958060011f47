"""What becomes of a persisted request whose attempt failed (Trio driver).

Storage counts a request's attempts, one per claim (or save claimed:
`ClaimedRequest.attempts`); the runtime keeps the count on the job
(`Job.attempt`). An attempt fails in one of two ways, and the handler's
`RetryPolicy` (`Handler.retry`) decides what follows:

* its handler raised an exception it did not declare (an `Exit` whose
  ``failure`` is set). If the policy allows another attempt, the request is
  given back to storage, due after the policy's backoff, with the error as
  its last one (`MessageStorage.retry_later`): the next claim, here or on
  the shard's next owner, makes the next attempt, and the callers go on
  waiting. Otherwise it is *dead-lettered*: its final reply is
  `DeadLetteredError`, written with ``ReplyRecord.dead_letter`` so that
  storage keeps a copy of it with the dead letters;
* its runner stopped during it (killed, out of memory, a lease lost): the
  next owner claims it again, which counts the next attempt. A claim beyond
  the policy's ``max_attempts`` dead-letters it without running it: a
  message that kills every runner it reaches is stopped after that many.

The jitter of a retry's delay is derived from the request's id and attempt
(`spread`): reproducible, yet spread over many requests.

Kinds of dead letters, counted for the metrics: ``exhausted`` (the last
allowed attempt raised), ``non_retryable`` (an exception the policy names),
``runner_lost`` (a claim beyond ``max_attempts``).
"""

from __future__ import annotations

import collections
import logging
from typing import TYPE_CHECKING, Final

import trio

from .._core._retry import Backoff, spread
from .._errors import DeadLetteredError, PersistenceError
from .._storage_abc import ReplyOutcome
from .._storage_retries import MAX_ERROR_TEXT, RetryRecord
from ..serialization._replies import Exit

if TYPE_CHECKING:
    from .._registry import Handler
    from .._storage_abc import ClaimedRequest
    from ._delivery import DeliveryParts
    from ._slots import Job, ShardHost

__all__ = ["DEAD_LETTER_KINDS", "Attempts"]

log = logging.getLogger("trio_cluster.persisted")

DEAD_LETTER_KINDS: Final = ("exhausted", "non_retryable", "runner_lost")


def error_text(text: str) -> str:
    """``text`` cut to what storage keeps (`MAX_ERROR_TEXT` characters)."""
    if len(text) <= MAX_ERROR_TEXT:
        return text
    return text[: MAX_ERROR_TEXT - 3] + "..."


class Attempts:
    """Retry decisions for the failed attempts of persisted requests.

    Args:
        parts: the storage `retry_later` writes to, the clock of ``deliver_at``,
            the read loop's signal (woken at the retry's time), and the
            lease refresh interval that caps the backoff of failed writes.
    """

    def __init__(self, parts: DeliveryParts) -> None:
        self._parts = parts
        self._write_backoff = Backoff(0.05, parts.config.lease_refresh_interval)
        self.retried = 0
        """Attempts given back to storage for a later attempt."""
        self.dead_lettered: collections.Counter[str] = collections.Counter()
        """Requests dead-lettered here, by kind (`DEAD_LETTER_KINDS`)."""

    # ------------------------------------------------------------------
    # Decisions

    def after_failure(self, job: Job, exit_: Exit) -> float | tuple[Exit, str]:
        """``job``'s handler raised ``exit_.failure`` (undeclared): the delay
        before its next attempt, or the final reply that dead-letters it and
        the error text its dead letter keeps."""
        failure = exit_.failure
        assert failure is not None
        assert job.request_id is not None
        policy = job.handler.retry
        if policy.retries(job.attempt, failure):
            key = f"{job.request_id}/{job.attempt}"
            return policy.backoff.delay(job.attempt - 1, spread(key))
        text = error_text(str(exit_.error))
        kind = "non_retryable" if job.attempt < policy.max_attempts else "exhausted"
        return self._dead(job.request_id, job.attempt, text, kind), text

    def beyond_attempts(
        self, request: ClaimedRequest, handler: Handler
    ) -> tuple[Exit, str] | None:
        """If ``request`` was claimed beyond its handler's ``max_attempts``
        (its earlier attempts ended with their runners): the final reply
        that dead-letters it without running it, and its error text."""
        limit = handler.retry.max_attempts
        if request.attempts <= limit:
            return None
        text = f"its runner stopped during attempt {request.attempts - 1}"
        if request.last_error is not None:
            text += f"; an earlier attempt failed with {request.last_error}"
        text = error_text(text)
        return self._dead(
            request.request_id, request.attempts - 1, text, "runner_lost"
        ), text

    def _dead(self, request_id: int, attempts: int, text: str, kind: str) -> Exit:
        self.dead_lettered[kind] += 1
        log.error(
            "persisted request %d dead-lettered (%s) after %d attempt(s): %s",
            request_id,
            kind,
            attempts,
            text,
        )
        return Exit(
            error=DeadLetteredError(
                request_id=request_id, attempts=attempts, error=text
            )
        )

    # ------------------------------------------------------------------
    # Giving a request back

    async def give_back(self, host: ShardHost, request_ids: list[int]) -> None:
        """Give back requests claimed under ``host``'s epoch that did not run
        here (its shard stopped first), taking their claims back from their
        attempts counts. One write; if it fails, the claims stay counted
        (logged): the shard's next owner claims the requests all the same."""
        now = self._parts.clock.now()
        records = [
            RetryRecord(
                request_id=request_id,
                shard=host.shard_id,
                epoch=host.epoch,
                deliver_at=None,
                error=None,
                started=False,
            )
            for request_id in request_ids
        ]
        try:
            await self._parts.storage.retry_later(records, now=now)
        except PersistenceError as exc:
            log.warning(
                "%d unstarted request(s) of %s not given back (%s): their claims"
                " count as attempts",
                len(records),
                host.shard_id,
                exc,
            )

    async def retry_later(
        self, host: ShardHost, job: Job, exit_: Exit, delay: float
    ) -> None:
        """Give ``job``'s request back to storage for an attempt ``delay``
        seconds from now, retrying storage failures while the shard is
        served (else the shard's next owner claims it again: the attempt is
        counted all the same). On cancellation the write may or may not have
        happened; either way the request is not lost."""
        assert job.request_id is not None
        at = self._parts.clock.now() + delay
        record = RetryRecord(
            request_id=job.request_id,
            shard=host.shard_id,
            epoch=host.epoch,
            deliver_at=at,
            error=error_text(str(exit_.error)),
        )
        failures = 0
        while True:
            try:
                [outcome] = await self._parts.storage.retry_later(
                    [record], now=self._parts.clock.now()
                )
            except PersistenceError as exc:
                if not host.active:
                    log.warning(
                        "request %d not given back for a retry (%s); its shard's"
                        " next owner claims it again",
                        job.request_id,
                        exc,
                    )
                    return
                await trio.sleep(self._write_backoff.delay(failures))
                failures += 1
                continue
            break
        if outcome is ReplyOutcome.RECORDED:
            self.retried += 1
            self._parts.signal.nudge(at)
            log.warning(
                "%s failed on attempt %d of %d (%s); retrying in %.3g s",
                job.handler.what,
                job.attempt,
                job.handler.retry.max_attempts,
                record.error,
                delay,
            )
        elif outcome is ReplyOutcome.STALE_EPOCH:
            log.warning(
                "request %d not given back: shard %s moved on (fencing)",
                job.request_id,
                host.shard_id,
            )
