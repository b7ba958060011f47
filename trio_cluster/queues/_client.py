"""`QueueClient`: enqueue jobs on a `Queue` through a runner (delivery part)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Generic, TypeVar

from trio_cluster import Runner

from ._queue import QueuedJob, check_run_at, worker_id

if TYPE_CHECKING:
    from datetime import datetime

    from ._queue import Queue

__all__ = ["QueueClient"]

T = TypeVar("T")


class QueueClient(Generic[T]):
    """Enqueues jobs on one queue through one runner (`Queue.client`)."""

    def __init__(self, queue: Queue[T], runner: Runner) -> None:
        if not isinstance(runner, Runner):
            raise TypeError(f"runner must be a Runner, got {runner!r}")
        self._queue = queue
        self._runner = runner
        self._workers = runner.client(queue.worker)

    async def enqueue(
        self,
        job: T,
        *,
        key: str | None = None,
        dedup_id: str | None = None,
        run_at: datetime | float | None = None,
    ) -> None:
        """Store ``job``; it runs once stored (at least once, see `Queue`).

        Args:
            job: a ``job_type`` value.
            key: jobs with the same key run one at a time, in order.
            dedup_id: a job with the same id (and key) enqueued before is
                the same job: this one is not stored again.
            run_at: not before this time (an aware datetime, or Unix seconds).

        Returns once the job is stored (inside a transaction: saved in it,
        stored when it commits). On cancellation it may or may not be
        stored (enqueue it again with the same ``dedup_id`` to be sure).

        Raises:
            TypeError, ValueError: a bad ``key``, ``dedup_id`` or ``run_at``.
            MalformedMessageError, MessageTooLargeError: the job cannot be
                stored (not a ``job_type``, too large).
            PersistenceError: storage failed; the job may not be stored.
        """
        for name, value in (("key", key), ("dedup_id", dedup_id)):
            if value is not None and not _nonempty_str(value):
                raise TypeError(
                    f"{name} must be a non-empty str or None, got {value!r}"
                )
        at = check_run_at(run_at)
        route = key if key is not None else dedup_id
        worker = self._workers(
            worker_id(self._queue, route, int(self._runner.new_id()))
        )
        message: QueuedJob[Any] = QueuedJob(job, dedup_id, at)
        handler: Any = worker.run if dedup_id is None else worker.run_once  # type: ignore[attr-defined]
        await handler.discard(message)


def _nonempty_str(value: object) -> bool:
    return isinstance(value, str) and bool(value)
