"""`Queue`: a named, durable job queue on persisted messages (delivery part).

Theory of operation: a queue of concurrency ``n`` is ``n`` worker entities,
``<type_name>`` ids ``"0"`` to ``"n-1"``, each running one job at a time:
the queue runs at most ``n`` jobs at once, cluster-wide, with no lock (the
workers' shards are spread over the runners like any entity's). A job is a
persisted message to one worker (`QueueClient.enqueue`), so everything
persisted messages do, jobs do:

* stored before ``enqueue`` returns, run at least once, redelivered after a
  failover;
* ``run_at``: not before that time (``deliver_at``);
* ``dedup_id``: a second job with the same id is not stored again (the
  primary key of the message);
* ``key``: jobs with the same key go to the same worker, so they run one at
  a time, in the order they were enqueued;
* retries: the queue's `RetryPolicy`, then the dead letters
  (``runner.dead_letters``);
* enqueued inside a transaction (a transactional handler,
  ``runner.transaction()``), a job exists once it commits (the outbox).

``rate``: each worker takes its share of the queue's `RateLimit` (a token
bucket of ``per_second / n`` per worker), so the queue never exceeds it;
jobs of one busy key get only their worker's share.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import attrs
import trio

from trio_cluster import ConfigError, Entity, RetryPolicy, rpc

from .._core._checks import part_name
from .._core._hashing import stable_hash64
from .._core._ratelimit import RateLimit, TokenBucket

if TYPE_CHECKING:
    from trio_cluster import Runner

    from ._client import QueueClient

__all__ = ["Queue", "QueuedJob", "check_run_at", "worker_id"]

T = TypeVar("T")

MAX_CONCURRENCY = 10_000


@attrs.frozen
class QueuedJob(Generic[T]):
    """A job as stored: the job, and how it was enqueued."""

    job: T
    dedup_id: str | None = None
    run_at: float | None = None
    """Unix seconds."""


def _check_name(_: object, attribute: attrs.Attribute[str], value: object) -> None:
    part_name("queue", value)


def _check_concurrency(
    _: object, attribute: attrs.Attribute[int], value: object
) -> None:
    if (
        isinstance(value, bool)
        or not isinstance(value, int)
        or not 1 <= value <= MAX_CONCURRENCY
    ):
        raise ConfigError(
            f"concurrency must be an int from 1 to {MAX_CONCURRENCY}, got {value!r}"
        )


def _check_handler(_: object, attribute: attrs.Attribute[Any], value: object) -> None:
    if not callable(value):
        raise ConfigError(f"a queue's handler must be an async function, got {value!r}")


@attrs.frozen(eq=False)
class Queue(Generic[T]):
    """A durable job queue, run by the runners given it (``open_runner(queues=[...])``).

    Args:
        name: the queue's name (its workers' entity type is
            ``trio_cluster.queue.<name>``): keep it stable while jobs are stored.
        handler: ``async def handler(job: T) -> None``, run for each job
            inside a worker entity (``current_runner()`` works there). An
            exception is a failed attempt (see `RetryPolicy`).
        job_type: the type of the jobs (their wire format, as a message's).
        concurrency: jobs running at once, cluster-wide.
        rate: at most this many jobs started per second (None: no limit).
        retry: attempts of a failing job before it is dead-lettered.

    Raises:
        ConfigError: on construction, for an invalid name, concurrency,
            handler, rate or retry policy.
    """

    name: str = attrs.field(validator=_check_name)
    handler: Callable[[T], Awaitable[None]] = attrs.field(validator=_check_handler)
    job_type: type[T]
    concurrency: int = attrs.field(default=10, validator=_check_concurrency)
    rate: RateLimit | None = attrs.field(
        default=None,
        validator=attrs.validators.optional(attrs.validators.instance_of(RateLimit)),
    )
    retry: RetryPolicy = attrs.field(
        factory=RetryPolicy,
        validator=attrs.validators.instance_of(RetryPolicy),
    )
    worker: type[Entity] = attrs.field(init=False)
    """The entity class of its workers."""

    def __attrs_post_init__(self) -> None:
        # After the validators: the workers are made of valid options.
        object.__setattr__(self, "worker", _worker_class(self))

    @property
    def type_name(self) -> str:
        """The entity type name of its workers."""
        return self.worker.type_name

    def client(self, runner: Runner) -> QueueClient[T]:
        """A `QueueClient` enqueuing on this queue through ``runner`` (any
        runner of the cluster; it need not host the workers).

        Raises:
            TypeError: ``runner`` is not a `trio_cluster.Runner`.
        """
        from ._client import QueueClient

        return QueueClient(self, runner)


def _worker_class(queue: Queue[Any]) -> type[Entity]:
    """The worker entity type of ``queue`` (see the module docstring)."""
    share = (
        None
        if queue.rate is None
        else RateLimit(
            queue.rate.per_second / queue.concurrency,
            max(1.0, queue.rate.burst / queue.concurrency),
        )
    )
    envelope = QueuedJob[queue.job_type]  # type: ignore[name-defined]

    async def run_job(self: _Worker, message: QueuedJob[Any]) -> None:
        if share is not None:
            if self.bucket is None:
                self.bucket = TokenBucket(share, trio.current_time())
            delay = self.bucket.take(trio.current_time())
            if delay > 0:
                await trio.sleep(delay)
        await queue.handler(message.job)

    async def run(self: _Worker, message: QueuedJob[Any]) -> None:
        await run_job(self, message)

    async def run_once(self: _Worker, message: QueuedJob[Any]) -> None:
        await run_job(self, message)

    for function in (run, run_once):
        function.__annotations__ = {"message": envelope, "return": type(None)}
    options: dict[str, Any] = {
        "persisted": True,
        "retry": queue.retry,
        "deliver_at": _run_at,
    }
    namespace = {
        "type_name": f"trio_cluster.queue.{queue.name}",
        "concurrency": 1,
        "max_idle": 60.0,
        "run": rpc(**options)(run),
        "run_once": rpc(primary_key=_dedup_id, **options)(run_once),
        "__module__": __name__,
    }
    return type(f"QueueWorker_{queue.name.replace('.', '_')}", (_Worker,), namespace)


class _Worker(Entity):
    """Base of the worker entity types (see `_worker_class`)."""

    type_name = "trio_cluster.queue"

    def __init__(self) -> None:
        self.bucket: TokenBucket | None = None


def _run_at(message: QueuedJob[Any]) -> float | None:
    return message.run_at


def _dedup_id(message: QueuedJob[Any]) -> str:
    assert message.dedup_id is not None
    return message.dedup_id


def worker_id(queue: Queue[Any], key: str | None, fallback: int) -> str:
    """The id of the worker a job goes to: by its key's stable hash, or
    ``fallback`` (a fresh id, spreading keyless jobs)."""
    number = fallback if key is None else stable_hash64(key)
    return str(number % queue.concurrency)


def check_run_at(value: object) -> float | None:
    """A job's ``run_at`` as Unix seconds (None: now).

    Raises:
        TypeError, ValueError: not an aware datetime, a finite number or None.
    """
    if value is None:
        return None
    if isinstance(value, datetime):
        if value.tzinfo is None:
            raise ValueError("run_at must be an aware datetime (with a tzinfo)")
        return value.timestamp()
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(
            f"run_at must be a datetime, Unix seconds or None, got {value!r}"
        )
    if not math.isfinite(value):
        raise ValueError(f"run_at must be finite, got {value!r}")
    return float(value)
