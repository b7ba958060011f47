"""`Webhooks`: a webhook delivery part, defined once, opened per runner
(delivery part)."""

from __future__ import annotations

import math
import weakref
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

import attrs

from trio_cluster import ConfigError, Entity, Runner
from trio_cluster.abc import WebhookStorageProvider

from .._core._breaker import BreakerPolicy
from .._core._schedule import RetrySchedule
from ._client import WebhookClient
from ._delivery import entity_classes
from ._http import HttpPools

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    import httpx

__all__ = ["Webhooks"]

_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789_")


def _check_name(_: object, attribute: attrs.Attribute[str], value: object) -> None:
    if (
        not isinstance(value, str)
        or not 1 <= len(value) <= 50
        or not set(value) <= _NAME_CHARS
    ):
        raise ConfigError(
            f"a webhooks name must be 1-50 lower-case letters, digits or '_', got {value!r}"
        )


def _check_concurrency(
    _: object, attribute: attrs.Attribute[int], value: object
) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 1000:
        raise ConfigError(
            f"{attribute.name} must be an int from 1 to 1000, got {value!r}"
        )


def _check_refresh(_: object, attribute: attrs.Attribute[float], value: object) -> None:
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or value < 0
    ):
        raise ConfigError(f"endpoint_refresh must be seconds >= 0, got {value!r}")


@attrs.frozen(eq=False)
class Webhooks:
    """Webhook delivery: endpoints registered at runtime, deliveries
    persisted and retried on a schedule, signed per Standard Webhooks.

    Define it once, host its entity types on the runners that deliver
    (``open_runner(entities=[*webhooks.entities])``), and open it on each
    runner with `open` to register endpoints and send events.

    Guarantees (see ``docs/webhooks.md``): a delivery is saved before
    ``send`` returns and attempted at least once (a runner killed during an
    attempt leaves it to the next owner, which attempts it again: receivers
    deduplicate on ``webhook-id``); a 2xx answer within the endpoint's
    timeout ends it; other answers, timeouts and network errors are retried
    on ``schedule`` (``Retry-After`` pushes a retry later, never earlier);
    410 Gone disables the endpoint; after the last attempt, the delivery is
    kept with the dead letters (`WebhookClient.replay`). An ordered
    endpoint's deliveries are a FIFO: one waiting for a retry holds back
    the later ones, and continues its schedule on the next owner after a
    failover.

    Args:
        name: the part's name (its entity types are
            ``trio_cluster.webhooks.<name>``, ``.ordered`` and ``.dead``):
            keep it stable while deliveries are stored.
        schedule: the attempts of a delivery (Svix's by default).
        breaker: per endpoint: after ``threshold`` failed attempts in a
            row its deliveries wait ``cool_down`` (not counted as attempts),
            then one probe decides.
        concurrency: attempts of one (unordered) endpoint running at once
            on its runner; an ordered endpoint runs one at a time.
        endpoint_refresh: seconds a runner keeps an endpoint's record before
            reading it again (so a change reaches the deliveries within it).
        in_flight: HTTP attempts in flight at once on one runner, every
            endpoint together (an attempt's timeout starts when it is let
            in); each endpoint still gets at most ``concurrency`` of them.

    Raises:
        ConfigError: on construction, for an invalid value.
    """

    name: str = attrs.field(default="default", validator=_check_name)
    schedule: RetrySchedule = attrs.field(
        factory=RetrySchedule,
        validator=attrs.validators.instance_of(RetrySchedule),
    )
    breaker: BreakerPolicy = attrs.field(
        factory=BreakerPolicy,
        validator=attrs.validators.instance_of(BreakerPolicy),
    )
    concurrency: int = attrs.field(default=10, validator=_check_concurrency)
    endpoint_refresh: float = attrs.field(default=5.0, validator=_check_refresh)
    in_flight: int = attrs.field(default=200, validator=_check_concurrency)
    entities: tuple[type[Entity], ...] = attrs.field(init=False)
    """Its entity types: give them to ``open_runner(entities=...)``."""
    _clients: weakref.WeakKeyDictionary[Runner, WebhookClient] = attrs.field(
        init=False, factory=weakref.WeakKeyDictionary
    )

    def __attrs_post_init__(self) -> None:
        object.__setattr__(self, "entities", entity_classes(self))

    @property
    def endpoint_type(self) -> type[Entity]:
        """The entity type of unordered endpoints."""
        return self.entities[0]

    @property
    def ordered_type(self) -> type[Entity]:
        """The entity type of ordered endpoints."""
        return self.entities[1]

    @property
    def dead_type(self) -> type[Entity]:
        """The entity type that keeps failed deliveries as dead letters."""
        return self.entities[2]

    def client_of(self, runner: Runner) -> WebhookClient | None:
        """The open client of ``runner``, if any."""
        return self._clients.get(runner)

    @asynccontextmanager
    async def open(
        self,
        runner: Runner,
        storage: WebhookStorageProvider,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> AsyncIterator[WebhookClient]:
        """Open the part on ``runner``: a `WebhookClient` (and its HTTP
        pool) that the endpoint entities on this runner deliver with.

        Args:
            runner: the runner (open it with ``entities=[*self.entities]``
                to deliver here; any runner may register and send).
            storage: the runner's storage (`MemoryStorage`,
                `PostgresStorage`): it keeps the endpoints and attempts.
            transport: an httpx transport every endpoint shares (tests pass
                an ``httpx.MockTransport``); default a keep-alive pool per
                endpoint, of up to ``concurrency`` connections.

        Raises:
            TypeError: a bad argument.
            RuntimeError: it is open on this runner already.
            PersistenceError: (on entry) the storage could not be reached.

        On exit (also on cancellation) the pool and the storage connection
        close; attempts still running on this runner fail with them and are
        made again by the endpoint's next owner (or this runner's next
        attempt of the request).
        """
        if not isinstance(runner, Runner):
            raise TypeError(f"runner must be a Runner, got {runner!r}")
        if not isinstance(storage, WebhookStorageProvider):
            raise TypeError(
                f"storage must keep webhook records (MemoryStorage, PostgresStorage), got {storage!r}"
            )
        if runner in self._clients:
            raise RuntimeError(
                f"webhooks {self.name!r} are open on this runner already"
            )
        pools = HttpPools(self.concurrency, self.in_flight, transport)
        try:
            async with storage.open_webhook_storage(
                name=f"{runner.address}"
            ) as records:
                client = WebhookClient(self, runner, records, pools)
                self._clients[runner] = client
                try:
                    yield client
                finally:
                    self._clients.pop(runner, None)
        finally:
            await pools.aclose()
